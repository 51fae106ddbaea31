"""Manifests of one run: the generated kustomization over a k8s/ overlay, and its objects.

The lab never edits k8s/. For a run it writes ``<run_dir>/kustomization.yaml`` (plus the
``config.yaml`` and ``policy.yaml`` it references) whose only resource is the chosen overlay,
and which sets the namespace, worker count, image, configuration, policy, data source,
resources and KBS address. ``kubectl apply -k <run_dir>`` deploys exactly what the backend
applies, because the backend builds that same folder with :mod:`.kustomize`.

``config.yaml`` is the participant config document
(``trainer.participant_config.ParticipantConfig``): the Services' DNS names and ports, the
evidence source (simulated under runc, configfs-tsm in a TD), where ps0 keeps the vault and where
CIFAR-10 is, plus the run's LabConfig. Its whole content is what each participant's MR_CONFIG_ID
measures. Unless the owner gives a policy, ``policy.yaml`` is derived from that same document and
from the command lines the rendered pods run (:mod:`.measurements`), as the local backend
derives its own.

Container contract (what the image must provide; see native/image/):
  trust service  ``python -m trainer trust --config C --policy P --port 50060``
  ps0            ``python -m trainer ps --config /etc/hfl-lab/config.yaml``
  worker i       ``python -m trainer worker --index i --config /etc/hfl-lab/config.yaml``
  all through /opt/hfl-lab/entrypoint.sh; policy at /etc/hfl-lab/policy/policy.yaml; env
  HFL_LAB_ROLE, HFL_LAB_EVIDENCE (simulated | configfs-tsm), HFL_LAB_VAULT_DATA_PATH (userspace |
  kernel), HFL_LAB_BOOTSTRAP_FILE (the bootstrap Secret volume, see :mod:`.bootstrap`); ps0
  keeps the vault at /vault/model.luks and stays up after training; a worker touches
  /run/hfl-lab/ready once it is attested and registered (its readiness probe), and its
  entrypoint idles after the worker finished (a StatefulSet restarts a container that exits); a
  stdout line that is a ``LabEvent`` in JSON reaches the dashboard as that event, any other line
  as a "log" event.
"""

from __future__ import annotations

import base64
import copy
import dataclasses
import gzip
import json
import os
import re
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from hfl_lab._exceptions import ConfigError, VaultError
from hfl_lab.backends.kubernetes import image as image_tools
from hfl_lab.backends.kubernetes import kustomize, measurements
from hfl_lab.backends.kubernetes.kustomize import Manifest
from hfl_lab.backends.kubernetes.settings import KubernetesSettings
from hfl_lab.config import LabConfig
from hfl_lab.tee.policy import SIGNATURE_SUFFIX, AttestationPolicy, sign_file
from hfl_lab.vault.keyrelease import release_policy_from
from trainer.participant_config import Deployment, ParticipantConfig

#: the repository's k8s/ folder
K8S_DIR = Path(__file__).resolve().parents[3] / "k8s"
TRUST_PORT = 50060
PS_PORT = 50051
#: in-container paths (prefixed with ``settings.mount_root``)
CONFIG_FILE = "/etc/hfl-lab/config.yaml"
POLICY_FILE = "/etc/hfl-lab/policy/policy.yaml"
#: the model volume's release policy (ps0's measurements), next to the policy in hfl-policy
VOLUME_POLICY_FILE = "/etc/hfl-lab/policy/volume_policy.yaml"
#: the trust service's sealed state, on the trust-state PVC
TRUST_STATE_FILE = "/var/lib/hfl-lab/trust/state.sealed"
BOOTSTRAP_FILE = "/etc/hfl-lab/bootstrap/bootstrap.json"
DATA_DIR = "/data"
VAULT_PATH = "/vault/model.luks"
CHECKPOINT_DIR = "/vault/checkpoints"
RUN_DIR = "/run/hfl-lab"
READY_FILE = "/run/hfl-lab/ready"
POD_PATH_ROOTS = ("/etc/hfl-lab", DATA_DIR, "/vault", RUN_DIR, "/var/lib/hfl-lab")
KERNEL_PARAMS_ANNOTATION = "io.katacontainers.config.hypervisor.kernel_params"
#: CoCo initdata (gzip + base64 of the TOML); the TD reports its SHA-384 as MRCONFIGID
INITDATA_ANNOTATION = "io.katacontainers.config.hypervisor.cc_init_data"
STATEFULSETS = ("trust", "ps", "worker")


