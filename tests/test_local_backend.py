"""End to end on the local backend: trust service + ps0 + 2 workers as processes, ResNet-8,
simulated TDs, every tensor over the attested mesh."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

from hfl_lab import AttestationError, BackendError, HflLabError
from hfl_lab.backends.base import OWNER_REFUSED
from hfl_lab.backends.local import LocalBackend, ParticipantProcess
from hfl_lab.events import LabEvent
from hfl_lab.tee import AttestationPolicy
from tests.local_support import (
    FinishedRun,
    mean_loss_by_step,
    parent_of,
    processes_mentioning,
    quick_config,
    read_until,
    run_to_the_end,
    started,
)
from trainer.checkpoint import decode_state

pytestmark = pytest.mark.slow


def check_training_over_the_attested_mesh(run: FinishedRun) -> None:
    config, result, events = run.config, run.result, run.events
    losses = mean_loss_by_step(events)
    assert len(losses) >= 20
    assert sum(losses[-10:]) / 10 < sum(losses[:10]) / 10, losses
    assert result.final_step == config.steps
    assert result.test_accuracy is not None and result.test_accuracy > 0.1  # chance is 0.1
    assert result.exit_codes["ps0"] == 0
    assert result.exit_codes["worker0"] == result.exit_codes["worker1"] == 0

    # every tensor moved between mutually verified participants
    verdicts = {(e.data["verifier"], e.data["subject"]): e.data["accepted"]
                for e in events if e.kind == "attestation"}
    for worker in ("worker0", "worker1"):
        assert verdicts[(worker, "ps0")] and verdicts[("ps0", worker)]
        assert verdicts[("trust", worker)] and verdicts[(worker, "trust")]
    assert all(verdicts.values())
    assert all(e.data.get("simulated") for e in events if e.kind == "attestation")

    # the checkpoint is the final model, and resumable
    with run.backend.model_store() as store:
        latest = store.load_latest()
    assert latest is not None and decode_state(latest.payload).version == config.steps
    ps0_log = (Path(config.run_dir) / "logs" / "ps0.log").read_text(errors="replace")
    assert ps0_log
    # each peer check fetches ps0's certificate on a connection of its own, which hangs up
    # before its last TLS flight: no "Handshake failed" noise per connection in ps0's log
    assert "Handshake failed" not in ps0_log, ps0_log[-2000:]
    assert processes_mentioning(str(run.backend.config_path)) == []

    # no secret of the run in any file of the run folder (logs, config, policy, checkpoints),
    # nor in the events; no private key in PEM form either
    files = [f for f in Path(config.run_dir).rglob("*") if f.is_file()]
    assert len(files) >= 6
    texts = [f.read_bytes() for f in files] + [e.to_json().encode() for e in events]
    for text in texts:
        assert b"PRIVATE KEY" not in text
        for secret in run.secrets:
            assert secret.encode() not in text and bytes.fromhex(secret) not in text


def test_sync_training_over_the_attested_mesh(sync_run: FinishedRun) -> None:
    """On the session's shared sync run (tests/conftest.py), which test_local_vault reads too."""
    assert sync_run.config.aggregation == "sync"
    check_training_over_the_attested_mesh(sync_run)


@pytest.mark.parametrize(
    ("mode", "overrides"),
    [
        ("async", {}),
        ("fedavg", {"steps": 25, "local_steps": 2, "learning_rate": 0.05}),
    ],
)
def test_training_over_the_attested_mesh(
    tmp_path: Path, cifar_dir: Path, mode: str, overrides: dict[str, object]
) -> None:
    config = quick_config(tmp_path, cifar_dir, aggregation=mode, **overrides)
    check_training_over_the_attested_mesh(run_to_the_end(config))


