"""What must hold before the lab deploys to a cluster; every failure says how to fix it."""

from __future__ import annotations

import urllib.error
import urllib.request
from typing import Any

from hfl_lab._exceptions import ApiError
from hfl_lab.backends.base import PreflightCheck
from hfl_lab.backends.kubernetes.cluster_api import ClusterApi
from hfl_lab.backends.kubernetes.measurements import SIGNED_OVERLAY
from hfl_lab.backends.kubernetes.render import RenderedRun
from hfl_lab.backends.kubernetes.settings import KubernetesSettings
from hfl_lab.image.container import (
    BUILDER_FIX,
    tool_inventory,
    tool_summary,
    usable_builders,
)

#: the pod-index label that gives each worker its index is on by default from 1.28
MIN_MINOR = 28
COCO_CRD = "ccruntimes.confidentialcontainers.org"
TDX_NODE_LABELS = (
    "intel.feature.node.kubernetes.io/tdx",
    "feature.node.kubernetes.io/cpu-security.tdx.enabled",
)
KATA_NODE_LABEL = "katacontainers.io/kata-runtime"

FIX_API = "set kubeconfig to a cluster you can reach (kubectl get nodes must work)."
FIX_RUNTIME = (
    "install the Confidential Containers operator and a CcRuntime for TDX "
    "(notebook 01), which registers the RuntimeClass kata-qemu-tdx."
)
FIX_COCO = (
    "install the Confidential Containers operator "
    "(kubectl apply -k github.com/confidential-containers/operator/config/release) "
    "and a CcRuntime (config/samples/ccruntime/default)."
)
FIX_NODES = (
    "enable TDX in the BIOS and boot a TDX host kernel, run node-feature-discovery so the "
    "node is labelled cpu-security.tdx.enabled=true, and let the CoCo operator label it "
    f"{KATA_NODE_LABEL}=true."
)


def _ready(node: dict[str, Any]) -> bool:
    for cond in (node.get("status") or {}).get("conditions") or []:
        if cond.get("type") == "Ready":
            return bool(cond.get("status") == "True")
    return False


def check_api(api: ClusterApi) -> tuple[PreflightCheck, dict[str, Any] | None]:
    try:
        version = api.get("/version")
    except ApiError as exc:
        return PreflightCheck(
            "API server", False, f"{api.host} did not answer ({exc}).", FIX_API
        ), None
    minor = int("".join(ch for ch in str(version.get("minor", "0")) if ch.isdigit()) or 0)
    if minor < MIN_MINOR:
        return (
            PreflightCheck(
                "API server",
                False,
                f"Kubernetes {version.get('gitVersion')} is older than 1.{MIN_MINOR} "
                "(workers need the pod-index label).",
                f"upgrade the cluster to Kubernetes 1.{MIN_MINOR} or newer.",
            ),
            version,
        )
    return PreflightCheck("API server", True, f"{api.host}: {version.get('gitVersion')}"), version


def check_runtime_class(api: ClusterApi, name: str) -> PreflightCheck:
    try:
        rc = api.get(f"/apis/node.k8s.io/v1/runtimeclasses/{name}")
    except ApiError as exc:
        detail = f"RuntimeClass {name} does not exist." if exc.status == 404 else str(exc)
        return PreflightCheck("RuntimeClass", False, detail, FIX_RUNTIME)
    return PreflightCheck("RuntimeClass", True, f"{name} (handler {rc.get('handler')})")


def check_coco_operator(api: ClusterApi) -> PreflightCheck:
    try:
        api.get(f"/apis/apiextensions.k8s.io/v1/customresourcedefinitions/{COCO_CRD}")
        runtimes = api.get("/apis/confidentialcontainers.org/v1beta1/ccruntimes").get("items", [])
    except ApiError as exc:
        detail = (
            f"the CoCo operator's CRD {COCO_CRD} is missing."
            if exc.status == 404
            else f"cannot read the CoCo operator's resources ({exc})."
        )
        return PreflightCheck("CoCo operator", False, detail, FIX_COCO)
    if not runtimes:
        return PreflightCheck(
            "CoCo operator", False, "the operator is installed but no CcRuntime exists.", FIX_COCO
        )
    names = ", ".join(r["metadata"]["name"] for r in runtimes)
    return PreflightCheck("CoCo operator", True, f"CcRuntime {names}")


