"""A site's worker as a pod in its own cluster, joining another cluster's hosted run (issue 23
item 5): the "remote worker" kustomization rendered from a join link's enrollment.

``hfl-lab join <link> --kubernetes <dir>`` verifies the host's trust service against the link
and enrolls (:mod:`hfl_lab.lab.joining`), then :func:`render_remote_worker` writes ``<dir>``:

- ``kustomization.yaml`` over ``k8s/remote-worker`` (one worker pod, its NetworkPolicy): the
  slot's index, this site's namespace, image, data and resources, and the address of the host
  cluster's ingress as the pod's ``hostAliases`` for the host names the run's document names;
- ``config.yaml``, ``policy.yaml`` and its signature: the run's documents byte for byte, as
  the host's trust service handed them out (the worker's MR_CONFIG_ID measures the config; it
  takes the policy only with the host owner's signature);
- ``host-ingress/``: what the host cluster's ingress needs so the pod reaches the run: an
  Ingress with TLS passthrough whose rules route each server name (SNI) the worker presents to
  the trust service or ps0. The worker's channel names its peer by participant name
  (``trust``, ``ps0``: the TLS target name the mesh checks), and the certificate fetch before it
  names the host of the document's address; both are routed.

The simulated platform's keys (the bootstrap) are not in the folder: :func:`bootstrap_secret`
gives the ``hfl-bootstrap-td`` Secret in memory, and :func:`apply_remote_worker` creates it and
the folder's objects through the Kubernetes API (``hfl-lab join --kubernetes <dir> --apply``).
Only simulated runs can be joined this way for now (runc): joining a TDX run from a TD needs
the guest's own evidence, which the join path does not take yet.
"""

from __future__ import annotations

import ipaddress
import os
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import yaml

from hfl_lab._exceptions import ConfigError
from hfl_lab.backends.kubernetes import kustomize
from hfl_lab.backends.kubernetes.bootstrap import TD_SECRET, bootstrap_secrets
from hfl_lab.backends.kubernetes.kustomize import Manifest
from hfl_lab.backends.kubernetes.render import K8S_DIR
from hfl_lab.backends.kubernetes.settings import (
    DEFAULT_DATA_SOURCE,
    DEFAULT_IMAGE,
    ContainerResources,
    KubernetesSettings,
)
from hfl_lab.config.join_link import JoinLink
from hfl_lab.tee.policy import SIGNATURE_SUFFIX
from hfl_lab.tee.sim.platform import SimulatedPlatform
from hfl_lab.trust.enrollment import RunDocuments, bootstrap_platform
from trainer.participant_config import ParticipantConfig

__all__ = [
    "REMOTE_WORKER_DIR",
    "IngressRoute",
    "RemoteWorker",
    "RemoteWorkerSite",
    "apply_remote_worker",
    "bootstrap_secret",
    "render_remote_worker",
]

REMOTE_WORKER_DIR = K8S_DIR / "remote-worker"
STATEFULSET = "remote-worker"
#: the host's Services (k8s/base) that each participant's route ends at, and their port name
SERVICES = {"trust": "trust", "ps0": "ps0"}
SERVICE_PORT = "grpcs"
HOST_INGRESS = "host-ingress"
FIELD_MANAGER = "hfl-lab-remote-worker"


@dataclass(frozen=True)
class RemoteWorkerSite:
    """Where this site runs its worker: its namespace, the image (built from the same checkout
    as the host's workload: MR_TD measures the code), its own data, and the host cluster's
    ingress address (None: the run's host names resolve through this cluster's DNS)."""

    namespace: str = "hfl-remote"
    image: str = DEFAULT_IMAGE
    data_source: str = DEFAULT_DATA_SOURCE
    ingress_ip: str | None = None
    resources: ContainerResources | None = None

    def settings(self) -> KubernetesSettings:
        """The same checks of namespace, image and data source as a run of this cluster."""
        return KubernetesSettings(overlay="runc", namespace=self.namespace, image=self.image,
                                  data_source=self.data_source,
                                  worker_resources=self.resources)

    def __post_init__(self) -> None:
        self.settings()
        if self.ingress_ip is not None:
            try:
                ipaddress.IPv4Address(self.ingress_ip)
            except ValueError:
                raise ConfigError(
                    f"the host cluster's ingress address must be an IPv4 address, got "
                    f"{self.ingress_ip!r}.",
                    fix="pass the address its ingress controller listens on (the host's "
                    "`kubectl -n ingress-nginx get svc` shows it), or leave it out when this "
                    "cluster's DNS resolves the run's host names.") from None


@dataclass(frozen=True)
class IngressRoute:
    """How the worker reaches one participant of the host: the address it dials (from the
    run's document) and the server names its TLS handshakes carry there."""

    participant: str  # trust | ps0
    address: str  # host:port
    server_names: tuple[str, ...]  # the SNI the host's ingress routes on

    @property
    def host(self) -> str:
        return self.address.rpartition(":")[0]

    @property
    def port(self) -> int:
        return int(self.address.rpartition(":")[2])


