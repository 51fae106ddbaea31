"""R4: kill -9 a worker, the PS, the trust service, a worker during a push and the PS during a
checkpoint write, each at a seeded random step; every run completes, the PS resumes from its
newest intact checkpoint losing at most one checkpoint interval, and no checkpoint is corrupt.

Who brings a killed participant back: the test does, with ``backend.restart(role)``, as soon
as it has seen the process die. That is what the Kubernetes controller does for a pod whose
container was killed (restartPolicy: Always / the Deployment recreates it) and what an operator
of the local backend does by hand. The participants do not restart each other; what *they* do
by themselves is survive the gap: workers reconnect and re-register with back-off, the PS
resumes from its checkpoint store, and the mesh keeps working while the trust service is away.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from hfl_lab.backends.local import LocalBackend
from hfl_lab.config import LabConfig
from hfl_lab.events import LabEvent
from tests.local_support import quick_config, read_until, started
from tests.reliability.fault_support import (
    SEED,
    CheckpointAudit,
    FreezeOnWrite,
    audit_checkpoints,
    bytes_in_flight_to,
    fault_step,
    metric_steps,
    resumed_steps,
    seeded,
    steps_during_write,
    steps_lost,
    written_steps,
)
from tests.reliability_report import record

pytestmark = pytest.mark.slow

STEPS = 60
EVERY = 10  # checkpoint interval, steps
#: a push of ResNet-8 gradients is ~300 kB; pulls, registrations and pings are < 1 kB
PUSH_BYTES = 32 << 10


def fault_config(tmp_path: Path, cifar_dir: Path, **overrides: object) -> LabConfig:
    values: dict[str, object] = {"steps": STEPS, "checkpoint_every": EVERY}
    values.update(overrides)
    return quick_config(tmp_path, cifar_dir, **values)


def is_step(at_least: int, source: str | None = None) -> Callable[[LabEvent], bool]:
    return lambda e: (e.kind == "metrics" and e.data["step"] >= at_least
                      and (source is None or e.source == source))


def wait_exit(backend: LocalBackend, role: str) -> None:
    process = backend.participants[role].process
    assert process is not None
    process.wait(timeout=30)


def finish(events: Iterator[LabEvent], seen: list[LabEvent]) -> None:
    seen.extend(events)


def outcome(
    case: str, backend: LocalBackend, config: LabConfig, seen: list[LabEvent], *,
    at_step: int, lost_steps: int = 0, in_write: int = 0, resumed_ok: bool = True,
    **details: object,
) -> tuple[dict[str, object], CheckpointAudit]:
    """Record the case and return (record, final checkpoint audit).

    Up to one checkpoint interval may be lost, plus the steps trained while the next
    checkpoint was being written in the background (``in_write``, recorded).
    """
    result = backend.result
    audit = audit_checkpoints(backend)
    completed = result is not None and result.final_step == config.steps
    lost = max(0, lost_steps - in_write - config.checkpoint_every) + len(audit.corrupt)
    held = completed and resumed_ok and lost == 0 and not audit.leftovers
    entry = record(
        "R4", case, tried=1, held=int(held), lost=lost, seed=SEED, fault_step=at_step,
        completed=completed, steps_lost=lost_steps, steps_trained_during_the_write=in_write,
        checkpoint_every=config.checkpoint_every,
        checkpoints_verified=len(audit.intact), corrupt_checkpoints=len(audit.corrupt),
        recovered_by="backend.restart (the controller's role)", **details,
    )
    assert completed, f"{case}: the run did not complete: {result}"
    assert not audit.corrupt, audit.corrupt
    assert not audit.leftovers, f"leftovers of an interrupted write survived: {audit.leftovers}"
    assert audit.newest == config.steps, "the final model is checkpointed"
    return entry, audit


def test_kill9_a_worker_the_controller_restarts_it_and_the_run_completes(
    tmp_path: Path, cifar_dir: Path
) -> None:
    config = fault_config(tmp_path, cifar_dir)
    at = fault_step("worker", 3, STEPS - 15)
    seen: list[LabEvent] = []
    with LocalBackend(config) as backend:
        events = started(backend)
        read_until(events, seen, is_step(at, "worker1"))
        backend.kill("worker1")
        backend.restart("worker1")
        finish(events, seen)
        entry, _ = outcome("worker", backend, config, seen, at_step=at)

    rejoined = [e for e in seen if e.kind == "lifecycle" and e.source == "worker1"
                and e.data.get("state") == "ready"]
    assert len(rejoined) == 2, "worker1 registered again after its restart"
    assert max(metric_steps(seen, source="worker1")) > at
    assert entry["held"] == 1


def test_kill9_the_ps_it_resumes_from_its_newest_checkpoint(
    tmp_path: Path, cifar_dir: Path
) -> None:
    """The restarted ps0 resumes from its newest intact checkpoint, and the workers carry on:
    each reconnects (with back-off, re-verifying ps0) and trains to the end. (This case also
    holds what test_local_backend's "a restarted parameter server resumes from its checkpoint
    and workers carry on" checked with a run of its own.)"""
    config = fault_config(tmp_path, cifar_dir)
    at = fault_step("ps", EVERY + 1, STEPS - 10)
    seen: list[LabEvent] = []
    with LocalBackend(config) as backend:
        events = started(backend)
        read_until(events, seen, is_step(at))
        killed_at = time.time()
        backend.kill("ps0")
        before = audit_checkpoints(backend)
        backend.restart("ps0")
        finish(events, seen)
        resumed = resumed_steps(seen)
        lost_steps = steps_lost(seen, killed_at, resumed[0]) if resumed else STEPS
        in_write = steps_during_write(seen, killed_at, resumed[0], EVERY) if resumed else 0
        entry, _ = outcome("ps", backend, config, seen, at_step=at, lost_steps=lost_steps,
                           in_write=in_write, resumed_ok=resumed == [before.newest],
                           resumed_from=resumed[0] if resumed else None)

    assert not before.corrupt
    assert resumed == [before.newest], f"resumed from {resumed}, newest intact {before.newest}"
    assert lost_steps - in_write <= config.checkpoint_every, f"{lost_steps} steps lost"
    assert entry["held"] == 1
    exits = [e for e in seen if e.kind == "lifecycle" and e.source.startswith("worker")
             and e.data.get("state") == "exited"]
    assert len(exits) == 2 and all(e.data["reconnects"] >= 1 for e in exits), exits


def test_kill9_the_trust_service_training_goes_on_and_it_comes_back(
    tmp_path: Path, cifar_dir: Path
) -> None:
    config = fault_config(tmp_path, cifar_dir)
    at = fault_step("trust", 3, STEPS - 25)
    seen: list[LabEvent] = []
    with LocalBackend(config) as backend:
        events = started(backend)
        read_until(events, seen, is_step(at))
        backend.kill("trust")
        # the mesh needs no trust service for certificates already issued: training goes on
        read_until(events, seen, is_step(at + 10))
        alive = backend.participants["trust"].returncode
        backend.restart("trust")
        backend.wait_ready(120)
        finish(events, seen)
        entry, _ = outcome("trust", backend, config, seen, at_step=at,
                           steps_while_trust_was_down=10)

    assert alive is not None, "the trust service was down while those steps trained"
    assert entry["held"] == 1


def test_kill9_a_worker_in_the_middle_of_a_push(tmp_path: Path, cifar_dir: Path) -> None:
    """The PS is paused (SIGSTOP) so that a push in flight stays in flight; the worker whose
    bytes sit unread in the PS's TCP queue is killed, then the PS is resumed."""
    config = fault_config(tmp_path, cifar_dir)
    at = fault_step("worker-push", 3, STEPS - 20)
    seen: list[LabEvent] = []
    victim, unread, attempts = "", 0, 0
    with LocalBackend(config) as backend:
        events = started(backend)
        ps = backend.participants["ps0"]
        assert ps.pid is not None
        ps_port = int(backend.ps_address.rsplit(":", 1)[1])
        workers = [r for r in backend.training_roles if r != "ps0"]
        step = at
        while not victim and attempts < 5:
            attempts += 1
            read_until(events, seen, is_step(step))
            os.kill(ps.pid, signal.SIGSTOP)
            try:
                deadline = time.monotonic() + 20
                while not victim and time.monotonic() < deadline:
                    for role in workers:
                        pid = backend.participants[role].pid
                        assert pid is not None
                        unread = bytes_in_flight_to(ps_port, pid)
                        if unread >= PUSH_BYTES:
                            victim = role
                            backend.kill(role)
                            break
                    time.sleep(0.01)  # polling the kernel's queues, not guessing a moment
            finally:
                os.kill(ps.pid, signal.SIGCONT)
            step += 1
        assert victim, "no push was seen in flight after 5 pauses of the PS"
        print(f"[worker-push] killed {victim} with {unread} bytes of its push unread by ps0")
        backend.restart(victim)
        finish(events, seen)
        entry, _ = outcome("worker-push", backend, config, seen, at_step=at,
                           victim=victim, push_bytes_in_flight=unread, pauses=attempts)

    failed = [e for e in seen if e.kind == "lifecycle" and e.source == "ps0"
              and e.data.get("state") == "failed"]
    assert not failed, "ps0 survived a push cut off half-way"
    assert entry["held"] == 1


def test_kill9_the_ps_during_a_checkpoint_write(tmp_path: Path, cifar_dir: Path) -> None:
    """ps0 is stopped (SIGSTOP) the moment its write of checkpoint C shows on disk (inotify:
    the model volume modified, or C's temporary file created), killed as it stands, and C is
    checked not to be committed; the restarted ps0 must resume from C - EVERY."""
    config = fault_config(tmp_path, cifar_dir)
    rng = seeded("ps-checkpoint")
    target = rng.choice([2, 3]) * EVERY
    part = rng.choice(["bin", "json"])  # the payload, or the metadata that commits it
    print(f"[ps-checkpoint] HFL_LAB_FAULT_SEED={SEED}: kill while writing checkpoint "
          f"{target} ({part} file)")
    seen: list[LabEvent] = []
    mid_write: CheckpointAudit | None = None
    with LocalBackend(config) as backend:
        events = started(backend)
        ps = backend.participants["ps0"]
        read_until(events, seen, lambda e: any(s >= target - EVERY for s in written_steps([e])))
        # the model volume is modified only by checkpoint writes; a plain folder gets the
        # checkpoint's temporary files created in it
        vault = backend.vault_path
        folder = vault if vault is not None else backend.checkpoint_dir / "checkpoints"
        assert folder.exists(), f"the first checkpoints are not in {folder}"
        while mid_write is None and target < STEPS:
            assert ps.pid is not None
            marker = "" if vault is not None else f".step-{target:012d}.{part}."
            freeze = FreezeOnWrite(folder, ps.pid, marker)
            freeze.start()
            assert freeze.frozen.wait(120), f"checkpoint {target} was never written"
            killed_at = freeze.frozen_at
            backend.kill("ps0")  # a stopped process dies as it stands: mid-write
            # (the volume is locked while ps0 holds it, so it is audited once ps0 is gone)
            audit = audit_checkpoints(backend)
            if target not in audit.intact and (vault is not None or audit.leftovers):
                mid_write = audit
                break
            # the write had finished before the stop landed: resume, try the next checkpoint
            backend.restart("ps0")
            read_until(events, seen, lambda e: bool(resumed_steps([e])))
            target += EVERY
        assert mid_write is not None, "no checkpoint write could be interrupted"
        backend.restart("ps0")
        finish(events, seen)
        resumed = resumed_steps(seen)[-1:]
        lost_steps = steps_lost(seen, killed_at, resumed[0]) if resumed else STEPS
        in_write = steps_during_write(seen, killed_at, resumed[0], EVERY) if resumed else 0
        entry, _ = outcome(
            "ps-checkpoint", backend, config, seen, at_step=target, lost_steps=lost_steps,
            in_write=in_write, resumed_ok=resumed == [target - EVERY],
            interrupted=part if backend.vault_path is None else "model volume",
            leftovers_at_kill=len(mid_write.leftovers),
            resumed_from=resumed[0] if resumed else None)

    assert mid_write.newest == target - EVERY and not mid_write.corrupt
    assert resumed == [target - EVERY], f"resumed from {resumed}"
    assert lost_steps - in_write <= config.checkpoint_every, f"{lost_steps} steps lost"
    assert entry["held"] == 1
