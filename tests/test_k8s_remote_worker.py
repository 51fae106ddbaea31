"""The remote worker (issue 23 item 5): a site renders, from a join link's enrollment, its worker
as a pod of its own cluster that joins another cluster's run through that cluster's ingress
(TLS passthrough, SNI routing by participant name): the addresses, server names, documents and
objects it renders, the same with kubectl kustomize where installed, the bootstrap Secret only
through the API, and `hfl-lab join --kubernetes` against a live host.

No cluster here: nothing is applied to one; the objects are checked against the Kubernetes
OpenAPI schemas and the apply path against a recording API (see the skip of the last test)."""

from __future__ import annotations

import base64
import json
import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from hfl_lab import ConfigError
from hfl_lab.backends.kubernetes import kustomize
from hfl_lab.backends.kubernetes.remote_worker import (
    RemoteWorkerSite,
    apply_remote_worker,
    render_remote_worker,
)
from hfl_lab.backends.kubernetes.render import container_env
from hfl_lab.cli import main
from hfl_lab.config.join_link import JoinLink, enrollment_key
from hfl_lab.lab.workshop import HostedRun
from hfl_lab.tee.sim.platform import SimulatedPlatform
from hfl_lab.trust.enrollment import EnrollmentDesk, RunDocuments
from tests.local_support import quick_config
from tests.td_support import PLATFORM
from trainer.participant_config import Deployment, ParticipantConfig

K8S_SCHEMA_VERSION = "1.37.0"
INGRESS_IP = "203.0.113.7"
TRUST = "trust.run-a.example.org:443"
PS0 = "ps0.run-a.example.org:443"


def _enrolled(tmp_path: Path, cifar_dir: Path, slot: str = "worker2", *,
              platform: SimulatedPlatform | None = PLATFORM) -> tuple[JoinLink, RunDocuments]:
    """What a cluster host's enrollment desk hands ``slot``'s joiner: the run's documents (its
    participants named through its ingress) and, simulated, the slot's own platform as the
    bootstrap (``platform`` None: a hardware run, no bootstrap)."""
    lab = quick_config(tmp_path, cifar_dir, workers=3)
    path = tmp_path / "host-config.yaml"
    ParticipantConfig.write(path, Deployment(trust_address=TRUST, ps_address=PS0, workers=3,
                                             policy_key="ab" * 32), lab)
    desk = EnrollmentDesk(RunDocuments(config_yaml=path.read_text(),
                                       policy_yaml="tee_type: TDX\nroles: {}\n",
                                       policy_signature="c2lnbmF0dXJl"), platform)
    key = enrollment_key()
    desk.open(key)
    return desk.enroll(_link(slot, key).encode())


def _link(slot: str = "worker2", key: bytes | None = None) -> JoinLink:
    return JoinLink.issue(key or enrollment_key(), trust_address=TRUST, ps_address=PS0,
                          trust_measurements={"mr_td": "ab" * 48, "mr_config_id": "cd" * 48},
                          policy_sha256="0" * 64, slot=slot, lab_root_sha256="1" * 64)


