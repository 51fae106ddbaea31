"""What the Kubernetes backend needs to know: its own settings, or taken from a LabConfig."""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from hfl_lab._exceptions import ConfigError
from hfl_lab.config import LabConfig

#: overlays under k8s/overlays/, in order of increasing protection
OVERLAYS = ("runc", "kata-qemu-tdx", "kata-qemu-tdx-encrypted-signed")
DEFAULT_IMAGE = "registry.hfl-lab.local:5000/hfl-lab:0.1.0"
DEFAULT_DATA_SOURCE = "pvc:cifar10"
MAX_WORKERS = 64

_DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$")
# [host[:port]/]path[:tag][@sha256:hex]; loose on purpose, the registry has the last word
_IMAGE = re.compile(
    r"^(?:(?P<host>[a-zA-Z0-9.-]+(?::[0-9]+)?)/)?(?P<path>[a-z0-9]+(?:[._/-][a-z0-9]+)*)"
    r"(?::(?P<tag>[\w][\w.-]{0,127}))?(?:@(?P<digest>sha256:[0-9a-f]{64}))?$"
)
_HOST = re.compile(r"^[A-Za-z0-9]([A-Za-z0-9.-]{0,251}[A-Za-z0-9])?$")
_QUANTITY = re.compile(r"^[0-9]+(\.[0-9]+)?(m|Ki|Mi|Gi|Ti|k|M|G|T)?$")


@dataclass(frozen=True)
class ContainerResources:
    """Requests and limits of one participant's main container (Kubernetes quantities)."""

    cpu_request: str
    cpu_limit: str
    memory_request: str
    memory_limit: str

    def __post_init__(self) -> None:
        for name in ("cpu_request", "cpu_limit", "memory_request", "memory_limit"):
            value = getattr(self, name)
            if not isinstance(value, str) or not _QUANTITY.match(value):
                raise ConfigError(
                    f"resource {name}={value!r} is not a Kubernetes quantity; "
                    "use e.g. '500m' or '2' for CPU and '512Mi' or '4Gi' for memory."
                )

    def to_manifest(self) -> dict[str, dict[str, str]]:
        return {
            "requests": {"cpu": self.cpu_request, "memory": self.memory_request},
            "limits": {"cpu": self.cpu_limit, "memory": self.memory_limit},
        }


@dataclass(frozen=True)
class ImageRef:
    """A container image reference split into its parts."""

    registry: str | None
    repository: str
    tag: str | None
    digest: str | None

    @classmethod
    def parse(cls, ref: str) -> ImageRef:
        match = _IMAGE.match(ref)
        if match is None:
            raise ConfigError(
                f"image {ref!r} is not a container image reference; "
                "use registry[:port]/name[:tag][@sha256:digest]."
            )
        host = match["host"]
        path = match["path"]
        # "name/x" without a dot, colon or localhost in the first part is a Docker Hub path
        if host is not None and "." not in host and ":" not in host and host != "localhost":
            path, host = f"{host}/{path}", None
        return cls(host, path, match["tag"], match["digest"])

    @property
    def name(self) -> str:
        """Registry and repository, without tag or digest (kustomize's ``newName``)."""
        return f"{self.registry}/{self.repository}" if self.registry else self.repository


