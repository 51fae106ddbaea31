"""Manifests of one run: the generated kustomization over a k8s/ overlay, and its objects.

The lab never edits k8s/. For a run it writes ``<run_dir>/kustomization.yaml`` (plus the
``config.yaml`` and ``policy.yaml`` it references) whose only resource is the chosen overlay,
and which sets the namespace, worker count, image, configuration, policy, data source,
resources and KBS address. ``kubectl apply -k <run_dir>`` deploys exactly what the backend
applies, because the backend builds that same folder with :mod:`.kustomize`.

Container contract (what the image must provide; see native/image/):
  trust service  ``python -m hfl_lab.trust serve --config C --policy P --port 50060``
  ps0            ``python -m trainer ps --config /etc/hfl-lab/config.yaml``
  worker i       ``python -m trainer worker --index i --config /etc/hfl-lab/config.yaml``
  all through /opt/hfl-lab/entrypoint.sh; config at /etc/hfl-lab/config.yaml (see
  :func:`config_document`), policy at /etc/hfl-lab/policy/policy.yaml, env HFL_LAB_ROLE,
  HFL_LAB_EVIDENCE (simulated | configfs-tsm), HFL_LAB_VAULT_DATA_PATH (userspace | kernel);
  ps0 writes the vault to /vault/model.luks; a worker touches /run/hfl-lab/ready once it is
  attested and connected (its readiness probe); a stdout line that is a ``LabEvent`` in JSON
  reaches the dashboard as that event, any other line as a "log" event. Pods belong to
  StatefulSets, which restart a container that exits: when training is over, ps0 prints a
  "lifecycle" event with state "exited" (detail "vault sealed") and then idles until teardown.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import yaml

from hfl_lab._exceptions import ConfigError
from hfl_lab.backends.kubernetes import kustomize
from hfl_lab.backends.kubernetes.kustomize import Manifest
from hfl_lab.backends.kubernetes.settings import KubernetesSettings

#: the repository's k8s/ folder
K8S_DIR = Path(__file__).resolve().parents[3] / "k8s"
TRUST_PORT = 50060
PS_PORT = 50051
VAULT_PATH = "/vault/model.luks"
READY_FILE = "/run/hfl-lab/ready"
KERNEL_PARAMS_ANNOTATION = "io.katacontainers.config.hypervisor.kernel_params"


def config_document(settings: KubernetesSettings) -> dict[str, Any]:
    """What /etc/hfl-lab/config.yaml holds: where things are, plus the lab's own config."""
    ns = settings.namespace
    return {
        "deployment": {
            "namespace": ns,
            "workers": settings.workers,
            "overlay": settings.overlay,
            "evidence": "configfs-tsm" if settings.uses_tdx else "simulated",
            "vault_path": VAULT_PATH,
            "vault_data_path": "kernel" if settings.uses_tdx else "userspace",
            "trust_address": f"trust.{ns}.svc:{TRUST_PORT}",
            "ps_address": f"ps0.{ns}.svc:{PS_PORT}",
            "policy_path": "/etc/hfl-lab/policy/policy.yaml",
            "data_dir": "/data",
            "data_source": settings.data_source,
            "ready_file": READY_FILE,
        },
        "lab": dict(settings.lab_config),
    }


def overlay_dir(settings: KubernetesSettings, k8s_dir: Path = K8S_DIR) -> Path:
    path = k8s_dir / "overlays" / settings.overlay
    if not (path / "kustomization.yaml").is_file():
        raise ConfigError(
            f"overlay {settings.overlay!r} not found at {path}; run from a checkout of the lab "
            "or pass the k8s/ folder."
        )
    return path


def _index_of(items: list[dict[str, Any]], name: str, what: str) -> int:
    for i, item in enumerate(items):
        if item.get("name") == name:
            return i
    raise ConfigError(f"the overlay has no {what} named {name!r}; k8s/ and the lab disagree.")


def _pod_spec(objects: list[Manifest], name: str) -> dict[str, Any]:
    for obj in objects:
        if obj["kind"] == "StatefulSet" and obj["metadata"]["name"] == name:
            spec: dict[str, Any] = obj["spec"]["template"]["spec"]
            return spec
    raise ConfigError(f"the overlay has no StatefulSet {name!r}; k8s/ and the lab disagree.")


