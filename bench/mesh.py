"""P3 figures: what attestation costs the mesh — issuance, start-up, connections, key release."""

from __future__ import annotations

import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc

from bench.registry import BenchContext, Measurement, benchmark
from bench.support import (
    FRESH_CONNECTION,
    LabMesh,
    PlainPki,
    attested_echo_server,
    echo,
    echo_server,
)
from bench.timing import interleaved_medians
from hfl_lab._exceptions import BackendError, ConfigError
from hfl_lab.config import LabConfig
from hfl_lab.tee import AttestationPolicy
from hfl_lab.trust.broker import DEFAULT_APP_ID
from hfl_lab.trust.client import TrustClient
from hfl_lab.trust.mesh import attested_channel, roles
from hfl_lab.trust.proto import trust_pb2 as pb

PLAIN_PARTICIPANT = Path(__file__).resolve().with_name("plain_participant.py")


def _challenge(client: TrustClient, role: str) -> Callable[[], object]:
    """The floor of any trust-service call: one bare GetChallenge round trip on the channel."""
    return lambda: client.stub.GetChallenge(pb.ChallengeRequest(role=role), timeout=10)


@benchmark(
    "P3-issuance",
    what="p50 of a mesh certificate issuance (TrustClient.attest over gRPC/TLS: challenge, "
    "simulated-TD evidence binding a fresh P-256 key, the trust service's evidence "
    "verification and CA signature), s; baseline: p50 of a bare GetChallenge round trip",
    unit="s",
    goal="<= 0.02",
    judged_by="value",
)
def issuance(ctx: BenchContext) -> Measurement:
    with LabMesh(("ps0", "worker0")) as mesh:
        client = mesh.client
        provider = mesh.provider("worker0")
        medians = interleaved_medians(
            {
                "issue": lambda: client.attest("worker0", provider),
                "challenge": _challenge(client, "worker0"),
            },
            repeats=ctx.repeats(50, 10),
            warmup=2,
        )
        assert mesh.service.issued > 0
    return Measurement(medians["issue"], medians["challenge"])


@benchmark(
    "P3-connect",
    what="p50 of an attested connection set-up (attested_channel: fetch ps0's certificate, "
    "check its evidence, mesh mTLS handshake; ps0's interceptor re-checks the worker's "
    "evidence, its verdict cache cleared; first unary RPC) ÷ p50 of the same new channel + "
    "first RPC with ordinary mTLS certificates",
    unit="s",
    goal="report",
)
def connect(ctx: BenchContext) -> Measurement:
    with LabMesh(("ps0", "worker0")) as mesh:
        ps = mesh.attest("ps0")
        worker = mesh.attest("worker0")
        server, port, check = attested_echo_server(mesh, ps, "ps0", roles(prefixes=("worker",)))
        pki = PlainPki()
        plain_server, plain_port, _ = echo_server(pki.server_credentials("ps0"))
        key_pem, cert_pem = pki.issue("worker0")
        plain_creds = grpc.ssl_channel_credentials(pki.ca_pem, key_pem, cert_pem)
        verifier = mesh.verifier("worker0")
        address = f"127.0.0.1:{port}"

        def attested() -> None:
            check.forget()  # a first connection: both sides verify the other's evidence
            channel, _ = attested_channel(address, worker, verifier, "ps0",
                                          options=FRESH_CONNECTION)
            try:
                echo(channel)
            finally:
                channel.close()

        def plain() -> None:
            channel = grpc.secure_channel(
                f"127.0.0.1:{plain_port}", plain_creds,
                options=[("grpc.ssl_target_name_override", "ps0"), *FRESH_CONNECTION],
            )
            try:
                echo(channel)
            finally:
                channel.close()

        try:
            medians = interleaved_medians({"attested": attested, "plain": plain},
                                          repeats=ctx.repeats(40, 8), warmup=2)
        finally:
            server.stop(0)
            plain_server.stop(0)
        assert check.refused == 0
    return Measurement(medians["attested"], medians["plain"])


@benchmark(
    "P3-release",
    what="p50 of a secret release through the key broker (TrustClient.release_secret: "
    "challenge, simulated-TD evidence binding a fresh key, policy check, ECDH+AES-GCM wrap "
    "to that key, unwrap), s; baseline: p50 of a bare GetChallenge round trip",
    unit="s",
    goal="report",
    judged_by="value",
)
def release(ctx: BenchContext) -> Measurement:
    with LabMesh(("ps0",)) as mesh:
        client = mesh.client
        m = mesh.measured["ps0"]
        ps_only = AttestationPolicy.from_dict({
            "mr_td": m.mr_td.hex(), "mr_config_id": m.mr_config_id.hex(),
            "allow_simulated": True, "report_data_binding": "key+nonce",
            "roles": {"ps0": {}},  # a secret is released only to a role its policy names
        })
        secret = os.urandom(32)
        client.register_secret(DEFAULT_APP_ID, "volume", secret, ps_only, mesh.admin_token)
        provider = mesh.provider("ps0")
        if client.release_secret(DEFAULT_APP_ID, "volume", "ps0", provider) != secret:
            raise AssertionError("the key broker released something else than the secret")
        medians = interleaved_medians(
            {
                "release": lambda: client.release_secret(DEFAULT_APP_ID, "volume", "ps0",
                                                         provider),
                "challenge": _challenge(client, "ps0"),
            },
            repeats=ctx.repeats(50, 10),
            warmup=2,
        )
    return Measurement(medians["release"], medians["challenge"])