def test_sync_with_a_backup_worker_survives_a_killed_worker_that_rejoins(
    tmp_path: Path, cifar_dir: Path
) -> None:
    config = quick_config(tmp_path, cifar_dir, steps=120, sync_quorum=1, checkpoint_every=0)
    seen: list[LabEvent] = []
    with LocalBackend(config) as backend:
        events = started(backend)
        read_until(events, seen, lambda e: e.kind == "metrics" and e.source == "worker1"
                   and e.data["step"] >= 5)
        backend.kill("worker1")
        killed_at = max(e.data["step"] for e in seen if e.kind == "metrics")
        # worker0 alone keeps the run going (K=1 of N=2)
        read_until(events, seen,
                   lambda e: e.kind == "metrics" and e.data["step"] >= killed_at + 10)
        assert backend.participants["worker1"].returncode is not None
        # worker0 waits (SIGSTOP) while worker1 starts again: alone it would train the rest of
        # the run in less time than worker1's start (TensorFlow's import) takes.
        worker0 = backend.participants["worker0"].pid
        assert worker0 is not None
        os.kill(worker0, signal.SIGSTOP)
        try:
            backend.restart("worker1")
            read_until(events, seen, lambda e: e.kind == "lifecycle" and e.source == "worker1"
                       and e.data.get("state") == "ready")
        finally:
            os.kill(worker0, signal.SIGCONT)
        for event in events:
            seen.append(event)
        result = backend.result
        config_path = str(backend.config_path)

    assert result is not None and result.final_step == config.steps
    steps_after_kill = [e.data["step"] for e in seen
                        if e.kind == "metrics" and e.source == "worker0"
                        and e.data["step"] > killed_at]
    assert len(steps_after_kill) >= 10
    rejoined = [e for e in seen if e.kind == "lifecycle" and e.source == "worker1"
                and e.data.get("state") == "ready"]
    assert len(rejoined) == 2, "worker1 registered again after its restart"
    assert any(e.kind == "metrics" and e.source == "worker1" and e.data["step"] > killed_at + 10
               for e in seen), "worker1 trained again after rejoining"
    assert processes_mentioning(config_path) == []


def test_a_participant_that_fails_attestation_is_named_with_its_last_log_lines(
    tmp_path: Path, cifar_dir: Path
) -> None:
    # the owner's policy names every role's true values but worker0's configuration: the trust
    # service passes the owner's check and is provisioned, then worker0 is refused
    config = quick_config(tmp_path, cifar_dir, vault=False)
    backend = LocalBackend(config)
    derived = backend.reference_policy

    def wrong_for_worker0() -> AttestationPolicy:
        document = derived().to_dict()
        document["roles"]["worker0"]["mr_config_id"] = "ab" * 48
        return AttestationPolicy.from_dict(document)

    backend.reference_policy = wrong_for_worker0  # type: ignore[method-assign]
    try:
        backend.start()
        with pytest.raises(BackendError) as failed:
            backend.wait_ready(120)
    finally:
        backend.teardown()
    message = str(failed.value)
    assert "worker0 exited with code" in message and "mr_config_id" in message
    assert "logs" in message  # where to read more
    assert processes_mentioning(str(backend.config_path)) == []


def test_the_owner_provisions_no_volume_for_a_trust_service_that_fails_attestation(
    tmp_path: Path, cifar_dir: Path
) -> None:
    wrong = tmp_path / "policy.yaml"
    wrong.write_text("tee_type: TDX\nallow_simulated: true\nmr_td: ['" + "ab" * 48 + "']\n")
    config = quick_config(tmp_path, cifar_dir, policy_path=str(wrong))
    backend = LocalBackend(config)
    try:
        with pytest.raises(AttestationError) as refused:
            backend.start()
    finally:
        backend.teardown()

    assert "the trust service at" in str(refused.value) and "mr_td" in str(refused.value)
    # named as the Kubernetes backend names it (tests/security/test_provisioning.py)
    assert str(refused.value).startswith(OWNER_REFUSED) and refused.value.check == "mr_td"
    assert backend.vault_path is not None and not backend.vault_path.exists()
    assert backend.participants["ps0"].process is None  # nothing else was started
    assert processes_mentioning(str(backend.config_path)) == []