@dataclass(frozen=True)
class RemoteWorker:
    """One rendered remote worker: its folder, objects and routes (no secret in it)."""

    folder: Path
    slot: str
    namespace: str
    routes: tuple[IngressRoute, ...]
    objects: list[Manifest]
    host_ingress: list[Manifest]

    def __repr__(self) -> str:
        return f"RemoteWorker({self.slot}, {str(self.folder)!r}, <bootstrap in memory>)"

    @property
    def host_aliases(self) -> dict[str, list[str]]:
        """IP → host names as the pod's /etc/hosts gets them."""
        pod = next(o for o in self.objects if o["kind"] == "StatefulSet")
        aliases = pod["spec"]["template"]["spec"].get("hostAliases") or []
        return {a["ip"]: list(a["hostnames"]) for a in aliases}


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def routes_for(config: ParticipantConfig) -> tuple[IngressRoute, ...]:
    """The worker's routes to the trust service and ps0: the document's addresses, and as
    server names the participant's name (the target name its mesh channel checks) and the
    address's host name (the certificate fetch; an IP address sends none)."""
    found = []
    for participant, address in (("trust", config.deployment.trust_address),
                                 ("ps0", config.deployment.ps_address)):
        host = address.rpartition(":")[0]
        names = [participant]
        if not _is_ip(host) and host != participant:
            names.append(host)
        found.append(IngressRoute(participant, address, tuple(names)))
    return tuple(found)


def _platform(documents: RunDocuments) -> SimulatedPlatform:
    platform = bootstrap_platform(documents.bootstrap)
    if platform is None:
        raise ConfigError(
            "the hosted run sent no lab platform: it runs with hardware evidence, and joining a "
            "TDX run from a TD in another cluster is not built yet.",
            fix="join a simulated run for now (the host's allow_simulated: true).")
    return platform


def bootstrap_secret(namespace: str, documents: RunDocuments) -> dict[str, Any]:
    """The worker's ``hfl-bootstrap-td`` Secret, in memory: apply it, never write it."""
    secrets = bootstrap_secrets(namespace, _platform(documents))
    return next(s for s in secrets if s["metadata"]["name"] == TD_SECRET)


def _ops_patch(kind: str, group: str, name: str, ops: list[dict[str, Any]]) -> dict[str, Any]:
    return {"target": {"group": group, "version": "v1", "kind": kind, "name": name},
            "patch": yaml.safe_dump(ops, sort_keys=False)}


def _kustomization(site: RemoteWorkerSite, index: int, routes: Sequence[IngressRoute],
                   out_dir: Path, k8s_dir: Path) -> dict[str, Any]:
    settings = site.settings()
    image = settings.image_ref
    entry: dict[str, Any] = {"name": "hfl-lab", "newName": image.name}
    if image.tag:
        entry["newTag"] = image.tag
    if image.digest:
        entry["digest"] = image.digest
    container = "/spec/template/spec/containers/0"
    worker_ops: list[dict[str, Any]] = [
        {"op": "test", "path": f"{container}/env/0/name", "value": "HFL_LAB_WORKER_INDEX"},
        {"op": "replace", "path": f"{container}/env/0/value", "value": str(index)},
        {"op": "test", "path": "/spec/template/spec/volumes/2/name", "value": "data"},
        {"op": "replace", "path": "/spec/template/spec/volumes/2",
         "value": settings.data_volume()},
    ]
    if site.resources is not None:
        worker_ops.append({"op": "replace", "path": f"{container}/resources",
                           "value": site.resources.to_manifest()})
    names = sorted({r.host for r in routes if not _is_ip(r.host)})
    if site.ingress_ip is not None and names:
        worker_ops.append({"op": "add", "path": "/spec/template/spec/hostAliases",
                           "value": [{"ip": site.ingress_ip, "hostnames": names}]})
    # egress only to the run's addresses: the ingress for its host names, or the host's own
    # address; a host name this cluster's DNS resolves may be anywhere
    ips = {r.host for r in routes if _is_ip(r.host)}
    if names and site.ingress_ip is not None:
        ips.add(site.ingress_ip)
    to = ([{"ipBlock": {"cidr": "0.0.0.0/0"}}] if names and site.ingress_ip is None
          else [{"ipBlock": {"cidr": f"{ip}/32"}} for ip in sorted(ips)])
    ports = [{"protocol": "TCP", "port": p} for p in sorted({r.port for r in routes})]
    policy_ops = [
        {"op": "replace", "path": "/spec/egress/1", "value": {"to": to, "ports": ports}},
    ]
    return {
        "apiVersion": "kustomize.config.k8s.io/v1beta1",
        "kind": "Kustomization",
        "namespace": site.namespace,
        "resources": [os.path.relpath(k8s_dir / "remote-worker", out_dir)],
        "images": [entry],
        "configMapGenerator": [
            {"name": "hfl-config", "files": ["config.yaml"]},
            {"name": "hfl-policy", "files": ["policy.yaml", f"policy.yaml{SIGNATURE_SUFFIX}"]},
        ],
        "generatorOptions": {"disableNameSuffixHash": True},
        "patches": [
            _ops_patch("StatefulSet", "apps", STATEFULSET, worker_ops),
            _ops_patch("NetworkPolicy", "networking.k8s.io", "remote-worker", policy_ops),
        ],
    }


