"""Joiners of a hosted run simulated in one process: each takes its join link and does what
``hfl-lab join`` does up to training (verify the host's trust service against the link, enroll,
measure its worker TD, attest, register with ps0), then runs the real Worker loop replaying a
real ResNet gradient, as the simulated worker TDs of :mod:`bench.simulated_workers` do. The
X-join figure (bench/xjoin.py) and tests/test_xjoin_harness.py use it.

A simulated joiner is ``hfl-lab join <link>`` minus the worker's process: the same checks of
the link and of the host (:func:`hfl_lab.lab.joining.connect_host`), the same enrollment
(``Enroll``), the run's documents written into its own folder byte for byte and read back the
way the worker process reads them (``ParticipantConfig.load``, the owner-signed policy), and
the same :class:`~trainer.participant.Participant` (its TD measured from the code this process
runs, its evidence bound to a fresh key, its own verifier of ps0). Only the model is a
stand-in (:class:`~bench.simulated_workers.ReplayedGradients`). Every TD here is SIMULATED.
"""

from __future__ import annotations

import io
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc

from bench.simulated_workers import NoBatches, ReplayedGradients
from hfl_lab.config.join_link import JoinLink
from hfl_lab.events import LabEvent
from hfl_lab.lab.joining import JoinedWorker, connect_host
from hfl_lab.tee.policy import SIGNATURE_SUFFIX
from hfl_lab.trust.client import MeshCredentials
from hfl_lab.trust.enrollment import RunDocuments
from trainer.model import GradientResult
from trainer.participant import Bootstrap, Emitter, Participant, load_run_policy, measured_argv
from trainer.participant_config import ParticipantConfig
from trainer.serving import channel_factory
from trainer.worker import Worker, WorkerSummary

__all__ = ["GatedReplay", "JoinTimes", "SimulatedJoiner", "join_host"]


class GatedReplay(ReplayedGradients):
    """A replayed model whose first gradient waits for ``gate``: a joiner that registered
    holds its first step until every joiner has joined, so the joins are measured on a PS
    that does not train yet."""

    def __init__(self, replay: ReplayedGradients, gate: threading.Event,
                 timeout_s: float = 300.0) -> None:
        super().__init__(replay.depth, replay.variable_specs, replay.result)
        self.gate = gate
        self.timeout_s = timeout_s

    def compute_gradients(self, x: Any, y: Any) -> GradientResult:
        if not self.gate.wait(self.timeout_s):
            raise TimeoutError(f"the start gate stayed shut for {self.timeout_s:.0f} s")
        return self.result


@dataclass
class JoinTimes:
    """Wall-clock times (``time.time()``) of one join's stages."""

    started: float = 0.0
    verified: float = 0.0  # the host's trust service checked against the link
    enrolled: float = 0.0  # the run's documents received
    attested: float = 0.0  # the worker TD's mesh certificate received
    registered: float = 0.0  # ps0 took the registration (0: not yet)

    def stages(self) -> dict[str, float]:
        """Seconds of each stage: verify, enroll, attest (measure + evidence + certificate),
        register (RA-TLS channel to ps0, its evidence checked, Register)."""
        return {"verify": self.verified - self.started, "enroll": self.enrolled - self.verified,
                "attest": self.attested - self.enrolled,
                "register": self.registered - self.attested if self.registered else 0.0}

    @property
    def total(self) -> float:
        return self.registered - self.started if self.registered else 0.0


@dataclass
class SimulatedJoiner:
    """One joined worker TD: its link, its attested identity, then its Worker loop."""

    link: JoinLink
    participant: Participant
    creds: MeshCredentials
    times: JoinTimes
    summary: WorkerSummary | None = None
    left_at: float = 0.0  # when its Worker loop returned
    #: (time, step) of every step it pushed
    steps: list[tuple[float, int]] = field(default_factory=list)

    @property
    def slot(self) -> str:
        return self.link.slot

    @property
    def index(self) -> int:
        return int(self.slot.removeprefix("worker"))

    def train(self, model: ReplayedGradients, *, max_steps: int | None,
              on_registered: Callable[[], None] | None = None,
              emit: Callable[[LabEvent], None] | None = None) -> WorkerSummary:
        """The real Worker loop against ps0 at the link's address until ``max_steps`` steps
        (None: until ps0 says training is over); a leave is this loop's return."""

        def registered(reply: Any) -> None:
            if not self.times.registered:
                self.times.registered = time.time()
            if on_registered is not None:
                on_registered()

        def record(event: LabEvent) -> None:
            if event.kind == "metrics":
                self.steps.append((time.time(), int(event.data["step"])))
            if emit is not None:
                emit(event)

        connect = channel_factory(self.link.ps_address, self.creds, self.participant.verifier)
        worker = Worker(self.index, model, NoBatches(), connect,  # type: ignore[arg-type]
                        emit=record, on_registered=registered, max_steps=max_steps,
                        reconnect_timeout_s=60.0)
        try:
            self.summary = worker.run()
        finally:
            self.left_at = time.time()
        return self.summary


class _Discard(io.StringIO):
    """A worker process's stdout (its JSON events) that nobody reads here."""

    def write(self, text: str) -> int:
        return len(text)


def _write_documents(documents: RunDocuments, folder: Path) -> tuple[Path, Path]:
    """The run's documents in a joiner's folder, byte for byte, as ``hfl-lab join`` keeps
    them (``config.yaml``, ``policy.yaml`` and its signature)."""
    folder.mkdir(parents=True, exist_ok=True)
    config, policy = folder / "config.yaml", folder / "policy.yaml"
    config.write_text(documents.config_yaml, encoding="utf-8")
    policy.write_text(documents.policy_yaml, encoding="utf-8")
    policy.with_name(policy.name + SIGNATURE_SUFFIX).write_text(
        documents.policy_signature + "\n", encoding="utf-8")
    return config, policy


def join_host(link_text: str, folder: Path, *, timeout_s: float = 30.0) -> SimulatedJoiner:
    """``hfl-lab join <link>`` in this process up to the worker TD's mesh certificate: verify
    the host's trust service against the link, enroll, keep the run's documents in ``folder``,
    measure the worker TD from this process's code and attest it under the run's policy."""
    times = JoinTimes(started=time.time())
    link = JoinLink.parse(link_text)
    with connect_host(link, timeout_s=timeout_s) as host:
        times.verified = time.time()
        documents = host.enroll(link.encode())
    times.enrolled = time.time()
    # the joiner's own checks of the documents (a slot of the run, a simulated platform)
    platform = JoinedWorker(link.slot, documents, run_dir=folder).platform
    config_path, policy_path = _write_documents(documents, folder)
    config = ParticipantConfig.load(config_path)
    args = ["worker", "--index", link.slot.removeprefix("worker"), "--config",
            str(config_path), "--policy", str(policy_path)]
    participant = Participant(link.slot, config, measured_argv("trainer", args),
                              Bootstrap(platform=platform), Emitter(link.slot, _Discard()),
                              policy=load_run_policy(config, policy_path))
    trust = participant.connect_trust(deadline_s=timeout_s)
    try:
        creds = participant.attest(trust)
    finally:
        trust.close()
    times.attested = time.time()
    return SimulatedJoiner(link, participant, creds, times)


def rpc_failure(e: BaseException) -> str:
    """One line for a joiner's failure."""
    if isinstance(e, grpc.RpcError):
        return f"{e.code().name}: {e.details()}"
    return f"{type(e).__name__}: {e}"