# ------------------------------------------------------------------------------ start-up


@dataclass
class Startup:
    """One start of trust + ps0 + workers; times in seconds from the launcher's start."""

    wall: float  # until the launcher saw every participant ready
    launched: float  # until the last process was launched (LocalBackend.start(): + prepare())
    imported: float  # until the last participant had imported its modules ("starting")
    ready: float  # until the last "ready" event

    @property
    def critical(self) -> float:
        """Launch, plus what comes after the import phase that both kinds of run share."""
        return self.launched + self.ready - self.imported


def _lifecycle(events: list[dict[str, Any]], origin: float, roles_: list[str]) -> tuple[
        float, float]:
    """(last "starting", last "ready") over ``roles_``, in seconds after ``origin``."""
    first: dict[tuple[str, str], float] = {}
    for event in events:
        if event.get("kind") != "lifecycle":
            continue
        key = (str(event.get("source")), str(event.get("data", {}).get("state")))
        first.setdefault(key, float(event["time"]) - origin)
    try:
        return (max(first[(r, "starting")] for r in roles_),
                max(first[(r, "ready")] for r in roles_))
    except KeyError as e:
        raise BackendError(f"no {e.args[0][1]} event from {e.args[0][0]}") from None


def _read_events(process: subprocess.Popen[str], ready: threading.Event,
                 events: list[dict[str, Any]], tail: list[str]) -> None:
    assert process.stdout is not None
    for line in process.stdout:
        if not line.startswith("{"):
            tail.append(line.rstrip())
            continue
        try:
            event = json.loads(line)
        except ValueError:
            continue
        events.append(event)
        if event.get("kind") == "lifecycle" and event.get("data", {}).get("state") == "ready":
            ready.set()


def _stop(processes: list[subprocess.Popen[str]]) -> None:
    for process in processes:
        if process.poll() is None:
            process.terminate()
    for process in processes:
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=10)
        for stream in (process.stdin, process.stdout):
            if stream is not None:
                stream.close()


