"""The rendered runc pods, run as local processes: their exact commands train and attest.

The test plays the kubelet for a 2-worker runc run: the backend renders and applies everything
to the API double (tests/k8s_api_double.py), and the test takes the ConfigMaps, the bootstrap
Secrets and each StatefulSet's container (command, args, env) from what was applied. Volumes
become folders under ``mount_root`` (which the renderer puts in front of every in-container
path, so the measured config document names the folders the processes really read), the
Secret volume a tmpfs folder, the data PVC a link to the CIFAR subset; the Services' names are
one loopback address the test picks (``service_host``). When the trust process announces
``provisioning``, the owner's backend verifies it and sends the admin credential through a
port-forward over the API double (the only way the credential reaches it: no Secret carries
it). The image's entrypoint is
native/image/entrypoint.sh (what the Dockerfile copies to /opt/hfl-lab/entrypoint.sh), and
``python`` is this venv's. Nothing is edited between render and run.

The run keeps the model vault on, as a cluster run does: the trust service generates the
volume's passphrase in its (simulated) TD, ps0 creates the LUKS volume on its "PVC" folder with
the passphrase released to it and signs every checkpoint; the backend then copies the volume and
the trust service's sealed state out over the API double's exec (from the very files the
processes wrote), and the owner opens them with the session's owner key and verifies ps0's
attested signatures offline.
"""

from __future__ import annotations

import base64
import contextlib
import os
import queue
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from kubernetes import client as k8s_client

from hfl_lab._exceptions import VaultError
from hfl_lab.backends.kubernetes import render as rendering
from hfl_lab.backends.kubernetes.backend import KubernetesBackend
from hfl_lab.backends.kubernetes.cluster_api import ClusterApi
from hfl_lab.backends.kubernetes.settings import KubernetesSettings
from hfl_lab.events import LabEvent
from tests.k8s_api_double import ApiDouble

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
ENTRYPOINT_IN_IMAGE = "/opt/hfl-lab/entrypoint.sh"
NS = "hfl-pods"
STEPS = 6


def loopback_host() -> str:
    """A 127/8 address whose two lab ports are free (other runs may hold 127.0.0.1's)."""
    for _ in range(50):
        host = f"127.{random.randint(1, 254)}.{random.randint(1, 254)}.{random.randint(2, 254)}"
        try:
            for port in (50060, 50051):
                with socket.socket() as s:
                    s.bind((host, port))
        except OSError:
            continue
        return host
    pytest.skip("no loopback address with free ports 50060 and 50051")


def kubelet_env(container: dict[str, Any], pod_index: int) -> dict[str, str]:
    """env as the kubelet sets it: values with $(VAR) expanded, the pod-index label."""
    env: dict[str, str] = {}
    for item in container.get("env", []):
        if "value" in item:
            env[item["name"]] = re.sub(r"\$\((\w+)\)", lambda m: env[m[1]], item["value"])
        else:
            assert item["valueFrom"]["fieldRef"]["fieldPath"] == (
                "metadata.labels['apps.kubernetes.io/pod-index']"
            )
            env[item["name"]] = str(pod_index)
    return env


def kubelet_args(container: dict[str, Any], env: dict[str, str]) -> list[str]:
    """args as the kubelet passes them: $(VAR) expanded from the container's env."""
    return [re.sub(r"\$\((\w+)\)", lambda m: env[m[1]], a) for a in container["args"]]


def materialize(
    pod: dict[str, Any], objects: dict[str, dict[str, Any]], tmpfs: Path, cifar: Path
) -> None:
    """Create the pod's volumes at its containers' mount paths."""
    volumes = {v["name"]: v for v in pod["volumes"]}
    for mount in pod["containers"][0]["volumeMounts"]:
        target = Path(mount["mountPath"])
        volume = volumes[mount["name"]]
        if mount["mountPath"] == "/tmp":
            continue  # the pod's scratch space; this machine's /tmp serves
        target.parent.mkdir(parents=True, exist_ok=True)
        if "configMap" in volume:
            data = objects[f"configmaps/{volume['configMap']['name']}"]["data"]
            if "subPath" in mount:
                target.write_text(data[mount["subPath"]])
            else:
                target.mkdir(exist_ok=True)
                for key, text in data.items():
                    (target / key).write_text(text)
        elif "secret" in volume:
            secret = objects[f"secrets/{volume['secret']['secretName']}"]
            folder = tmpfs / volume["secret"]["secretName"]  # a Secret volume is tmpfs
            folder.mkdir(exist_ok=True)
            for key, value in secret["data"].items():
                fd = os.open(folder / key, os.O_WRONLY | os.O_CREAT | os.O_TRUNC,
                             volume["secret"]["defaultMode"])
                with os.fdopen(fd, "wb") as out:
                    out.write(base64.b64decode(value))
            if not target.exists():
                target.symlink_to(folder)
        elif "persistentVolumeClaim" in volume and volume["name"] == "data":
            if not target.exists():
                target.symlink_to(cifar)
        else:  # emptyDir, the vault PVC
            target.mkdir(parents=True, exist_ok=True)