def _one(objects: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    (found,) = [o for o in objects if o["kind"] == kind]
    return found


def _config_map(objects: list[dict[str, Any]], name: str) -> dict[str, str]:
    (found,) = [o for o in objects if o["kind"] == "ConfigMap" and o["metadata"]["name"] == name]
    data: dict[str, str] = found["data"]
    return data


def test_a_remote_worker_reaches_the_host_cluster_through_its_ingress(
    tmp_path: Path, cifar_dir: Path
) -> None:
    link, documents = _enrolled(tmp_path, cifar_dir)
    site = RemoteWorkerSite(namespace="site-b", image="registry.site-b.example/hfl-lab:0.1.0",
                            data_source="hostpath:/srv/site-b/cifar", ingress_ip=INGRESS_IP)

    remote = render_remote_worker(link, documents, site, tmp_path / "remote")

    for obj in [*remote.objects, *remote.host_ingress]:
        kubernetes_validate.validate(obj, K8S_SCHEMA_VERSION, strict=True)
    assert {o["metadata"].get("namespace") for o in remote.objects
            if o["kind"] != "Namespace"} == {"site-b"}
    # the slot's worker, on this site's data, with the run's documents byte for byte
    pod = _one(remote.objects, "StatefulSet")["spec"]["template"]["spec"]
    container = pod["containers"][0]
    env = container_env(container, 0)
    args = [a.replace("$(HFL_LAB_WORKER_INDEX)", env["HFL_LAB_WORKER_INDEX"])
            for a in container["args"]]
    assert args == ["python", "-m", "trainer", "worker", "--index", "2", "--config",
                    "/etc/hfl-lab/config.yaml", "--policy", "/etc/hfl-lab/policy/policy.yaml",
                    "--data", "/data"]
    assert container["image"] == "registry.site-b.example/hfl-lab:0.1.0"
    assert {"name": "data", "hostPath": {"path": "/srv/site-b/cifar", "type": "Directory"}} \
        in pod["volumes"]
    assert _config_map(remote.objects, "hfl-config") == {"config.yaml": documents.config_yaml}
    assert _config_map(remote.objects, "hfl-policy") == {
        "policy.yaml": documents.policy_yaml, "policy.yaml.sig": "c2lnbmF0dXJl\n"}
    # the run's host names resolve to the host cluster's ingress; egress only there, port 443
    assert pod["hostAliases"] == [{"ip": INGRESS_IP, "hostnames": ["ps0.run-a.example.org",
                                                                   "trust.run-a.example.org"]}]
    egress = _one(remote.objects, "NetworkPolicy")["spec"]["egress"]
    assert egress[1] == {"to": [{"ipBlock": {"cidr": f"{INGRESS_IP}/32"}}],
                         "ports": [{"protocol": "TCP", "port": 443}]}
    # SNI: the participant's name (the mesh channel's target name) and the address's host
    routes = {r.participant: (r.address, r.server_names) for r in remote.routes}
    assert routes == {"trust": (TRUST, ("trust", "trust.run-a.example.org")),
                      "ps0": (PS0, ("ps0", "ps0.run-a.example.org"))}
    ingress = _one(remote.host_ingress, "Ingress")
    assert ingress["metadata"]["annotations"]["nginx.ingress.kubernetes.io/ssl-passthrough"] \
        == "true"
    rules = {r["host"]: r["http"]["paths"][0]["backend"]["service"]
             for r in ingress["spec"]["rules"]}
    assert rules == {name: {"name": participant, "port": {"name": "grpcs"}}
                     for participant, name in [("trust", "trust"),
                                               ("trust", "trust.run-a.example.org"),
                                               ("ps0", "ps0"), ("ps0", "ps0.run-a.example.org")]}
    # the slot's keys are in no file: only the Secret made in memory carries them
    secret = json.loads(documents.bootstrap)["platform"]
    for path in remote.folder.rglob("*"):
        assert not path.is_file() or secret not in path.read_text(), path
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert volumes["bootstrap"]["secret"]["secretName"] == "hfl-bootstrap-td"
    assert any(m["name"] == "bootstrap" for m in container["volumeMounts"])


def test_the_rendered_folders_match_kubectl_kustomize(tmp_path: Path, cifar_dir: Path) -> None:
    command = kustomize.kustomize_command()
    if command is None:
        pytest.skip("neither kubectl nor kustomize is installed (or HFL_LAB_KUSTOMIZE=builtin): "
                    "only the lab's own renderer built the folders")
    link, documents = _enrolled(tmp_path, cifar_dir, "worker0")
    remote = render_remote_worker(link, documents, RemoteWorkerSite(),
                                  tmp_path / "remote")

    def key(obj: dict[str, Any]) -> tuple[str, str]:
        return obj["kind"], obj["metadata"]["name"]

    for folder in (remote.folder, remote.folder / "host-ingress"):
        out = subprocess.run([*command, str(folder)], capture_output=True, text=True,
                             timeout=60, check=False)
        assert out.returncode == 0, out.stderr
        theirs = sorted((o for o in yaml.safe_load_all(out.stdout) if o), key=key)
        assert sorted(kustomize.build_builtin(folder), key=key) == theirs, folder
    # without the ingress address the pod resolves the names itself and may reach them anywhere
    pod = _one(remote.objects, "StatefulSet")["spec"]["template"]["spec"]
    assert "hostAliases" not in pod
    egress = _one(remote.objects, "NetworkPolicy")["spec"]["egress"][1]
    assert egress["to"] == [{"ipBlock": {"cidr": "0.0.0.0/0"}}]


class RecordingApi:
    def __init__(self) -> None:
        self.applied: list[dict[str, Any]] = []

    def apply(self, obj: dict[str, Any], field_manager: str) -> Any:
        assert field_manager
        self.applied.append(obj)
        return obj


def test_apply_creates_the_bootstrap_secret_from_memory_before_the_worker(
    tmp_path: Path, cifar_dir: Path
) -> None:
    link, documents = _enrolled(tmp_path, cifar_dir)
    remote = render_remote_worker(link, documents, RemoteWorkerSite(namespace="site-c"),
                                  tmp_path / "remote")
    api = RecordingApi()

    applied = apply_remote_worker(api, remote, documents)

    assert applied[:2] == ["Namespace/site-c", "Secret/hfl-bootstrap-td"]
    assert applied.index("Secret/hfl-bootstrap-td") < applied.index("StatefulSet/remote-worker")
    secret = api.applied[1]
    assert secret["metadata"]["namespace"] == "site-c" and secret["immutable"] is True
    payload = json.loads(base64.b64decode(secret["data"]["bootstrap.json"]))
    assert payload["platform"] == json.loads(documents.bootstrap)["platform"]
    slot_platform = SimulatedPlatform.from_secret(bytes.fromhex(payload["platform"]))
    assert slot_platform.slot == "worker2" and slot_platform.root_der == PLATFORM.root_der
    assert len(api.applied) == len(remote.objects) + 1


def test_a_run_with_hardware_evidence_or_bad_site_options_is_refused(
    tmp_path: Path, cifar_dir: Path
) -> None:
    link, hardware = _enrolled(tmp_path, cifar_dir, platform=None)
    _, documents = _enrolled(tmp_path, cifar_dir)

    with pytest.raises(ConfigError, match="not built yet"):
        render_remote_worker(link, hardware, RemoteWorkerSite(), tmp_path / "hw")
    assert not (tmp_path / "hw").exists()
    with pytest.raises(ConfigError, match="slots"):
        render_remote_worker(_link("worker7"), documents, RemoteWorkerSite(), tmp_path / "x")
    with pytest.raises(ConfigError, match="IPv4"):
        RemoteWorkerSite(ingress_ip="ingress.example.org")
    with pytest.raises(ConfigError, match="DNS label"):
        RemoteWorkerSite(namespace="Site_B")
    with pytest.raises(ConfigError, match="data source"):
        RemoteWorkerSite(data_source="nfs://x")


@pytest.mark.slow
def test_hfl_lab_join_kubernetes_renders_from_a_live_host(
    tmp_path: Path, cifar_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    host = "127.0.0.46"
    config = quick_config(tmp_path, cifar_dir, steps=10, vault=False, checkpoint_every=0)
    with HostedRun(config, address=host, slots=2) as run:
        links = run.start(timeout_s=180)
        out = tmp_path / "site"

        code = main(["join", links[1].encode(), "--kubernetes", str(out), "--namespace",
                     "site-d"])

        host_config = run.backend.config_path.read_text()
        trust, ps0 = run.backend.trust_address, run.backend.ps_address
    err = capsys.readouterr().err
    assert code == 0, err
    # the host's documents, byte for byte, as its trust service handed them out
    assert (out / "config.yaml").read_text() == host_config
    objects = kustomize.build(out)
    env = container_env(_one(objects, "StatefulSet")["spec"]["template"]["spec"]
                        ["containers"][0], 0)
    assert env["HFL_LAB_WORKER_INDEX"] == "1"
    # a host machine's address: dialled directly, nothing to resolve, SNI the participant's name
    assert f"trust at {trust}, server names (SNI) trust" in err
    assert f"ps0 at {ps0}, server names (SNI) ps0" in err
    pod = _one(objects, "StatefulSet")["spec"]["template"]["spec"]
    assert "hostAliases" not in pod
    egress = _one(objects, "NetworkPolicy")["spec"]["egress"][1]
    ports = sorted(int(a.rpartition(":")[2]) for a in (trust, ps0))
    assert egress == {"to": [{"ipBlock": {"cidr": f"{host}/32"}}],
                      "ports": [{"protocol": "TCP", "port": p} for p in ports]}
    assert "--apply" in err  # the Secret was not made: the site is told how


def test_a_real_cluster_takes_the_remote_worker(tmp_path: Path, cifar_dir: Path) -> None:
    kubeconfig = os.environ.get("HFL_LAB_KUBECONFIG")
    kubectl = shutil.which("kubectl")
    if not kubeconfig or kubectl is None:
        pytest.skip("no cluster here (HFL_LAB_KUBECONFIG unset or no kubectl): the remote "
                    "worker's objects were checked against the OpenAPI schemas and kubectl "
                    "kustomize above, not by an API server; a pod joining another cluster's run "
                    "through its ingress needs two clusters and was not run")
    link, documents = _enrolled(tmp_path, cifar_dir)
    remote = render_remote_worker(link, documents, RemoteWorkerSite(namespace="default"),
                                  tmp_path / "remote")

    out = subprocess.run([kubectl, "--kubeconfig", kubeconfig, "apply", "--dry-run=server",
                          "-k", str(remote.folder)], capture_output=True, text=True,
                         timeout=120, check=False)

    assert out.returncode == 0, out.stderr
    assert "statefulset.apps/remote-worker" in out.stdout


def test_join_kubernetes_options_are_in_the_cli_help(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["join", "--help"]) == 0
    text = capsys.readouterr().out
    assert "--kubernetes" in text and "--ingress-ip" in text and "--apply" in text