def host_ingress(routes: Sequence[IngressRoute]) -> dict[str, Any]:
    """The host cluster's Ingress for remote workers: TLS passthrough (the attested TLS session
    ends in the participant's TD), one rule per server name, routed to that participant's
    Service."""
    rules = []
    for route in routes:
        for name in route.server_names:
            rules.append({"host": name, "http": {"paths": [{
                "path": "/", "pathType": "Prefix",
                "backend": {"service": {"name": SERVICES[route.participant],
                                        "port": {"name": SERVICE_PORT}}}}]}})
    return {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "Ingress",
        "metadata": {
            "name": "hfl-remote-workers",
            "labels": {"app.kubernetes.io/part-of": "hfl-lab"},
            "annotations": {"nginx.ingress.kubernetes.io/ssl-passthrough": "true",
                            "nginx.ingress.kubernetes.io/backend-protocol": "GRPCS"},
        },
        "spec": {"ingressClassName": "nginx", "rules": rules},
    }


def _write(path: Path, text: str) -> None:
    path.write_text(text, encoding="utf-8")


def render_remote_worker(link: JoinLink, documents: RunDocuments, site: RemoteWorkerSite,
                         out_dir: Path, *, k8s_dir: Path = K8S_DIR) -> RemoteWorker:
    """Write the remote worker's folder for ``link``'s slot (see the module doc) and build it."""
    _platform(documents)  # refuse a hardware run, or an unreadable bootstrap, before writing
    folder = Path(out_dir).expanduser().resolve()
    folder.mkdir(parents=True, exist_ok=True)
    _write(folder / "config.yaml", documents.config_yaml)
    _write(folder / "policy.yaml", documents.policy_yaml)
    _write(folder / f"policy.yaml{SIGNATURE_SUFFIX}", documents.policy_signature + "\n")
    config = ParticipantConfig.load(folder / "config.yaml")
    index = int(link.slot.removeprefix("worker"))
    if index >= config.lab.workers:
        raise ConfigError(f"the hosted run has {config.lab.workers} slots, not {link.slot}.",
                          fix="use a link the host printed for this run.")
    routes = routes_for(config)
    spec = _kustomization(site, index, routes, folder, k8s_dir)
    _write(folder / "kustomization.yaml",
           f"# Generated by hfl-lab join --kubernetes for {link.slot} of the run at "
           f"{link.trust_address}; `kubectl apply -k` this folder after its bootstrap Secret "
           "exists (hfl-lab join --apply makes both).\n" + yaml.safe_dump(spec, sort_keys=False))
    ingress_dir = folder / HOST_INGRESS
    if ingress_dir.exists():
        shutil.rmtree(ingress_dir)
    ingress_dir.mkdir()
    _write(ingress_dir / "ingress.yaml",
           "# For the HOST cluster's admin, in the run's namespace: routes the server names a "
           "remote worker presents\n# to the trust service and ps0, TLS passthrough "
           "(ingress-nginx with --enable-ssl-passthrough).\n"
           + yaml.safe_dump(host_ingress(routes), sort_keys=False))
    _write(ingress_dir / "kustomization.yaml", yaml.safe_dump({
        "apiVersion": "kustomize.config.k8s.io/v1beta1", "kind": "Kustomization",
        "resources": ["ingress.yaml"]}, sort_keys=False))
    return RemoteWorker(folder, link.slot, site.namespace, routes, kustomize.build(folder),
                        kustomize.build(ingress_dir))


class _Api(Protocol):
    def apply(self, obj: dict[str, Any], field_manager: str) -> Any: ...


def apply_remote_worker(api: _Api, remote: RemoteWorker, documents: RunDocuments) -> list[str]:
    """Create the worker's bootstrap Secret (from memory) and its objects through the API, the
    Namespace first; the "Kind/name" of each, in order."""
    objects = sorted(remote.objects, key=lambda o: o["kind"] != "Namespace")
    ordered = [*objects[:1], bootstrap_secret(remote.namespace, documents), *objects[1:]]
    applied = []
    for obj in ordered:
        api.apply(obj, FIELD_MANAGER)
        applied.append(f"{obj['kind']}/{obj['metadata']['name']}")
    return applied