def check_sealed_model(backend: KubernetesBackend) -> None:
    """The collected volume opens with the owner key only, and ps0's attested key signed it."""
    from hfl_lab.vault import AttestedSigners, retrieve_as_owner
    from hfl_lab.vault.keyrelease import SealedBrokerState

    assert backend.vault_path.is_file() and backend.trust_state_path.is_file()
    model = retrieve_as_owner(None, backend.owner_credential(), backend.vault_path,
                              AttestedSigners.from_folder(backend.trust_dir))
    assert model.checkpoint.step == STEPS
    (signer,) = {e["signer_sha256"]: e for e in model.provenance.signer_evidence}.values()
    assert signer["accepted"] and signer["simulated"] and signer["role"] == "ps0"
    assert backend.policy is not None
    assert [signer["mr_config_id"]] == list(backend.policy.roles["ps0"]["mr_config_id"] or [])
    wrong = SealedBrokerState(backend.trust_state_path, b"\x00" * 32)
    with pytest.raises(VaultError, match="wrong owner key"):
        retrieve_as_owner(None, wrong, backend.vault_path, [])


@pytest.fixture()
def tmpfs():
    base = Path("/dev/shm") if Path("/dev/shm").is_dir() else None
    folder = Path(tempfile.mkdtemp(prefix="hfl-lab-secret-", dir=base))
    yield folder
    shutil.rmtree(folder, ignore_errors=True)