def test_no_participant_outlives_a_launcher_killed_with_sigkill(
    tmp_path: Path, cifar_dir: Path
) -> None:
    # with the workload image: its registry must not outlive the launcher either
    config = quick_config(tmp_path, cifar_dir, steps=100000, timeout_s=3600.0,
                          workload_image="auto")
    script = textwrap.dedent(f"""
        import sys
        from hfl_lab.config import LabConfig
        from hfl_lab.backends.local import LocalBackend
        backend = LocalBackend(LabConfig.from_dict({config.to_dict()!r}))
        backend.start()
        backend.wait_ready(180)
        print("ready", flush=True)
        sys.stdin.readline()
    """)
    launcher = subprocess.Popen([sys.executable, "-c", script], stdin=subprocess.PIPE,
                                stdout=subprocess.PIPE, text=True)
    assert launcher.stdout is not None
    assert launcher.stdout.readline().strip() == "ready"
    config_path = str(Path(config.run_dir).resolve() / "config.yaml")
    # the launcher's children: ps0 forks at a checkpoint (debugfs), and a child between its
    # fork and its exec still shows ps0's command line
    participants = [pid for pid, _ in processes_mentioning(config_path)
                    if parent_of(pid) == launcher.pid]
    assert len(participants) == 4
    launcher.send_signal(signal.SIGKILL)  # no teardown runs
    launcher.wait()
    registry = str(Path(config.run_dir).resolve() / "image" / "registry")  # workload_image
    deadline = time.monotonic() + 30
    while (processes_mentioning(config_path) or processes_mentioning(registry)) and \
            time.monotonic() < deadline:
        time.sleep(0.2)
    assert processes_mentioning(config_path) == []
    assert processes_mentioning(registry) == []


def test_participants_re_attest_and_train_past_their_first_certificates_expiry(
    tmp_path: Path, cifar_dir: Path
) -> None:
    config = quick_config(tmp_path, cifar_dir, steps=100, batch_size=64, cert_lifetime_s=6.0,
                          reattest_every_s=2.0, checkpoint_every=0)
    events: list[LabEvent] = []
    with LocalBackend(config) as backend:
        result = backend.run_training(on_event=events.append)

    assert result.final_step == config.steps
    assert result.seconds > config.cert_lifetime_s, "the run outlived the first certificates"
    renewals = [e for e in events if e.kind == "log" and "re-attested" in e.data["message"]]
    assert {e.source for e in renewals} >= {"ps0", "worker0", "worker1"}
    issued = [e for e in events if e.kind == "audit" and e.source == "trust"
              and e.data.get("action") == "issue_mesh_certificate" and e.data.get("allowed")]
    assert len(issued) > 3 + len(renewals) // 2


@pytest.mark.parametrize("torn_down_before", ["ps0", "worker1"])
def test_a_run_torn_down_during_its_start_up_leaves_no_participant(
    tmp_path: Path, cifar_dir: Path, monkeypatch: pytest.MonkeyPatch, torn_down_before: str
) -> None:
    """The notebook runs start() on its own thread; an interrupt tears the run down while that
    thread is launching participants. None may start after the teardown and outlive it.

    The start-up thread is held at one launch until the teardown has begun, so the teardown
    lands there however the two threads are scheduled (polling for a launched process let a
    busy machine finish start() first)."""
    backend = LocalBackend(quick_config(tmp_path, cifar_dir))
    outcome: list[BaseException | None] = []
    at_launch = threading.Event()
    launch = backend._launch

    def held_launch(p: ParticipantProcess) -> None:
        if p.role == torn_down_before:
            at_launch.set()
            deadline = time.monotonic() + 120
            while not backend._torn_down and time.monotonic() < deadline:
                time.sleep(0.01)  # the teardown has marked the run: this launch comes after it
        launch(p)

    monkeypatch.setattr(backend, "_launch", held_launch)

    def start() -> None:
        try:
            backend.start()
        except BaseException as error:  # the test reads what start() ended with
            outcome.append(error)
        else:
            outcome.append(None)

    starter = threading.Thread(target=start, name="start-up")
    starter.start()
    assert at_launch.wait(timeout=120), f"start() never came to launch {torn_down_before}"
    backend.teardown()
    starter.join(timeout=120)

    assert not starter.is_alive(), "start() did not return after the teardown"
    assert outcome and outcome[0] is not None, "start() reported a run that was torn down"
    assert isinstance(outcome[0], HflLabError), repr(outcome[0])
    alive = [p.role for p in backend.participants.values()
             if p.process is not None and p.process.poll() is None]
    assert alive == []
    assert processes_mentioning(str(backend.config_path)) == []