def check_nodes(api: ClusterApi, need_tdx: bool) -> PreflightCheck:
    try:
        nodes = api.get("/api/v1/nodes").get("items", [])
    except ApiError as exc:
        return PreflightCheck("nodes", False, f"cannot list nodes ({exc}).", FIX_API)
    ready = [n for n in nodes if _ready(n)]
    if not need_tdx:
        if not ready:
            return PreflightCheck("nodes", False, "no node is Ready.", "fix or add a node.")
        return PreflightCheck("nodes", True, f"{len(ready)} Ready node(s)")
    tdx = [
        n
        for n in ready
        if any((n["metadata"].get("labels") or {}).get(k) == "true" for k in TDX_NODE_LABELS)
        and (n["metadata"].get("labels") or {}).get(KATA_NODE_LABEL) == "true"
    ]
    if not tdx:
        return PreflightCheck(
            "TDX nodes",
            False,
            f"none of {len(ready)} Ready node(s) is labelled TDX-capable with kata installed.",
            FIX_NODES,
        )
    return PreflightCheck(
        "TDX nodes", True, ", ".join(n["metadata"]["name"] for n in tdx) + " can run TDs"
    )


def check_registry(settings: KubernetesSettings, timeout_s: float = 5.0) -> PreflightCheck:
    host = settings.registry_host
    if host is None:
        return PreflightCheck("registry", True, "Docker Hub (not probed)")
    scheme = "http" if settings.registry_insecure else "https"
    url = f"{scheme}://{host}/v2/"
    fix = (
        f"start the registry (native/coco/registry.sh) and make {host.split(':')[0]} resolve "
        "here and in the cluster (native/coco/coredns_hosts.sh)."
    )
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as resp:  # noqa: S310 - http(s) only
            status = int(resp.status)
    except urllib.error.HTTPError as exc:
        status = exc.code
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        return PreflightCheck("registry", False, f"{url} is unreachable ({reason}).", fix)
    # the distribution API answers /v2/ with 200, or 401 when it wants credentials
    if status in (200, 401):
        return PreflightCheck("registry", True, f"{url} answers ({status})")
    return PreflightCheck("registry", False, f"{url} answered {status}, not a registry.", fix)


def check_image_tools(settings: KubernetesSettings,
                      inventory: dict[str, str] | None = None) -> PreflightCheck:
    """Which of skopeo, umoci, buildah, docker and cosign are on the owner's machine. Fails only
    where this machine must make the image: the encrypted+signed overlay with an image not yet
    pinned by digest (built, encrypted, pushed and signed here) and skopeo or a builder
    missing."""
    found = inventory if inventory is not None else tool_inventory()
    detail = tool_summary(found)
    if settings.overlay != SIGNED_OVERLAY or settings.image_ref.digest:
        return PreflightCheck("image tools", True, detail)
    fixes = []
    if found.get("skopeo", "not installed") == "not installed":
        fixes.append("install skopeo (apt-get install skopeo)")
    if not usable_builders(found):
        fixes.append(BUILDER_FIX)
    if fixes:
        return PreflightCheck(
            "image tools", False,
            f"{detail}: the {SIGNED_OVERLAY} overlay needs its image built, encrypted and "
            "signed here (or image pinned by digest to one made elsewhere)",
            "; ".join(fixes))
    if found.get("cosign", "not installed") == "not installed":
        detail += ("; the guest's sigstoreSigned policy needs a cosign signature: notebook 03 "
                   "prints the command")
    return PreflightCheck("image tools", True, detail)


def check_vault(rendered: RenderedRun) -> PreflightCheck:
    """Whether the model volume can be guarded: ps0's measurements pinned by the run's policy."""
    if rendered.volume_policy is not None:
        ps0 = rendered.volume_policy.roles.get("ps0", {})
        mr_td = ", ".join(v[:12] + "…" for v in ps0.get("mr_td") or ())
        return PreflightCheck(
            "model vault", True,
            "the trust service generates the volume's passphrase in its TD and releases it to "
            f"ps0 only (MR_TD {mr_td}), which creates the LUKS volume in its pod",
        )
    if rendered.volume_policy_error:
        return PreflightCheck("model vault", False, rendered.volume_policy_error,
                              rendered.volume_policy_fix)
    return PreflightCheck("model vault", True,
                          "off: ps0 keeps plain checkpoints in its pod (vault=false)")


def cluster_checks(api: ClusterApi, settings: KubernetesSettings) -> list[PreflightCheck]:
    checks = []
    api_check, _ = check_api(api)
    checks.append(api_check)
    if not api_check.ok and "did not answer" in api_check.detail:
        skipped = ["nodes"] + (["RuntimeClass", "CoCo operator"] if settings.uses_tdx else [])
        checks += [
            PreflightCheck(n, False, "not checked: the API server is unreachable.", FIX_API)
            for n in skipped
        ]
    else:
        if settings.uses_tdx:
            checks.append(check_runtime_class(api, settings.runtime_class))
            checks.append(check_coco_operator(api))
        checks.append(check_nodes(api, settings.uses_tdx))
    checks.append(check_registry(settings))
    checks.append(check_image_tools(settings))
    return checks