@dataclass(frozen=True)
class RenderedRun:
    """One run's folder and objects, and what the owner's policy was derived from."""

    folder: Path
    objects: list[Manifest]
    document: dict[str, Any]
    policy: AttestationPolicy
    #: role → the argv its container runs (after the kubelet's $(VAR) expansion)
    commands: dict[str, list[str]]
    derived_policy: bool
    #: who may receive the model volume's passphrase (ps0 only); None without the vault or
    #: when the policy cannot guard it (``volume_policy_error`` says why)
    volume_policy: AttestationPolicy | None = None
    volume_policy_error: str = ""
    volume_policy_fix: str = ""
    #: StatefulSet → its pods' CoCo initdata (the TDX overlays; empty under runc)
    initdata: dict[str, str] = field(default_factory=dict)


def pod_path(settings: KubernetesSettings, path: str) -> str:
    """An in-container path of the lab under ``settings.mount_root``."""
    return settings.mount_root + path


def lab_for_pods(settings: KubernetesSettings) -> LabConfig:
    """The run's LabConfig as the pods see it: their data folder, no owner's machine paths."""
    values = dict(settings.lab_config)
    values.update(
        backend="kubernetes",
        workers=settings.workers,
        data_path=pod_path(settings, DATA_DIR),
        run_dir=pod_path(settings, RUN_DIR),
        policy_path=None,
        kubeconfig=None,
        kube_context=None,
        namespace=settings.namespace,
        image=settings.image,
        k8s_overlay=settings.overlay,
        runtime_class=settings.runtime_class,
    )
    lab = LabConfig.from_dict(values)
    if not settings.uses_tdx and not lab.allow_simulated:
        raise ConfigError(
            "the runc overlay runs simulated TDs, and allow_simulated is False.",
            fix="set allow_simulated=True, or use the kata-qemu-tdx overlay on a TDX cluster.",
        )
    return lab


def deployment_for(settings: KubernetesSettings, lab: LabConfig) -> Deployment:
    """Where things are in the cluster: Service DNS names and ports, evidence, vault, data."""
    ns = settings.namespace

    def address(service: str, port: int) -> str:
        return f"{settings.service_host or f'{service}.{ns}.svc'}:{port}"

    return Deployment(
        trust_address=address("trust", TRUST_PORT),
        ps_address=address("ps0", PS_PORT),
        workers=settings.workers,
        evidence="configfs-tsm" if settings.uses_tdx else "simulated",
        namespace=ns,
        overlay=settings.overlay,
        vault_path=pod_path(settings, VAULT_PATH) if lab.vault else "",
        vault_data_path="kernel" if settings.uses_tdx else "userspace",
        vault_size_mb=lab.vault_size_mb if lab.vault else 0,
        checkpoint_dir="" if lab.vault else pod_path(settings, CHECKPOINT_DIR),
        policy_path=pod_path(settings, POLICY_FILE),
        policy_key=settings.policy_key,
        data_dir=pod_path(settings, DATA_DIR),
        data_source=settings.data_source,
        ready_file=pod_path(settings, READY_FILE),
        connect_timeout_s=settings.connect_timeout_s,
    )


def write_config(settings: KubernetesSettings, path: Path) -> dict[str, Any]:
    """Write the participant config document to ``path``; the document as participants read it."""
    lab = lab_for_pods(settings)
    ParticipantConfig.write(path, deployment_for(settings, lab), lab)
    return dict(ParticipantConfig.load(path).measured())