@dataclass(frozen=True)
class KubernetesSettings:
    """The parameters of one Kubernetes deployment of the lab; validated on creation."""

    namespace: str = "hfl-lab"
    workers: int = 2
    image: str = DEFAULT_IMAGE
    overlay: str = "runc"
    runtime_class: str = "kata-qemu-tdx"
    #: where ps0 and the workers read CIFAR-10 (python version; the lab never downloads it):
    #: "pvc:<claim>" (a ReadOnlyMany claim holding it) or "hostpath:/abs/path" (the path must
    #: exist on every node that runs a participant)
    data_source: str = DEFAULT_DATA_SOURCE
    #: the owner's attestation policy (YAML); None: derived for this run (see render.py)
    policy_yaml: str | None = None
    #: kubeconfig file; None: in-cluster credentials when running in a pod, else ~/.kube/config
    kubeconfig: str | None = None
    context: str | None = None
    #: registry host[:port] that preflight checks; None: the image's registry
    registry: str | None = None
    registry_insecure: bool = False
    ps_resources: ContainerResources | None = None
    worker_resources: ContainerResources | None = None
    trust_resources: ContainerResources | None = None
    #: the lab's own configuration (LabConfig as a mapping), passed to the trainer verbatim
    lab_config: Mapping[str, Any] = field(default_factory=dict)
    #: the KBS the guest's attestation agent asks for image keys (encrypted overlay)
    kbs_url: str = "http://kbs.hfl-lab.local:8080"
    #: where the TDX overlays' verifiers fetch their own DCAP collateral (the derived policy's
    #: ``pccs_url``): the cluster's PCCS, or Intel's PCS when the pods reach the internet
    pccs_url: str = "https://api.trustedservices.intel.com"
    #: on the TDX overlays, where the agent policy denies exec into a TD, a plain (non-TD) pod
    #: of this image (it needs sha256sum and tar) reads the sealed files off their volumes;
    #: they are ciphertext, checked by the owner, so the path may be untrusted. Mirror it into
    #: your registry for an air-gapped cluster.
    reader_image: str = "busybox:1.36"
    #: the owner's policy-signing public key (hex; set by the backend from the owner's
    #: credential): in the measured config, so the pods take only the policies the owner signed
    policy_key: str = ""
    #: how the owner's machine reaches the trust service's TLS port to provision it, as
    #: "host:port" (e.g. the ingress's TLS passthrough, trust.hfl-tdx-coco.service.com:443);
    #: "" (default): a port-forward through the Kubernetes API server. Either way the path is
    #: untrusted: the owner verifies the service's evidence and pins its certificate first.
    trust_endpoint: str = ""
    #: the run's ``image/`` folder where the owner published the encrypted, signed image
    #: (notebook 03; :mod:`.workload_image`): the encrypted+signed overlay's ``hfl-image``
    #: ConfigMap carries its public signature policies. None, or no ``policy.json`` there: the
    #: overlay's placeholders, which refuse every image
    image_dir: Path | None = None
    #: where the generated kustomization of a run is written; None: a temporary folder
    run_dir: Path | None = None
    poll_interval_s: float = 1.0
    field_manager: str = "hfl-lab"
    #: how long a participant keeps trying to reach the trust service / ps0 (TDs boot slowly)
    connect_timeout_s: float = 600.0
    #: the host participants dial instead of the Services' DNS names (``trust.<ns>.svc``,
    #: ``ps0.<ns>.svc``); None in a cluster. Set, with ``mount_root``, to run the rendered pods'
    #: commands as local processes (tests/test_k8s_pods_as_processes.py does).
    service_host: str | None = None
    #: a folder prefixed to every in-container path of the lab (/etc/hfl-lab, /data, /vault,
    #: /run/hfl-lab) in the rendered manifests and config; "" in a cluster
    mount_root: str = ""

    def __post_init__(self) -> None:
        if not isinstance(self.namespace, str) or not _DNS_LABEL.match(self.namespace):
            raise ConfigError(
                f"namespace {self.namespace!r} is not a DNS label; use lower-case letters, "
                "digits and '-', at most 63 characters."
            )
        if (
            isinstance(self.workers, bool)
            or not isinstance(self.workers, int)
            or not (1 <= self.workers <= MAX_WORKERS)
        ):
            raise ConfigError(
                f"workers={self.workers!r} is out of range; use an integer 1..{MAX_WORKERS}."
            )
        if self.overlay not in OVERLAYS:
            raise ConfigError(
                f"k8s overlay {self.overlay!r} is unknown; use one of {', '.join(OVERLAYS)}."
            )
        if not _DNS_LABEL.match(self.runtime_class):
            raise ConfigError(f"runtime class {self.runtime_class!r} is not a DNS label.")
        ImageRef.parse(self.image)
        self.data_volume()
        if self.policy_yaml is not None:
            self.policy_document()
        if self.poll_interval_s <= 0:
            raise ConfigError("poll_interval_s must be positive.")
        if self.connect_timeout_s <= 0:
            raise ConfigError("connect_timeout_s must be positive; use e.g. 600.")
        if self.service_host is not None and not _HOST.match(self.service_host):
            raise ConfigError(
                f"service_host {self.service_host!r} is not a host name or IPv4 address."
            )
        if self.trust_endpoint:
            host, _, port = self.trust_endpoint.rpartition(":")
            if not (_HOST.match(host) and port.isdigit() and 0 < int(port) < 65536):
                raise ConfigError(
                    f"trust_endpoint {self.trust_endpoint!r} is not host:port; use e.g. "
                    "trust.hfl-tdx-coco.service.com:443, or '' for a port-forward."
                )
        if self.mount_root and (
            not self.mount_root.startswith("/")
            or self.mount_root.endswith("/")
            or any(c.isspace() for c in self.mount_root)
        ):
            raise ConfigError(
                f"mount_root {self.mount_root!r} must be '' or an absolute folder path without "
                "a trailing '/' or spaces."
            )

    # -- derived values -----------------------------------------------------------------

    @property
    def image_ref(self) -> ImageRef:
        return ImageRef.parse(self.image)

    @property
    def registry_host(self) -> str | None:
        return self.registry or self.image_ref.registry

    @property
    def uses_tdx(self) -> bool:
        return self.overlay != "runc"

    @property
    def worker_roles(self) -> list[str]:
        return [f"worker{i}" for i in range(self.workers)]

    def data_volume(self) -> dict[str, Any]:
        """The ``data`` volume of the ps0 and worker pods for ``data_source``."""
        source = self.data_source
        kind, _, arg = source.partition(":")
        if kind == "pvc" and _DNS_LABEL.match(arg):
            return {"name": "data", "persistentVolumeClaim": {"claimName": arg, "readOnly": True}}
        if kind == "hostpath" and arg.startswith("/"):
            return {"name": "data", "hostPath": {"path": arg, "type": "Directory"}}
        raise ConfigError(
            f"data source {source!r} is not understood; use 'pvc:<claim-name>' or "
            "'hostpath:/absolute/path' (a folder holding the CIFAR-10 python version)."
        )

    def policy_document(self) -> dict[str, Any]:
        if self.policy_yaml is None:
            raise ConfigError("no attestation policy was given; the renderer derives one.")
        try:
            doc = yaml.safe_load(self.policy_yaml)
        except yaml.YAMLError as exc:
            raise ConfigError(
                f"the attestation policy is not valid YAML ({exc.__class__.__name__}); "
                "fix the policy file."
            ) from None
        if not isinstance(doc, dict):
            raise ConfigError("the attestation policy must be a YAML mapping of field: value.")
        return doc

    # -- from LabConfig -----------------------------------------------------------------

    @classmethod
    def from_config(cls, config: LabConfig) -> KubernetesSettings:
        """Settings from the lab's parameters: ``namespace``, ``workers``, ``image``,
        ``k8s_overlay``, ``runtime_class``, ``kubeconfig``, ``kube_context``, ``data_path`` (an
        absolute path is a host path), ``policy_path`` (a YAML file, read now) and ``run_dir``
        (its ``k8s/`` the run's kustomization, its ``image/`` the published image's files);
        the rest keep their defaults. All of ``config`` becomes ``lab_config``."""
        kw: dict[str, Any] = {
            "namespace": config.namespace,
            "workers": config.workers,
            "image": config.image,
            "overlay": config.k8s_overlay,
            "runtime_class": config.runtime_class,
            "run_dir": Path(config.run_dir) / "k8s",
            "image_dir": Path(config.run_dir) / "image",
            "lab_config": {str(k): _plain(v) for k, v in config.to_dict().items()},
        }
        if config.kubeconfig is not None:
            kw["kubeconfig"] = config.kubeconfig
        if config.kube_context is not None:
            kw["context"] = config.kube_context
        if config.data_path:
            text = config.data_path
            kw["data_source"] = f"hostpath:{text}" if text.startswith("/") else text
        if config.policy_path is not None:
            try:
                kw["policy_yaml"] = Path(config.policy_path).read_text()
            except OSError as exc:
                raise ConfigError(
                    f"cannot read the attestation policy {config.policy_path} "
                    f"({exc.strerror}); fix policy_path."
                ) from None
        return cls(**kw)


def _plain(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    if isinstance(value, str | int | float | bool) or value is None:
        return value
    return str(value)
