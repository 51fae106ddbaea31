"""Notebook 01: the reference's CoCo deployment steps 1-9 as check → plan → apply.

Each step checks whether it is already done, plans the commands that would do it, and runs them
only when asked (``apply=True``) and only where a check said they are needed. On the ``local``
backend no step applies: every one is shown with its plan and marked skipped, with the reason.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from hfl_lab._exceptions import ApiError, BackendError, HflLabError
from hfl_lab.backends.kubernetes.settings import KubernetesSettings
from hfl_lab.config import LabConfig
from hfl_lab.lab.notebook import Table, TableReport

# hfl_lab.backends.kubernetes.cluster_api and .preflight load the kubernetes client (~2 s): they are
# imported inside the checks that talk to a cluster ("lazy: loads kubernetes"), so a notebook's
# `from hfl_lab import ...` and the local backend never load it.
if TYPE_CHECKING:
    from hfl_lab.backends.kubernetes.cluster_api import ClusterApi

__all__ = [
    "COCO_STEPS",
    "CocoPlan",
    "CocoStep",
    "StepResult",
    "apply_coco_plan",
    "coco_stack",
    "plan_coco_stack",
]

_REPO = Path(__file__).resolve().parents[2]
NATIVE = _REPO / "native" / "coco"
OPERATOR = "github.com/confidential-containers/operator/config/release?ref=v0.13.0"
CCRUNTIME = (
    "github.com/confidential-containers/operator/config/samples/ccruntime/default?ref=v0.13.0"
)
FLANNEL = "https://github.com/flannel-io/flannel/releases/latest/download/kube-flannel.yml"
INGRESS = (
    "https://raw.githubusercontent.com/kubernetes/ingress-nginx/controller-v1.12.1/"
    "deploy/static/provider/baremetal/deploy.yaml"
)
KATA_TDX_CONFIG = Path(
    "/opt/confidential-containers/share/defaults/kata-containers/configuration-qemu-tdx.toml"
)
#: the kernel parameters and guest size the reference sets for ResNet training in a TD
KERNEL_PARAMS = ("agent.log=info", "agent.image_registry_auth=file:///etc/attestation-agent/auth")
GUEST_VCPUS, GUEST_MEMORY_MIB = 8, 16384

LOCAL_REASON = (
    "backend=local: participants are processes on this machine in SIMULATED TDs, so there is "
    "no cluster, no CoCo runtime and no TD guest to configure"
)
DONE, NEEDED, UNKNOWN, SKIPPED, APPLIED, FAILED = (
    "done", "needed", "unknown", "skipped", "applied", "failed",
)
_COLORS = {DONE: "#dafbe1", APPLIED: "#dafbe1", NEEDED: "#fff8c5", FAILED: "#ffebe9"}


@dataclass(frozen=True)
class Probe:
    """What a check found: a status (done | needed | unknown) and what was seen."""

    status: str
    detail: str


@dataclass(frozen=True)
class CocoStep:
    """One step of the reference deployment: what it is for, how to check it, how to do it."""

    number: int
    name: str
    purpose: str
    plan: Callable[[LabConfig], list[list[str]]]
    check: Callable[[LabConfig, Any], Probe]
    #: where the commands run: "cluster" (kubectl from here) or "host" (on each TDX host, root)
    where: str = "cluster"


@dataclass
class StepResult:
    """A step after check (and apply): its status, why, and the commands planned or run."""

    step: CocoStep
    status: str
    detail: str
    commands: list[list[str]] = field(default_factory=list)
    output: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {
            "number": self.step.number,
            "name": self.step.name,
            "purpose": self.step.purpose,
            "where": self.step.where,
            "status": self.status,
            "detail": self.detail,
            "commands": [" ".join(c) for c in self.commands],
            "output": self.output,
        }


@dataclass(repr=False)  # shown as its table (TableReport)
class CocoPlan(TableReport):
    """Every step of the CoCo stack with its status; ``save`` writes coco_plan.json."""

    backend: str
    steps: list[StepResult]

    @property
    def pending(self) -> list[StepResult]:
        return [s for s in self.steps if s.status in (NEEDED, FAILED)]

    @property
    def shared_reason(self) -> str:
        """The one reason every step was skipped for ("" when they differ or were checked)."""
        reasons = {s.detail for s in self.steps}
        if self.steps and all(s.status == SKIPPED for s in self.steps) and len(reasons) == 1:
            return reasons.pop()
        return ""

    def summary(self) -> str:
        """One sentence on where the stack stands and what to do next."""
        if self.shared_reason:
            return (f"All {len(self.steps)} steps skipped, {self.shared_reason}. On a TDX "
                    "cluster (backend='kubernetes') this notebook checks each step, plans what "
                    "is missing, and runs the plan with apply=True.")
        pending = len(self.pending)
        if pending:
            return (f"{pending} of {len(self.steps)} step(s) still to do: run the plan above, "
                    "or set apply=True.")
        unknown = sum(s.status == UNKNOWN for s in self.steps)
        if unknown:
            return f"{unknown} step(s) could not be checked: see 'why' above."
        return f"All {len(self.steps)} steps are in place."

    def table(self) -> Table:
        shared = self.shared_reason
        table = Table(
            ("#", "step", "where", "status", "why", "plan"),
            title=f"CoCo stack on the {self.backend} backend: check → plan → apply",
            note=f"Every step: skipped, {shared}." if shared else "",
        )
        for s in self.steps:
            plan = "; ".join(" ".join(c) for c in s.commands)
            table.add(
                s.step.number, s.step.name, s.step.where, s.status.upper(),
                "(see below)" if shared else s.detail, plan, color=_COLORS.get(s.status, ""),
            )
        return table

    def to_dict(self) -> dict[str, Any]:
        return {"backend": self.backend, "steps": [s.to_dict() for s in self.steps]}

    def save(self, run_dir: str | Path) -> Path:
        path = Path(run_dir) / "coco_plan.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_dict(), indent=2) + "\n", encoding="utf-8")
        return path


# ---------------------------------------------------------------------- checks


def _get(api: ClusterApi, path: str) -> Any:
    try:
        return api.get(path)
    except ApiError as e:
        return e


def _exists(api: ClusterApi, path: str, what: str) -> Probe:
    found = _get(api, path)
    if isinstance(found, Exception):
        status = getattr(found, "status", 0)
        return Probe(NEEDED if status == 404 else UNKNOWN, f"{what}: {found}")
    return Probe(DONE, f"{what} present")


def _check_operator(config: LabConfig, api: ClusterApi) -> Probe:
    from hfl_lab.backends.kubernetes.preflight import (  # lazy: loads kubernetes
        check_coco_operator,
        check_runtime_class,
    )

    operator = check_coco_operator(api)
    runtime = check_runtime_class(api, config.runtime_class)
    if operator.ok and runtime.ok:
        return Probe(DONE, f"{operator.detail}; RuntimeClass {runtime.detail}")
    return Probe(NEEDED, operator.detail if not operator.ok else runtime.detail)


def _check_network(config: LabConfig, api: ClusterApi) -> Probe:
    flannel = _exists(api, "/apis/apps/v1/namespaces/kube-flannel/daemonsets/kube-flannel-ds",
                      "flannel DaemonSet")
    ingress = _exists(api, "/apis/networking.k8s.io/v1/ingressclasses/nginx", "IngressClass nginx")
    if flannel.status == DONE and ingress.status == DONE:
        return Probe(DONE, "flannel and ingress-nginx present")
    missing = [p.detail for p in (flannel, ingress) if p.status != DONE]
    return Probe(NEEDED, "; ".join(missing))


def _check_registry(config: LabConfig, api: ClusterApi) -> Probe:
    from hfl_lab.backends.kubernetes.preflight import check_registry  # lazy: loads kubernetes

    found = check_registry(KubernetesSettings.from_config(config))
    return Probe(DONE if found.ok else NEEDED, found.detail)


def _check_coredns(config: LabConfig, api: ClusterApi) -> Probe:
    found = _get(api, "/api/v1/namespaces/kube-system/configmaps/coredns")
    if isinstance(found, Exception):
        return Probe(UNKNOWN, f"cannot read the CoreDNS ConfigMap: {found}")
    corefile = str((found.get("data") or {}).get("Corefile", ""))
    if "hfl-lab hosts begin" in corefile:
        return Probe(DONE, "the lab's hosts block is in the Corefile")
    return Probe(NEEDED, "the Corefile has no hfl-lab hosts block")


def _check_kbs(config: LabConfig, api: ClusterApi) -> Probe:
    import urllib.error
    import urllib.request

    url = KubernetesSettings.from_config(config).kbs_url
    try:
        with urllib.request.urlopen(url, timeout=3):  # noqa: S310 - the operator's own URL
            pass
    except urllib.error.HTTPError as e:
        return Probe(DONE, f"{url} answers ({e.code})")
    except (urllib.error.URLError, OSError, ValueError) as e:
        return Probe(NEEDED, f"{url} does not answer ({getattr(e, 'reason', e)})")
    return Probe(DONE, f"{url} answers")


def _check_tool(name: str) -> Callable[[LabConfig, Any], Probe]:
    def check(config: LabConfig, api: ClusterApi) -> Probe:
        where = shutil.which(name)
        return Probe(DONE, where) if where else Probe(NEEDED, f"{name} is not installed here")

    return check


def _check_kata(key: str) -> Callable[[LabConfig, Any], Probe]:
    def check(config: LabConfig, api: ClusterApi) -> Probe:
        if not KATA_TDX_CONFIG.is_file():
            return Probe(UNKNOWN, f"{KATA_TDX_CONFIG} is not on this machine (check each host)")
        text = KATA_TDX_CONFIG.read_text(errors="replace")
        if key == "kernel_params":
            missing = [p for p in KERNEL_PARAMS if p not in text]
            return Probe(NEEDED, f"missing {', '.join(missing)}") if missing else Probe(
                DONE, "kernel_params set"
            )
        wanted = (f"default_vcpus = {GUEST_VCPUS}", f"default_memory = {GUEST_MEMORY_MIB}")
        if all(w in text for w in wanted):
            return Probe(DONE, f"{GUEST_VCPUS} vCPUs, {GUEST_MEMORY_MIB} MiB")
        return Probe(NEEDED, f"guest is not {GUEST_VCPUS} vCPUs / {GUEST_MEMORY_MIB} MiB")

    return check


# ---------------------------------------------------------------------- plans


def _registry_host(config: LabConfig) -> str:
    return config.image.split("/", 1)[0] if "/" in config.image else "registry.hfl-lab.local"


COCO_STEPS: tuple[CocoStep, ...] = (
    CocoStep(
        1, "CoCo operator", "install the operator and a CcRuntime: RuntimeClass kata-qemu-tdx",
        lambda c: [["kubectl", "apply", "-k", OPERATOR], ["kubectl", "apply", "-k", CCRUNTIME]],
        _check_operator,
    ),
    CocoStep(
        2, "flannel and ingress", "pod network, and ingress-nginx with TLS passthrough",
        lambda c: [["kubectl", "apply", "-f", FLANNEL], ["kubectl", "apply", "-f", INGRESS]],
        _check_network,
    ),
    CocoStep(
        3, "registry", "the self-hosted registry the TDs pull the (encrypted) image from",
        lambda c: [["sudo", str(NATIVE / "registry.sh"), "--port", "5000"]],
        _check_registry, where="host",
    ),
    CocoStep(
        4, "CoreDNS hosts", "resolve registry and KBS names inside pods and TDs",
        lambda c: [[str(NATIVE / "coredns_hosts.sh"), "<node-ip>", _registry_host(c).split(":")[0],
                    "<node-ip>", "kbs.hfl-lab.local"]],
        _check_coredns,
    ),
    CocoStep(
        5, "verdictd / KBS", "the key broker that gives attested TDs the image decryption key",
        lambda c: [["kubectl", "apply", "-k", "github.com/confidential-containers/trustee/"
                    "kbs/config/kubernetes/overlays/x86_64?ref=v0.11.0"]],
        _check_kbs,
    ),
    CocoStep(
        6, "skopeo", "encrypt the image layers (ocicrypt keyprovider)",
        lambda c: [["sudo", "apt-get", "install", "-y", "skopeo"]],
        _check_tool("skopeo"), where="host",
    ),
    CocoStep(
        7, "cosign", "sign the image; the TD verifies the signature before it runs it",
        lambda c: [["go", "install", "github.com/sigstore/cosign/v2/cmd/cosign@latest"]],
        _check_tool("cosign"), where="host",
    ),
    CocoStep(
        8, "kernel params", "TD guest kernel command line (measured into RTMR2)",
        lambda c: [["sudo", str(NATIVE / "kata_config.sh")]
                   + [a for p in KERNEL_PARAMS for a in ("--kernel-param", p)]],
        _check_kata("kernel_params"), where="host",
    ),
    CocoStep(
        9, "guest resources", "vCPUs and memory of each TD (ResNet training needs room)",
        lambda c: [["sudo", str(NATIVE / "kata_config.sh"), "--vcpus", str(GUEST_VCPUS),
                    "--memory", str(GUEST_MEMORY_MIB)]],
        _check_kata("guest"), where="host",
    ),
)


def plan_coco_stack(config: LabConfig, *, api: ClusterApi | None = None) -> CocoPlan:
    """Check every step and plan what is missing; changes nothing."""
    if config.backend == "local":
        return CocoPlan(
            "local",
            [StepResult(s, SKIPPED, LOCAL_REASON, s.plan(config)) for s in COCO_STEPS],
        )
    if api is None:
        from hfl_lab.backends.kubernetes.cluster_api import ClusterApi  # lazy: loads kubernetes

        try:
            api = ClusterApi.connect(config.kubeconfig, config.kube_context)
        except HflLabError as e:
            return CocoPlan(
                config.backend,
                [StepResult(s, UNKNOWN, f"not checked: {e.message}", s.plan(config))
                 for s in COCO_STEPS],
            )
    results = []
    for step in COCO_STEPS:
        try:
            probe = step.check(config, api)
        except HflLabError as e:
            probe = Probe(UNKNOWN, f"not checked: {e.message}")
        commands = step.plan(config) if probe.status != DONE else []
        results.append(StepResult(step, probe.status, probe.detail, commands))
    return CocoPlan(config.backend, results)


def apply_coco_plan(plan: CocoPlan, *, apply: bool = False, timeout_s: float = 600.0) -> CocoPlan:
    """Run the planned commands of every needed step when ``apply``; otherwise only report.

    Steps that run on the TDX hosts ("host") are run only when this machine is such a host (the
    kata configuration exists here); the others stay ``needed`` with the command to run there.
    A failing command raises ``BackendError`` naming the step, after the plan was updated.
    """
    if not apply or plan.backend == "local":
        return plan
    for result in plan.steps:
        if result.status != NEEDED:
            continue
        if result.step.where == "host" and not KATA_TDX_CONFIG.is_file():
            result.detail += " (run the plan on each TDX host)"
            continue
        if any(a.startswith("<") for c in result.commands for a in c):
            result.detail += " (fill in the <placeholders> and run the plan)"
            continue
        outputs = []
        for command in result.commands:
            if shutil.which(command[0]) is None:
                result.status = FAILED
                result.output = f"{command[0]} is not installed"
                raise BackendError(
                    f"CoCo step {result.step.number} ({result.step.name}) needs {command[0]}, "
                    "which is not installed.",
                    fix=f"install {command[0]}, or run the plan by hand: {' '.join(command)}",
                )
            done = subprocess.run(
                command, capture_output=True, text=True, timeout=timeout_s, check=False
            )
            outputs.append((done.stdout + done.stderr).strip())
            if done.returncode != 0:
                result.status = FAILED
                result.output = "\n".join(outputs)
                last = outputs[-1].splitlines()[-1] if outputs[-1] else "no output"
                raise BackendError(
                    f"CoCo step {result.step.number} ({result.step.name}) failed: "
                    f"{' '.join(command)} exited {done.returncode} ({last}).",
                    fix="read the step's output in coco_plan.json, fix the cause and re-run.",
                )
        result.status = APPLIED
        result.output = "\n".join(outputs)
    return plan


def coco_stack(
    config: LabConfig, *, apply: bool = False, api: ClusterApi | None = None
) -> CocoPlan:
    """Check → plan → (apply): the whole step of notebook 01; coco_plan.json is always written."""
    plan = plan_coco_stack(config, api=api)
    try:
        return apply_coco_plan(plan, apply=apply)
    finally:
        plan.save(config.run_dir)