def config_document(settings: KubernetesSettings) -> dict[str, Any]:
    """What /etc/hfl-lab/config.yaml holds (see :func:`write_config`)."""
    with tempfile.TemporaryDirectory(prefix="hfl-lab-config-") as folder:
        return write_config(settings, Path(folder) / "config.yaml")


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
    vault = lab_for_pods(settings).vault
    base = kustomize.build(overlay_dir(settings, k8s_dir))
    image = settings.image_ref
    image_name = _pod_spec(base, "trust")["containers"][0]["image"]
    current = kustomize.image_name(image_name)
    entry: dict[str, Any] = {"name": current, "newName": image.name}
    if image.tag:
        entry["newTag"] = image.tag
    if image.digest:
        entry["digest"] = image.digest
    patches: list[dict[str, Any]] = []
    if settings.mount_root:
        for name in STATEFULSETS:
            container = _reroot(_pod_spec(base, name)["containers"][0], settings.mount_root)
            patches.append(
                _patch(name, [{"op": "replace", "path": "/spec/template/spec/containers/0",
                               "value": container}])
            )
    for name in ("ps", "worker"):
        index = _index_of(_pod_spec(base, name)["volumes"], "data", f"{name} volume")
        path = f"/spec/template/spec/volumes/{index}"
        patches.append(
            _patch(
                name,
                [
                    {"op": "test", "path": f"{path}/name", "value": "data"},
                    {"op": "replace", "path": path, "value": settings.data_volume()},
                ],
            )
        )
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
    if vault:
        # the trust service generates the volume's passphrase in its TD, for ps0 only
        patches.append(_patch("trust", [
            {"op": "add", "path": "/spec/template/spec/containers/0/args/-", "value": v}
            for v in ("--volume-policy", pod_path(settings, VOLUME_POLICY_FILE))
        ]))
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
    generators = _image_generator(settings, out_dir)
    policy_files = ["policy.yaml"]
    if vault:
        policy_files.append("volume_policy.yaml")
    if settings.policy_key:  # the owner's signatures travel with the policies
        policy_files += [f"{name}{SIGNATURE_SUFFIX}" for name in policy_files]
    return {
        "apiVersion": "kustomize.config.k8s.io/v1beta1",
        "kind": "Kustomization",
        "namespace": settings.namespace,
        "resources": [os.path.relpath(overlay_dir(settings, k8s_dir), out_dir)],
        "images": [entry],
        "replicas": [{"name": "worker", "count": settings.workers}],
        "configMapGenerator": [
            {"name": "hfl-config", "behavior": "replace", "files": ["config.yaml"]},
            {"name": "hfl-policy", "behavior": "replace", "files": policy_files},
            *generators,
        ],
        "generatorOptions": {"disableNameSuffixHash": True},
        "patches": patches,
    }


#: the published image's public files the hfl-image ConfigMap carries: file → ConfigMap key
IMAGE_FILES = {"policy.json": "policy.json", "policy-sigstore.json": "policy-sigstore.json",
               "signer.asc": "signer.asc", "cosign.pub": "cosign.pub"}
_IMAGE_FILE_MEANING = {
    "policy.json": "signedBy the owner's GPG key made for the run (simple signing)",
    "policy-sigstore.json": "sigstoreSigned by cosign.pub",
    "signer.asc": "the owner's GPG public key",
    "cosign.pub": "the owner's cosign public key",
}