def run_kustomization(settings: KubernetesSettings, k8s_dir: Path, out_dir: Path) -> dict[str, Any]:
    """The generated kustomization for ``settings`` (written by :func:`write_run`)."""
    base = kustomize.build(overlay_dir(settings, k8s_dir))
    image = settings.image_ref
    image_name = _pod_spec(base, "trust")["containers"][0]["image"]
    current = kustomize.image_name(image_name)
    entry: dict[str, Any] = {"name": current, "newName": image.name}
    if image.tag:
        entry["newTag"] = image.tag
    if image.digest:
        entry["digest"] = image.digest
    worker_pod = _pod_spec(base, "worker")
    data_index = _index_of(worker_pod["volumes"], "data", "worker volume")
    data_path = f"/spec/template/spec/volumes/{data_index}"
    patches: list[dict[str, Any]] = [
        _patch(
            "worker",
            [
                {"op": "test", "path": f"{data_path}/name", "value": "data"},
                {"op": "replace", "path": data_path, "value": settings.data_volume()},
            ],
        )
    ]
    for name, resources in (
        ("ps", settings.ps_resources),
        ("worker", settings.worker_resources),
        ("trust", settings.trust_resources),
    ):
        if resources is not None:
            patches.append(
                _patch(
                    name,
                    [
                        {
                            "op": "replace",
                            "path": "/spec/template/spec/containers/0/resources",
                            "value": resources.to_manifest(),
                        }
                    ],
                )
            )
    annotations = _pod_spec_meta(base, "ps").get("annotations") or {}
    if KERNEL_PARAMS_ANNOTATION in annotations:
        params = annotations[KERNEL_PARAMS_ANNOTATION]
        new = _with_kbs(params, settings.kbs_url)
        escaped = KERNEL_PARAMS_ANNOTATION.replace("~", "~0").replace("/", "~1")
        for name in ("trust", "ps", "worker"):
            patches.append(
                _patch(
                    name,
                    [
                        {
                            "op": "replace",
                            "path": f"/spec/template/metadata/annotations/{escaped}",
                            "value": new,
                        }
                    ],
                )
            )
    return {
        "apiVersion": "kustomize.config.k8s.io/v1beta1",
        "kind": "Kustomization",
        "namespace": settings.namespace,
        "resources": [os.path.relpath(overlay_dir(settings, k8s_dir), out_dir)],
        "images": [entry],
        "replicas": [{"name": "worker", "count": settings.workers}],
        "configMapGenerator": [
            {"name": "hfl-config", "behavior": "replace", "files": ["config.yaml"]},
            {"name": "hfl-policy", "behavior": "replace", "files": ["policy.yaml"]},
        ],
        "generatorOptions": {"disableNameSuffixHash": True},
        "patches": patches,
    }


def _pod_spec_meta(objects: list[Manifest], name: str) -> dict[str, Any]:
    for obj in objects:
        if obj["kind"] == "StatefulSet" and obj["metadata"]["name"] == name:
            meta: dict[str, Any] = obj["spec"]["template"].get("metadata") or {}
            return meta
    raise ConfigError(f"the overlay has no StatefulSet {name!r}; k8s/ and the lab disagree.")


def _with_kbs(kernel_params: str, kbs_url: str) -> str:
    parts = []
    for param in kernel_params.split():
        if param.startswith("agent.aa_kbc_params="):
            param = f"agent.aa_kbc_params=cc_kbc::{kbs_url}"
        parts.append(param)
    return " ".join(parts)


def _patch(name: str, ops: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "target": {"group": "apps", "version": "v1", "kind": "StatefulSet", "name": name},
        "patch": yaml.safe_dump(ops, sort_keys=False),
    }


def write_run(settings: KubernetesSettings, k8s_dir: Path = K8S_DIR) -> Path:
    """Write the run's kustomization folder (settings.run_dir, or a new temporary one)."""
    out = settings.run_dir or Path(tempfile.mkdtemp(prefix="hfl-lab-k8s-"))
    out.mkdir(parents=True, exist_ok=True)
    spec = run_kustomization(settings, k8s_dir, out)
    (out / "config.yaml").write_text(yaml.safe_dump(config_document(settings), sort_keys=False))
    (out / "policy.yaml").write_text(settings.policy_yaml)
    (out / "kustomization.yaml").write_text(
        "# Generated by hfl-lab from LabConfig for one run; `kubectl apply -k` this folder.\n"
        + yaml.safe_dump(spec, sort_keys=False)
    )
    return out


def render(settings: KubernetesSettings, k8s_dir: Path = K8S_DIR) -> list[Manifest]:
    """Every object of the run, exactly as ``kustomize build`` of the written folder."""
    return kustomize.build(write_run(settings, k8s_dir))