def _participant_env(threads: int, root: Path) -> dict[str, str]:
    """The environment LocalBackend gives its participants."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(x for x in (str(root), env.get("PYTHONPATH", "")) if x)
    env.setdefault("KERAS_BACKEND", "tensorflow")
    env["PYTHONUNBUFFERED"] = "1"
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    return env


def workload_snapshot(dest: Path) -> Path:
    """A frozen, compiled copy of the workload (hfl_lab, trainer) for both kinds of run.

    The policy pins MR_TD to the source tree measured at start(); a developer saving a file
    during a launch would fail the attestation of the participants started after it.
    """
    root = Path(__file__).resolve().parents[1]
    for package in ("hfl_lab", "trainer"):
        shutil.copytree(root / package, dest / package,
                        ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    subprocess.run([sys.executable, "-m", "compileall", "-q", str(dest)], check=True)
    return dest


def plain_startup(lab: LabConfig, folder: Path, root: Path, timeout_s: float = 300.0) -> Startup:
    """trust + ps0 + the workers with ordinary mTLS certificates and no attestation."""
    from hfl_lab.backends.local.backend import free_port
    from trainer.participant_config import Deployment, ParticipantConfig

    folder.mkdir(parents=True, exist_ok=True)
    trust_port, ps_port = free_port(), free_port()
    deployment = Deployment(
        trust_address=f"127.0.0.1:{trust_port}", ps_address=f"127.0.0.1:{ps_port}",
        workers=lab.workers, evidence="simulated", overlay="local",
        checkpoint_dir=str(folder / "checkpoints"), data_dir=lab.data_path,
    )
    config_path = folder / "config.yaml"
    ParticipantConfig.write(config_path, deployment, lab)
    policy_path = folder / "policy.yaml"
    AttestationPolicy.from_dict({"allow_simulated": True}).save(policy_path)
    pki = PlainPki()
    roles_ = ["trust", "ps0", *(f"worker{i}" for i in range(lab.workers))]
    boot = {}
    for role in roles_:
        key_pem, cert_pem = pki.issue(role)
        boot[role] = {"role": role, "config": str(config_path), "policy": str(policy_path),
                      "ca": pki.ca_pem.decode(), "key": key_pem.decode(),
                      "cert": cert_pem.decode()}
    env = _participant_env(lab.threads, root)
    source = PLAIN_PARTICIPANT.read_text(encoding="utf-8")
    processes: list[subprocess.Popen[str]] = []
    ready: dict[str, threading.Event] = {}
    events: list[dict[str, Any]] = []
    tails: dict[str, list[str]] = {}
    origin = time.time()
    started = time.monotonic()
    try:
        for role in roles_:
            process = subprocess.Popen(
                [sys.executable, "-c", source], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                stderr=subprocess.DEVNULL, cwd=root, env=env, text=True, bufsize=1,
            )
            processes.append(process)
            assert process.stdin is not None
            process.stdin.write(json.dumps(boot[role]) + "\n")
            process.stdin.flush()
            ready[role], tails[role] = threading.Event(), []
            threading.Thread(target=_read_events,
                             args=(process, ready[role], events, tails[role]),
                             daemon=True).start()
        launched = time.monotonic() - started
        deadline = started + timeout_s
        while not all(e.is_set() for e in ready.values()):
            for role, process in zip(roles_, processes, strict=True):
                if process.poll() is not None and not ready[role].is_set():
                    raise BackendError(f"plain {role} exited with {process.returncode}: "
                                       f"{tails[role][-5:]}")
            if time.monotonic() > deadline:
                raise BackendError(f"plain participants not ready after {timeout_s:.0f} s")
            time.sleep(0.05)  # LocalBackend.wait_ready polls the same way
        wall = time.monotonic() - started
    finally:
        _stop(processes)
    imported, all_ready = _lifecycle(list(events), origin, roles_)
    return Startup(wall, launched, imported, all_ready)


def attested_startup(lab: LabConfig, root: Path, timeout_s: float = 300.0) -> Startup:
    """LocalBackend start() → wait_ready(): trust, ps0 and the workers, all attested."""
    from hfl_lab.backends.local import LocalBackend

    backend = LocalBackend(lab, workload_root=root)
    try:
        origin = time.time()
        started = time.monotonic()
        backend.start()
        launched = time.monotonic() - started
        backend.wait_ready(timeout_s)
        wall = time.monotonic() - started
    finally:
        backend.teardown()
    events = []
    for log in sorted(backend.log_dir.glob("*.log")):
        for line in log.read_text(encoding="utf-8").splitlines():
            if line.startswith("{"):
                try:
                    events.append(json.loads(line))
                except ValueError:
                    continue
    imported, all_ready = _lifecycle(events, origin, backend.roles)
    return Startup(wall, launched, imported, all_ready)


@benchmark(
    "P3-startup",
    what="extra wall time attestation adds to starting trust + ps0 + 2 workers on local "
    "(quick profile, ResNet-8, 1 thread each): LocalBackend start() → all ready, against the "
    "same four processes doing the same imports, data loading, model builds, servers and "
    "worker registration with ordinary mTLS certificates and no evidence or attestation "
    "(bench/plain_participant.py). Each run counts its launch (incl. the backend's "
    "prepare()) plus the time from the last participant past its imports to the last ready "
    "event: the concurrent TensorFlow/Keras import phase, identical code in both and the noisiest "
    "part on a shared machine, is left out; medians over alternating runs, s; baseline: the "
    "plain run's figure",
    unit="s",
    goal="<= 2",
    judged_by="value",
)
def startup(ctx: BenchContext) -> Measurement:
    with tempfile.TemporaryDirectory(prefix="bench-startup-") as tmp:
        folder = Path(tmp)
        root = workload_snapshot(folder / "workload")
        # no image pull: the plain baseline has none, and I-pull measures it on its own
        lab = LabConfig.profile("quick", workers=2, steps=10_000, vault=False,
                                workload_image="off", run_dir=str(folder / "run"))
        if not lab.data_path:
            raise ConfigError("P3-startup needs CIFAR-10 (data_path).",
                              fix="put it in ../shared/data/cifar-10-subset.")
        # warm the page cache: the first launch after a build reads every module from disk
        subprocess.run([sys.executable, "-c", "import trainer.entrypoint, trainer.serving, "
                        "trainer.trust_td"], cwd=root, check=True,
                       env=_participant_env(lab.threads, root))
        runs: dict[str, list[Startup]] = {"plain": [], "attested": []}
        order = ("plain", "attested") if ctx.quick else ("plain", "attested", "attested",
                                                          "plain", "plain", "attested")
        for i, kind in enumerate(order):
            if kind == "plain":
                runs[kind].append(plain_startup(lab, folder / f"plain{i}", root))
            else:
                runs[kind].append(attested_startup(lab.replace(run_dir=str(folder / f"run{i}")),
                                                   root))
    for kind, startups in runs.items():
        print(f"  P3-startup {kind}: critical "
              f"{[round(s.critical, 2) for s in startups]} s, to ready "
              f"{[round(s.wall, 2) for s in startups]} s", file=sys.stderr)
    base = statistics.median(s.critical for s in runs["plain"])
    return Measurement(statistics.median(s.critical for s in runs["attested"]) - base, base)