def _published_digest(image_dir: Path) -> str | None:
    """The signed digest ``image_dir/pipeline.json`` records (None: no readable record)."""
    try:
        record = json.loads((image_dir / "pipeline.json").read_text())
        return str(record["source"]["digest"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _image_generator(settings: KubernetesSettings, out_dir: Path) -> list[dict[str, Any]]:
    """On the encrypted+signed overlay, when the run deploys the image published into
    ``image_dir`` (its ``pipeline.json`` records the digest ``settings.image`` pins): the
    ``hfl-image`` ConfigMap with its public signature policies and an ``image.yaml`` naming
    the image and where its key is held, copied into the run folder's ``image/`` (kustomize
    reads files under its root only)."""
    if settings.overlay != measurements.SIGNED_OVERLAY or settings.image_dir is None:
        return []
    if not (settings.image_dir / "policy.json").is_file():
        return []
    if _published_digest(settings.image_dir) != settings.image_ref.digest:
        return []  # the files describe another image than the one the run deploys
    present = {name: key for name, key in IMAGE_FILES.items()
               if (settings.image_dir / name).is_file()}
    files = []
    (out_dir / "image").mkdir(exist_ok=True)
    for name, key in present.items():
        local = f"image/{name}"
        (out_dir / local).write_bytes((settings.image_dir / name).read_bytes())
        files.append(f"{key}={local}")
    document = image_tools.image_artefacts(
        settings.image, {key: _IMAGE_FILE_MEANING[name] for name, key in present.items()})
    (out_dir / "image" / "image.yaml").write_text(
        "# The participant image of this run and where its keys are (public; hfl-lab)\n"
        + yaml.safe_dump(document, sort_keys=False))
    files.insert(0, "image.yaml=image/image.yaml")
    return [{"name": "hfl-image", "behavior": "replace", "files": files}]


def initdata_patches(initdata: dict[str, str], objects: list[Manifest]) -> list[dict[str, Any]]:
    """Each StatefulSet's own initdata as its pods' annotation (gzip + base64, as kata reads it)."""
    escaped = INITDATA_ANNOTATION.replace("~", "~0").replace("/", "~1")
    patches: list[dict[str, Any]] = []
    for name, text in initdata.items():
        value = base64.b64encode(gzip.compress(text.encode(), mtime=0)).decode()
        op: dict[str, Any]
        if "annotations" in _pod_spec_meta(objects, name):
            op = {"op": "add", "path": f"/spec/template/metadata/annotations/{escaped}",
                  "value": value}
        else:
            op = {"op": "add", "path": "/spec/template/metadata/annotations",
                  "value": {INITDATA_ANNOTATION: value}}
        patches.append(_patch(name, [op]))
    return patches


def _write_kustomization(out: Path, spec: dict[str, Any]) -> None:
    (out / "kustomization.yaml").write_text(
        "# Generated by hfl-lab from LabConfig for one run; `kubectl apply -k` this folder.\n"
        + yaml.safe_dump(spec, sort_keys=False)
    )


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


def _reroot(container: dict[str, Any], root: str) -> dict[str, Any]:
    """``container`` with every in-container path of the lab moved under ``root``."""

    def move(value: Any) -> Any:
        if isinstance(value, str):
            for prefix in POD_PATH_ROOTS:
                if value == prefix or value.startswith(prefix + "/"):
                    return root + value
            return value
        if isinstance(value, list):
            return [move(v) for v in value]
        if isinstance(value, dict):
            return {k: move(v) for k, v in value.items()}
        return value

    out = copy.deepcopy(container)
    for key in ("args", "env", "volumeMounts", "readinessProbe", "livenessProbe"):
        if key in out:
            out[key] = move(out[key])
    return out


_VAR = re.compile(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)")
_POD_INDEX_FIELD = "metadata.labels['apps.kubernetes.io/pod-index']"


def container_env(container: dict[str, Any], pod_index: int) -> dict[str, str]:
    """The main container's environment as the kubelet sets it for the pod with ``pod_index``."""
    env: dict[str, str] = {}
    for item in container.get("env") or []:
        if "value" in item:
            env[item["name"]] = _VAR.sub(lambda m: env.get(m[1], m[0]), str(item["value"]))
            continue
        field = ((item.get("valueFrom") or {}).get("fieldRef") or {}).get("fieldPath")
        if field != _POD_INDEX_FIELD:
            raise ConfigError(
                f"env {item['name']} comes from {item.get('valueFrom')}, which the lab cannot "
                "measure; k8s/ and the lab disagree."
            )
        env[item["name"]] = str(pod_index)
    return env


def container_commands(objects: list[Manifest], workers: int) -> dict[str, list[str]]:
    """Role → the argv of its participant process, as the kubelet expands the container args."""

    def argv(name: str, index: int) -> list[str]:
        container = _pod_spec(objects, name)["containers"][0]
        env = container_env(container, index)
        args = [_VAR.sub(lambda m: env.get(m[1], m[0]), str(a))
                for a in container.get("args") or []]
        if args[:2] != ["python", "-m"] or len(args) < 3:
            raise ConfigError(
                f"the {name} container runs {args[:3]}, not `python -m <participant>`; k8s/ and "
                "the lab disagree."
            )
        return args

    commands = {"trust": argv("trust", 0), "ps0": argv("ps", 0)}
    for i in range(workers):
        commands[f"worker{i}"] = argv("worker", i)
    return commands


def render_run(settings: KubernetesSettings, k8s_dir: Path = K8S_DIR,
               signing_key: Ed25519PrivateKey | None = None) -> RenderedRun:
    """Write the run's kustomization folder (settings.run_dir, or a new temporary one), derive
    the owner's policy unless one was given, and build the objects. With the owner's
    ``signing_key`` its public half goes into the measured config and every policy file is
    signed (``.sig`` beside it), so the pods take no policy the owner did not sign."""
    if signing_key is not None:
        public = signing_key.public_key().public_bytes(serialization.Encoding.Raw,
                                                       serialization.PublicFormat.Raw).hex()
        settings = dataclasses.replace(settings, policy_key=public)
    out = settings.run_dir or Path(tempfile.mkdtemp(prefix="hfl-lab-k8s-"))
    out.mkdir(parents=True, exist_ok=True)
    spec = run_kustomization(settings, k8s_dir, out)
    document = write_config(settings, out / "config.yaml")
    _write_kustomization(out, spec)
    policy_file = out / "policy.yaml"
    derived = settings.policy_yaml is None
    if not derived:
        policy_file.write_text(str(settings.policy_yaml))
    else:
        # the policy is only the hfl-policy ConfigMap's content: build once to read what each
        # container runs, derive the policy from that and the document, then build for real
        policy_file.write_text("tee_type: TDX\n")
    volume_file = out / "volume_policy.yaml"
    if lab_for_pods(settings).vault:
        volume_file.write_text("tee_type: TDX\n")  # replaced below, once the policy is known
    if settings.policy_key:  # replaced below by the owner's signatures
        for placeholder in (policy_file, volume_file):
            if placeholder.exists():
                placeholder.with_name(placeholder.name + SIGNATURE_SUFFIX).write_text("\n")
    first = kustomize.build(out)
    commands = container_commands(first, settings.workers)
    # each role's initdata pins what its container runs, as built: patched in, built again
    initdata = measurements.role_initdata(settings, document, {
        name: _pod_spec(first, name)["containers"][0] for name in STATEFULSETS})
    if initdata:
        spec["patches"] = [*spec["patches"], *initdata_patches(initdata, first)]
        _write_kustomization(out, spec)
    if derived:
        policy = measurements.reference_policy(settings, document, commands, initdata=initdata)
        policy.save(policy_file)
    else:
        policy = AttestationPolicy.from_dict(settings.policy_document())
    if signing_key is not None:
        policy.save_signed(policy_file, signing_key)
    volume_policy, volume_error, volume_fix = None, "", ""
    if volume_file.exists():
        try:
            volume_policy = release_policy_from(policy)
        except VaultError as error:
            # the trust service refuses this file at its start: nobody gets a passphrase
            volume_file.write_text(f"# not derived: {error.message}\ntee_type: TDX\n")
            volume_error, volume_fix = error.message, error.fix or ""
        else:
            volume_policy.save(volume_file)
        if signing_key is not None:
            sign_file(volume_file, signing_key)
    objects = kustomize.build(out)
    return RenderedRun(out, objects, document, policy, commands, derived, volume_policy,
                       volume_error, volume_fix, initdata)


def write_run(settings: KubernetesSettings, k8s_dir: Path = K8S_DIR) -> Path:
    """Write the run's kustomization folder; its path."""
    return render_run(settings, k8s_dir).folder


def render(settings: KubernetesSettings, k8s_dir: Path = K8S_DIR) -> list[Manifest]:
    """Every object of the run, exactly as ``kustomize build`` of the written folder."""
    return render_run(settings, k8s_dir).objects