def test_rendered_runc_pods_train_with_every_participant_attested(
    tmp_path, cifar_dir, tmpfs
):
    if not (cifar_dir / "cifar-10-batches-py").is_dir():
        pytest.skip(f"the CIFAR-10 subset is not at {cifar_dir}")
    host = loopback_host()
    root = tmp_path / "pods"
    settings = KubernetesSettings(
        namespace=NS, workers=2, overlay="runc", service_host=host, mount_root=str(root),
        run_dir=tmp_path / "k8s", poll_interval_s=0.05, connect_timeout_s=120.0,
        lab_config={"depth": 8, "steps": STEPS, "batch_size": 16, "eval_every": 0,
                    "checkpoint_every": 3, "vault": True, "vault_size_mb": 16, "threads": 1,
                    "reattest_every_s": 0.0},
    )
    with ApiDouble() as double:
        api = ClusterApi(k8s_client.ApiClient(k8s_client.Configuration(host=double.url)))
        backend = KubernetesBackend(settings, api=api)
        backend.start()
        backend._stop.set()
        prefix = f"/api/v1/namespaces/{NS}/"
        objects = {p[len(prefix):]: o for p, o in double.objects.items() if p.startswith(prefix)}
        objects.update({
            f"statefulsets/{o['metadata']['name']}": o for p, o in double.objects.items()
            if "/statefulsets/" in p
        })

    pods = {"trust": ("trust", 0), "ps0": ("ps", 0),
            "worker0": ("worker", 0), "worker1": ("worker", 1)}
    venv_bin = str(Path(sys.executable).parent)
    base_env = {k: v for k, v in os.environ.items() if not k.startswith("HFL_LAB_")}
    base_env.update(PATH=f"{venv_bin}:{os.environ.get('PATH', '')}", PYTHONPATH=str(REPO),
                    KERAS_BACKEND="tensorflow", OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    events: queue.Queue[tuple[str, LabEvent | None]] = queue.Queue()
    procs: dict[str, subprocess.Popen[str]] = {}
    logs: dict[str, Path] = {}

    def read(role: str, stream: Any) -> None:
        for line in stream:
            with contextlib.suppress(ValueError, KeyError, TypeError):
                if line.startswith("{"):
                    events.put((role, LabEvent.from_json(line.strip())))
        events.put((role, None))

    # the owner's side during the run: a port-forward through the API (the double relays it to
    # the trust process's port) is the only way the admin credential reaches the trust service
    forwarder = ApiDouble().__enter__()
    forwarder.forwards[("trust-0", 50060)] = (host, 50060)
    backend._api = ClusterApi(k8s_client.ApiClient(k8s_client.Configuration(host=forwarder.url)))
    provisioned: list[str] = []
    try:
        for role, (sts, index) in pods.items():
            pod = objects[f"statefulsets/{sts}"]["spec"]["template"]["spec"]
            materialize(pod, objects, tmpfs, cifar_dir)
            (container,) = pod["containers"]
            env = kubelet_env(container, index)
            args = kubelet_args(container, env)
            assert container["command"] == [ENTRYPOINT_IN_IMAGE]
            argv = ["bash", str(REPO / "native/image/entrypoint.sh"), *args]
            logs[role] = tmp_path / f"{role}.log"
            procs[role] = subprocess.Popen(
                argv, cwd=REPO, env={**base_env, **env}, stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE, stderr=logs[role].open("w"), text=True,
                start_new_session=True,
            )
            threading.Thread(target=read, args=(role, procs[role].stdout), daemon=True).start()

        seen: list[tuple[str, LabEvent]] = []
        done: LabEvent | None = None
        finished: set[str] = set()
        deadline = time.monotonic() + 900
        while (done is None or finished != {"worker0", "worker1"}) and time.monotonic() < deadline:
            try:
                role, event = events.get(timeout=5)
            except queue.Empty:
                dead = {r: p.returncode for r, p in procs.items() if p.poll() not in (None, 0)}
                assert not dead, (dead, {r: logs[r].read_text()[-2000:] for r in dead})
                continue
            if event is None:
                continue
            seen.append((role, event))
            if event.kind == "lifecycle":
                state = event.data.get("state")
                assert state != "failed", (role, event.data, logs[role].read_text()[-3000:])
                if role == "trust" and state == "provisioning":
                    provisioned.append(backend.provision_trust(timeout_s=60))
                if role == "ps0" and state == "done":
                    done = event
                if role.startswith("worker") and state == "exited":
                    finished.add(role)
        assert done is not None, {r: logs[r].read_text()[-2000:] for r in logs}
        assert provisioned == ["provisioned"] and forwarder.forwarded >= 1
        assert done.data["version"] == STEPS
        assert finished == {"worker0", "worker1"}

        verdicts = [e.data for _, e in seen if e.kind == "attestation"]
        by_trust = {v["subject"] for v in verdicts if v["verifier"] == "trust" and v["accepted"]}
        assert {"ps0", "worker0", "worker1"} <= by_trust
        assert not [v for v in verdicts if not v["accepted"]]
        assert all(v["simulated"] for v in verdicts)
        assert any(v["verifier"] == "ps0" and v["subject"].startswith("worker") for v in verdicts)

        # a finished worker's entrypoint idles instead of exiting (a StatefulSet would restart it)
        for role in ("worker0", "worker1"):
            idle_by = time.monotonic() + 120
            while "finished; idle" not in logs[role].read_text():
                assert time.monotonic() < idle_by, logs[role].read_text()[-1500:]
                time.sleep(0.2)
            assert procs[role].poll() is None

        # the owner collects the sealed model as after a cluster run: exec + tar of the files
        with ApiDouble() as collector:
            backend._api = ClusterApi(
                k8s_client.ApiClient(k8s_client.Configuration(host=collector.url)))
            for pod, container, path in (("ps-0", "ps", rendering.VAULT_PATH),
                                         ("trust-0", "trust", rendering.TRUST_STATE_FILE)):
                collector.set_pod(NS, pod)
                in_pod = str(root) + path
                collector.files[(pod, container)] = {in_pod: Path(in_pod).read_bytes()}
            backend.collect_sealed_model()
        check_sealed_model(backend)
    finally:
        forwarder.__exit__()
        for p in procs.values():
            with contextlib.suppress(ProcessLookupError):
                os.killpg(p.pid, signal.SIGTERM)
        for p in procs.values():
            try:
                p.wait(timeout=20)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(p.pid, signal.SIGKILL)
                p.wait(timeout=10)
            with contextlib.suppress(ProcessLookupError):
                os.killpg(p.pid, signal.SIGKILL)  # an idle `sleep` left in the group
    failed = {r: p.returncode for r, p in procs.items() if p.returncode != 0}
    assert not failed, (failed, {r: logs[r].read_text()[-2500:] for r in failed})
    # the bootstrap reached the processes from the tmpfs Secret folder only
    on_disk = [f for folder, _, files in os.walk(tmp_path) for f in files if f == "bootstrap.json"]
    assert on_disk == []
