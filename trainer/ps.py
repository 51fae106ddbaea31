"""The parameter server: holds the global model, aggregates worker updates, serves parameters.

It only ever runs behind the attested mesh (``serve_ps``): every RPC comes from a peer whose
mesh certificate and embedded TD evidence were verified before the handler runs, and the
caller's identity is the role in that certificate, never a field of the request.
"""

from __future__ import annotations

import collections
import contextlib
import hashlib
import logging
import queue
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent import futures
from dataclasses import dataclass, field
from typing import Any, NoReturn

import grpc
import numpy as np
import numpy.typing as npt
from cryptography import x509

from hfl_lab._exceptions import ConfigError, HflLabError, TensorValidationError
from hfl_lab.events import LabEvent
from hfl_lab.trust.client import MeshCredentials
from hfl_lab.trust.mesh import (
    AttestedPeerInterceptor,
    PeerCheck,
    dynamic_server_credentials,
    role_of,
    roles,
)
from hfl_lab.vault.checkpoints import CheckpointStore
from trainer.aggregation import Aggregator, Mode, Outcome, Status, Update
from trainer.checkpoint import TrainingState, encode_state
from trainer.optim import MomentumSGD
from trainer.proto import parameter_server_pb2 as pb
from trainer.proto import parameter_server_pb2_grpc as rpc
from trainer.tensor_decode import StreamAssembler
from trainer.tensor_wire import SerializedChunk, WireChunk, parse_chunk, serialize_tensors
from trainer.tensors import DEFAULT_CHUNK_BYTES, TensorSpec, check_model_version

__all__ = ["ParameterServer", "PsOptions", "add_parameter_server", "serve_ps"]

log = logging.getLogger("trainer.ps")

FloatArray = npt.NDArray[np.float32]
Weights = dict[str, FloatArray]

_MODES = {
    Mode.SYNC: pb.AGGREGATION_MODE_SYNC,
    Mode.ASYNC: pb.AGGREGATION_MODE_ASYNC,
    Mode.FEDAVG: pb.AGGREGATION_MODE_FEDAVG,
}
_WIRE: dict[str, int] = {
    "float32": pb.DTYPE_FLOAT32,
    "float16": pb.DTYPE_FLOAT16,
    "bfloat16": pb.DTYPE_BFLOAT16,
}
_WIRE_NAMES: dict[int, str] = {v: k for k, v in _WIRE.items()}
#: gRPC message limit both ways: a chunk is at most 4 MiB of data plus framing
MAX_MESSAGE_BYTES = 8 << 20
#: One live session per role. A registered worker's session is its certificate on its
#: connection; it stays live while that connection has a call in flight or made one less than
#: this many seconds ago (longer than one step's compute). Meanwhile another connection with the
#: same certificate (a second process holding the role's credentials) is refused. A certificate
#: attested later (a restarted worker, a renewal) takes the role over at once.
SESSION_LEASE_S = 30.0


@dataclass(frozen=True)
class PsOptions:
    """What the PS does with updates; derived from a LabConfig by :meth:`from_lab`."""

    mode: Mode
    num_workers: int
    total_steps: int
    quorum: int | None = None
    staleness_bound: int | None = None
    chunk_bytes: int = DEFAULT_CHUNK_BYTES
    wire_dtype: str = "float32"
    eval_every: int = 0
    checkpoint_every: int = 0
    batch_size: int = 32
    local_steps: int = 1
    seed: int = 0
    model_name: str = "resnet56"
    partition: str = "iid"
    options: Mapping[str, str] = field(default_factory=dict)

    @classmethod
    def from_lab(cls, lab: Any, total_steps: int) -> PsOptions:
        return cls(
            mode=Mode(lab.aggregation),
            num_workers=lab.workers,
            total_steps=total_steps,
            quorum=lab.quorum if lab.aggregation != "async" else None,
            staleness_bound=lab.staleness_bound,
            chunk_bytes=lab.chunk_bytes,
            wire_dtype=lab.wire_dtype,
            eval_every=lab.eval_every,
            checkpoint_every=lab.checkpoint_every,
            batch_size=lab.batch_size,
            local_steps=lab.local_steps,
            seed=lab.seed,
            model_name=f"resnet{lab.depth}",
            partition=lab.partition,
        )


@dataclass(frozen=True)
class Caller:
    """Who is calling: the role and certificate the interceptor verified, and the connection."""

    role: str
    fingerprint: str  # SHA-256 of the mesh certificate
    attested_at: float  # the certificate's notBefore: when the trust service attested it
    peer: str  # the connection (address and port) the call came on


@dataclass
class _Session:
    """A registered worker's hold on its role: one certificate on one connection."""

    caller: Caller
    in_flight: int = 0
    last_active: float = field(default_factory=time.monotonic)

    def live(self, lease_s: float) -> bool:
        return self.in_flight > 0 or time.monotonic() - self.last_active < lease_s


@dataclass
class _WorkerRecord:
    worker_id: str
    index: int
    session: _Session
    updates: int = 0
    last_version: int = 0
    last_seen: float = field(default_factory=time.time)
    released: bool = False  # was told that training finished


def caller_identity(context: grpc.ServicerContext) -> Caller:
    """The caller's verified mesh identity (the interceptor has checked it already)."""
    pems: Any = context.auth_context().get("x509_pem_cert") or []
    if not pems:
        context.abort(grpc.StatusCode.UNAUTHENTICATED, "no client certificate on this call")
    pem = bytes(pems[0])
    cert = x509.load_pem_x509_certificate(pem)
    return Caller(role_of(cert), hashlib.sha256(pem).hexdigest(),
                  cert.not_valid_before_utc.timestamp(), context.peer())


def caller_role(context: grpc.ServicerContext) -> str:
    """The role in the caller's mesh certificate (the interceptor has verified it already)."""
    return caller_identity(context).role


class ParameterServer(rpc.ParameterServerServicer):
    """The global model and its optimizer, fed by an :class:`Aggregator`.

    ``evaluate(weights) -> {"loss", "accuracy", "num_samples"}`` runs in a background thread
    every ``eval_every`` versions; checkpoints go to ``store`` every ``checkpoint_every``
    versions and at the end, also from the background thread, in version order.
    """

    def __init__(
        self,
        specs: Sequence[TensorSpec],
        weights: Mapping[str, FloatArray],
        optimizer: MomentumSGD,
        options: PsOptions,
        *,
        store: CheckpointStore | None = None,
        evaluate: Callable[[Mapping[str, FloatArray]], Mapping[str, float]] | None = None,
        emit: Callable[[LabEvent], None] | None = None,
        name: str = "ps0",
        start_version: int = 0,
        checkpoint_metadata: Mapping[str, Any] | None = None,
        session_lease_s: float = SESSION_LEASE_S,
    ) -> None:
        self.specs = list(specs)
        self.options = options
        self.optimizer = optimizer
        self.store = store
        self.name = name
        self._evaluate = evaluate
        self._emit = emit
        self._checkpoint_metadata = dict(checkpoint_metadata or {})
        missing = [s.name for s in self.specs if s.name not in weights]
        if missing:
            raise ConfigError(
                f"initial weights lack {len(missing)} model tensors, e.g. {missing[0]!r}.",
                fix="start the PS from the model's own weights or a matching checkpoint.",
            )
        self._trainable = [s.name for s in self.specs if s.trainable]
        self._frozen = [s.name for s in self.specs if not s.trainable]
        self._snapshot: tuple[int, Weights] = (
            start_version,
            {s.name: np.asarray(weights[s.name], dtype=np.float32) for s in self.specs},
        )
        shapes = {s.name: s.shape for s in self.specs if s.trainable}
        self.aggregator = Aggregator(
            options.mode,
            options.num_workers,
            quorum=options.quorum,
            staleness_bound=options.staleness_bound,
            apply=self._apply,
            start_version=start_version,
            shapes=shapes,
        )
        self.state = "done" if start_version >= options.total_steps else "waiting"
        self.started = time.time()
        self._workers: dict[str, _WorkerRecord] = {}
        self._lock = threading.Lock()
        self._encoded: tuple[int, int, list[SerializedChunk]] | None = None
        self._encode_lock = threading.Lock()
        self.refusals: collections.Counter[str] = collections.Counter()
        self.session_lease_s = session_lease_s
        #: tensors that crossed the wire with a peer: complete tensors decoded from pushes,
        #: tensors streamed (at least their first piece) to pulls
        self.tensors_received = 0
        self.tensors_sent = 0
        self.timings: dict[str, float] = collections.defaultdict(float)
        self._events: collections.deque[tuple[int, LabEvent]] = collections.deque(maxlen=10_000)
        self._event_seq = 0
        self._event_cond = threading.Condition()
        self._last_progress = 0.0
        self._jobs: queue.Queue[tuple[str, int, Any]] = queue.Queue()
        self._housekeeper = threading.Thread(target=self._housekeeping, daemon=True,
                                             name="ps-housekeeping")
        self._housekeeper.start()
        self.finished = threading.Event()
        self.result: dict[str, Any] = {}
        self._last_checkpoint = start_version  # the newest checkpoint queued
        #: the newest checkpoint the store confirmed (a queued write can fail: a full volume)
        self._last_written: int | None = start_version if start_version > 0 else None
        self._checkpoint_failures = 0
        self._finishing = False
        if self.state == "done":
            self._finish(start_version)

    # ------------------------------------------------------------------ state

    @property
    def version(self) -> int:
        return self._snapshot[0]

    @property
    def tensors_exchanged(self) -> int:
        """Tensors received from and sent to peers since the start (the server's own count)."""
        with self._lock:
            return self.tensors_received + self.tensors_sent

    def weights(self) -> Weights:
        """The current global weights (a consistent snapshot; do not modify)."""
        return self._snapshot[1]

    def _event(self, kind: str, *, to_stdout: bool = True, **data: Any) -> None:
        event = LabEvent(kind, self.name, data)
        with self._event_cond:
            self._event_seq += 1
            self._events.append((self._event_seq, event))
            self._event_cond.notify_all()
        if to_stdout and self._emit is not None:
            self._emit(event)

    # ------------------------------------------------------------------ aggregation

    def _apply(self, update: Update) -> None:
        """Called by the aggregator under its lock; must leave the PS at ``update.version``."""
        started = time.perf_counter()
        _, current = self._snapshot
        if update.mode is Mode.FEDAVG:
            new = dict(current)
            new.update(update.tensors)
        else:
            new = self.optimizer.apply(current, update.tensors)
        new.update(update.non_trainable)
        self._snapshot = (update.version, new)
        self.timings["update_s"] += time.perf_counter() - started
        self.timings["updates"] += 1
        version = update.version
        opts = self.options
        if opts.checkpoint_every and version % opts.checkpoint_every == 0:
            self._queue_checkpoint(version, new)
        if opts.eval_every and version % opts.eval_every == 0 and version < opts.total_steps:
            self._jobs.put(("eval", version, new))
        now = time.monotonic()
        if now - self._last_progress >= 0.2 or version >= opts.total_steps:
            self._last_progress = now
            self._event("progress", done=version, total=opts.total_steps, unit="steps",
                        label="training", contributors=list(update.contributors),
                        staleness=update.staleness)

    def _queue_checkpoint(self, version: int, weights: Weights) -> None:
        state = TrainingState(
            version=version,
            weights=weights,
            optimizer=self.optimizer.state(),
            metadata={**self._checkpoint_metadata, "mode": str(self.options.mode),
                      "model": self.options.model_name},
        )
        self._last_checkpoint = version
        self._jobs.put(("checkpoint", version, state))

    def _housekeeping(self) -> None:
        while True:
            job, version, payload = self._jobs.get()
            try:
                if job == "stop":
                    return
                if job == "eval":
                    if not self._jobs.empty() and any(
                        j[0] == "eval" for j in list(self._jobs.queue)
                    ):
                        continue  # a newer evaluation is queued; the latest one wins
                    self._run_evaluation(version, payload)
                elif job == "checkpoint":
                    self._write_checkpoint(payload)
            except HflLabError as e:
                self._checkpoint_failures += job == "checkpoint"
                self._event("log", level="error", message=f"{job} at step {version} failed: {e}")
            except Exception as e:  # keep serving; the failure is reported, not swallowed
                self._checkpoint_failures += job == "checkpoint"
                log.exception("%s at step %d failed", job, version)
                self._event("log", level="error",
                            message=f"{job} at step {version} failed: {type(e).__name__}: {e}")
            finally:
                self._jobs.task_done()

    def _run_evaluation(self, version: int, weights: Weights) -> dict[str, float]:
        if self._evaluate is None:
            return {}
        started = time.perf_counter()
        figures = dict(self._evaluate(weights))
        data: dict[str, Any] = {"step": version, "seconds": time.perf_counter() - started}
        data.update(figures)
        self._event("evaluation", **data)
        return figures

    def _write_checkpoint(self, state: TrainingState) -> None:
        if self.store is None:
            return
        started = time.perf_counter()
        payload = encode_state(state)
        info = self.store.save(state.version, payload, dict(state.metadata))
        self._last_written = state.version
        self._event("log", level="info",
                    message=f"checkpoint at step {state.version} written "
                    f"({len(payload) / 1e6:.1f} MB, {time.perf_counter() - started:.2f} s)",
                    checkpoint_step=state.version, checkpoint=info.name)

    def _finish(self, version: int) -> None:
        """Close aggregation, write the last checkpoint, evaluate, and announce ``done``."""
        with self._lock:
            if self._finishing:
                return
            self._finishing = True
            self.state = "done"
        self.aggregator.close()
        weights = self.weights()
        if self.store is not None and self._last_checkpoint != version:
            self._queue_checkpoint(version, weights)
        self._jobs.join()  # every queued checkpoint is on disk before "done"
        evaluation: dict[str, float] = {}
        try:
            evaluation = self._run_evaluation(version, weights)
        except Exception as e:  # noqa: BLE001 - the model is saved; report and still finish
            self._event("log", level="error", message=f"final evaluation failed: {e}")
        counters = self.aggregator.counters()
        self.result = {
            "version": version,
            "evaluation": evaluation,
            "late_dropped": counters.late_dropped,
            "stale_refused": counters.stale_refused,
            "rejected": counters.rejected,
            "refusals": dict(self.refusals),
            # what is on disk, not what was queued: a write may have failed (full volume)
            "checkpoint_step": self._last_written if self.store is not None else None,
            "checkpoint_failures": self._checkpoint_failures,
        }
        self._event("lifecycle", state="done", detail=f"training finished at step {version}",
                    **self.result)
        self.finished.set()

    def close(self) -> None:
        self.aggregator.close()
        self._jobs.put(("stop", 0, None))
        with self._event_cond:
            self._event_cond.notify_all()

    # ------------------------------------------------------------------ refusals

    def _refuse(
        self, context: grpc.ServicerContext, code: grpc.StatusCode, message: str, who: str
    ) -> NoReturn:
        self.refusals[code.name] += 1
        # "training finished" is how every worker learns the run is over: not a warning
        level = "info" if code == grpc.StatusCode.OUT_OF_RANGE else "warning"
        self._event("log", level=level, message=f"refused a call from {who}: {message}",
                    code=code.name, peer=who)
        context.abort(code, message)
        raise AssertionError("unreachable")  # context.abort raises

    @contextlib.contextmanager
    def _session_call(self, context: grpc.ServicerContext) -> Iterator[str]:
        """A call of a registered worker on the connection that holds its session."""
        caller = caller_identity(context)
        who = caller.role
        with self._lock:
            record = self._workers.get(who)
            problem = self._session_problem(record, caller)
            if record is not None and not problem:
                session = record.session
                if session.caller.peer != caller.peer:
                    # the holder's connection went quiet past the lease: it is gone
                    session.caller = caller
                session.in_flight += 1
                session.last_active = time.monotonic()
                record.last_seen = time.time()
        if problem:
            self._refuse(context, problem[0], problem[1], who)
        assert record is not None
        try:
            yield who
        finally:
            with self._lock:
                session.in_flight -= 1
                session.last_active = time.monotonic()

    def _session_problem(
        self, record: _WorkerRecord | None, caller: Caller
    ) -> tuple[grpc.StatusCode, str] | None:
        who = caller.role
        if record is None:
            return (grpc.StatusCode.FAILED_PRECONDITION,
                    f"{who} has not registered; call Register first")
        held = record.session
        if held.caller.fingerprint != caller.fingerprint:
            if caller.attested_at > held.caller.attested_at:
                return (grpc.StatusCode.FAILED_PRECONDITION,
                        f"{who} has a newer mesh certificate than its session; call Register "
                        "first")
            return (grpc.StatusCode.PERMISSION_DENIED,
                    f"this {who} session was superseded: another certificate for {who}, "
                    "attested later, holds the role now. Fix: run each role once; this "
                    "process should stop")
        if held.caller.peer != caller.peer and held.live(self.session_lease_s):
            return (grpc.StatusCode.FAILED_PRECONDITION,
                    f"{who}'s session is held by another live connection with this same "
                    "certificate (a second process using its credentials?); call Register "
                    "on this connection once that one is gone")
        return None

    def _register_conflict(
        self, record: _WorkerRecord | None, caller: Caller
    ) -> tuple[grpc.StatusCode, str] | None:
        """Why ``caller`` may not take ``record``'s role now; None when it may.

        One live session per role. It moves to a certificate attested later at once (a
        restarted worker re-attests; a renewed certificate), never to an older one, and to the
        same certificate on another connection only once the session has lapsed.
        """
        if record is None:
            return None
        held = record.session.caller
        who = caller.role
        if held.fingerprint != caller.fingerprint:
            if caller.attested_at > held.attested_at:
                return None  # a fresher attestation of the role: the old session is superseded
            return (grpc.StatusCode.PERMISSION_DENIED,
                    f"{who} is held by a certificate attested as recently or later than this "
                    f"one; refused. Fix: run each role once; a restarted {who} re-attests and "
                    "its new certificate takes over at once")
        if held.peer == caller.peer or not record.session.live(self.session_lease_s):
            return None  # its own connection, or the old one has lapsed
        return (grpc.StatusCode.ALREADY_EXISTS,
                f"{who} already has a live session on another connection with this same "
                "certificate (a second process using its credentials?); refused. Fix: run each "
                f"role once; the session lapses {self.session_lease_s:.0f} s after its "
                "connection's last call")

    # ------------------------------------------------------------------ RPCs

    def Register(self, request: pb.RegisterRequest, context: grpc.ServicerContext) -> Any:
        who = caller_role(context)
        name = request.name or who
        if name != who:
            self._refuse(context, grpc.StatusCode.PERMISSION_DENIED,
                         f"the mesh certificate says {who!r} but the request claims {name!r}", who)
        index = request.worker_index
        if name != f"worker{index}" or index >= self.options.num_workers:
            self._refuse(
                context, grpc.StatusCode.INVALID_ARGUMENT,
                f"{name} asked for partition {index}; this run has workers worker0.."
                f"worker{self.options.num_workers - 1}, each with its own index", who)
        caller = caller_identity(context)
        with self._lock:
            previous = self._workers.get(name)
            conflict = self._register_conflict(previous, caller)
            if not conflict:
                self._workers[name] = _WorkerRecord(name, index, _Session(caller))
                if self.state == "waiting":
                    self.state = "training"
        if conflict:
            self._refuse(context, conflict[0], conflict[1], who)
        how = "registered"
        if previous is not None:
            superseded = previous.session.caller.fingerprint != caller.fingerprint
            how = "re-registered with a newer certificate" if superseded else "re-registered"
        self._event("log", level="info", message=f"{name} {how} at step {self.version}",
                    peer=name)
        opts = self.options
        return pb.RegisterReply(
            worker_id=name,
            aggregation=_MODES[opts.mode],
            model=[spec.to_proto() for spec in self.specs],
            model_version=self.version,
            config=pb.TrainingConfig(
                chunk_bytes=opts.chunk_bytes,
                wire_dtype=_WIRE[opts.wire_dtype],  # type: ignore[arg-type]
                total_steps=opts.total_steps,
                local_steps=opts.local_steps,
                batch_size=opts.batch_size,
                num_workers=opts.num_workers,
                sync_quorum=self.aggregator.quorum,
                max_staleness=self.aggregator.staleness_bound,
                seed=opts.seed,
                model=opts.model_name,
                partition=opts.partition,
                options=dict(opts.options),
            ),
        )

    def PullParameters(
        self, request: pb.PullRequest, context: grpc.ServicerContext
    ) -> Iterator[bytes]:
        """The parameters as serialized ``TensorChunk`` messages (see add_parameter_server)."""
        with self._session_call(context) as who:
            yield from self._pull(who, request, context)

    def _pull(
        self, who: str, request: pb.PullRequest, context: grpc.ServicerContext
    ) -> Iterator[bytes]:
        wanted = request.min_version
        while self.version < wanted:
            if self.state == "done" or self.finished.is_set():
                self._release(who)
                self._refuse(context, grpc.StatusCode.OUT_OF_RANGE,
                             f"training finished at step {self.version}; there is no step "
                             f"{wanted}", who)
            if not context.is_active():
                return
            self.aggregator.wait_for_version(wanted, timeout=0.5)
        wire = request.wire_dtype or _WIRE[self.options.wire_dtype]
        if wire not in _WIRE_NAMES:
            self._refuse(context, grpc.StatusCode.INVALID_ARGUMENT,
                         f"wire dtype {wire} is not float32, float16 or bfloat16", who)
        version, chunks = self._chunks(wire)
        if version >= self.options.total_steps:
            self._release(who)
        for chunk in chunks:
            with self._lock:
                self.tensors_sent += chunk.tensors_started
            yield chunk.data

    def _release(self, who: str) -> None:
        with self._lock:
            record = self._workers.get(who)
            if record is not None:
                record.released = True

    def wait_workers_released(self, timeout_s: float) -> bool:
        """After training: wait until every registered worker has been told it is over."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            with self._lock:
                if all(r.released for r in self._workers.values()):
                    return True
            time.sleep(0.1)
        return False

    def _chunks(self, wire: int) -> tuple[int, list[SerializedChunk]]:
        """The current parameters as serialized chunks, made once per version and wire dtype:
        every worker's pull of a version is sent the same bytes objects."""
        version, weights = self._snapshot
        cached = self._encoded
        if cached is not None and cached[0] == version and cached[1] == wire:
            return version, cached[2]
        with self._encode_lock:
            cached = self._encoded
            if cached is not None and cached[0] == version and cached[1] == wire:
                return version, cached[2]
            started = time.perf_counter()
            chunks = list(
                serialize_tensors(
                    weights,
                    header=pb.StreamHeader(kind=pb.UPDATE_KIND_WEIGHTS, model_version=version),
                    wire_dtype=_WIRE_NAMES[wire],
                    chunk_bytes=self.options.chunk_bytes,
                )
            )
            self.timings["encode_s"] += time.perf_counter() - started
            self._encoded = (version, wire, chunks)
            return version, chunks

    def PushUpdate(
        self, request_iterator: Iterator[pb.TensorChunk | WireChunk],
        context: grpc.ServicerContext,
    ) -> Any:
        with self._session_call(context) as who:
            return self._push(who, request_iterator, context)

    def _push(
        self, who: str, request_iterator: Iterator[pb.TensorChunk | WireChunk],
        context: grpc.ServicerContext,
    ) -> Any:
        started = time.perf_counter()
        assembler = StreamAssembler(self.specs)
        try:
            for chunk in request_iterator:
                assembler.add(chunk)
            decoded = assembler.finish()
        except TensorValidationError as e:
            self._refuse(context, e.code, f"{e.message} {e.fix or ''}".strip(), who)
        header = decoded.header
        with self._lock:
            self.tensors_received += len(decoded.tensors)
        self.timings["decode_s"] += time.perf_counter() - started
        if header.worker_id and header.worker_id != who:
            self._refuse(context, grpc.StatusCode.PERMISSION_DENIED,
                         f"the update claims worker {header.worker_id!r} but came from {who!r}",
                         who)
        expected = (
            pb.UPDATE_KIND_WEIGHTS if self.options.mode is Mode.FEDAVG
            else pb.UPDATE_KIND_GRADIENTS
        )
        if header.kind != expected:
            self._refuse(
                context, grpc.StatusCode.INVALID_ARGUMENT,
                f"this PS aggregates in {self.options.mode} mode and expects "
                f"{_kind_name(expected)}, got {_kind_name(header.kind)}", who)
        if self.finished.is_set() or self.state == "done":
            self._release(who)
            self._refuse(context, grpc.StatusCode.OUT_OF_RANGE,
                         f"training finished at step {self.version}", who)
        if self.options.mode is not Mode.ASYNC:
            # A late update within the bound is a backup worker's, dropped quietly by the
            # aggregator; one older than that is refused, so its sender pulls and catches up.
            try:
                check_model_version(min(header.model_version, self.version), self.version,
                                    max_staleness=self.aggregator.staleness_bound)
            except TensorValidationError as e:
                self._refuse(context, e.code, f"{e.message} {e.fix or ''}".strip(), who)
        tensors = decoded.tensors
        submitted = time.perf_counter()
        outcome = self.aggregator.submit(
            who,
            header.model_version,
            {name: tensors[name] for name in self._trainable},
            num_samples=max(1, header.num_samples),
            non_trainable={name: tensors[name] for name in self._frozen},
            checked_finite=True,  # the stream decoder refused NaN/Inf already
        )
        self.timings["aggregate_s"] += time.perf_counter() - submitted
        self.timings["pushes"] += 1
        self._after_submit(who, header, outcome, context)
        return pb.PushReply(
            accepted=outcome.accepted,
            model_version=outcome.version,
            staleness=outcome.staleness,
            detail=outcome.reason or str(outcome.status),
        )

    def _after_submit(
        self, who: str, header: pb.StreamHeader, outcome: Outcome,
        context: grpc.ServicerContext,
    ) -> None:
        status = outcome.status
        if status is Status.REJECTED:
            reason = outcome.reason
            if "already contributed" in reason:
                code = grpc.StatusCode.ALREADY_EXISTS
            elif "ahead of" in reason:
                code = grpc.StatusCode.FAILED_PRECONDITION
            elif "closed" in reason:
                code = grpc.StatusCode.OUT_OF_RANGE
            else:
                code = grpc.StatusCode.INVALID_ARGUMENT
            self._refuse(context, code, f"update from {who} refused: {reason}", who)
        if status is Status.STALE_REFUSED:
            self._refuse(context, grpc.StatusCode.FAILED_PRECONDITION,
                         f"update from {who} refused: {outcome.reason}; pull and recompute", who)
        with self._lock:
            record = self._workers[who]
            if outcome.accepted:
                record.updates += 1
            record.last_version = header.model_version
        if header.HasField("metrics"):
            m = header.metrics
            self._event("metrics", to_stdout=False, role=who, step=m.step, loss=m.loss,
                        accuracy=m.accuracy, lr=m.learning_rate, compute_s=m.compute_seconds,
                        **dict(m.extra))
        if status is Status.LATE_DROPPED:
            self._event("log", level="info", message=f"late update from {who} dropped: "
                        f"{outcome.reason}", peer=who)
        if status is Status.APPLIED and outcome.version >= self.options.total_steps:
            self._finish(outcome.version)

    def ReportMetrics(self, request: pb.MetricsReport, context: grpc.ServicerContext) -> Any:
        with self._session_call(context) as who:
            return self._report_metrics(who, request, context)

    def _report_metrics(
        self, who: str, request: pb.MetricsReport, context: grpc.ServicerContext
    ) -> Any:
        if request.worker_id and request.worker_id != who:
            self._refuse(context, grpc.StatusCode.PERMISSION_DENIED,
                         f"metrics claim worker {request.worker_id!r} but came from {who!r}", who)
        for m in request.steps:
            self._event("metrics", to_stdout=False, role=who, step=m.step, loss=m.loss,
                        accuracy=m.accuracy, lr=m.learning_rate, compute_s=m.compute_seconds,
                        **dict(m.extra))
        return pb.Ack(ok=True)

    def WatchEvents(
        self, request: pb.WatchRequest, context: grpc.ServicerContext
    ) -> Iterator[pb.Event]:
        caller_role(context)
        kinds = set(request.kinds)
        seq = request.since_seq
        while context.is_active():
            with self._event_cond:
                pending = [(s, e) for s, e in self._events if s > seq]
                if not pending:
                    if self.finished.is_set():
                        return
                    self._event_cond.wait(0.5)
                    continue
            for s, event in pending:
                seq = s
                if kinds and event.kind not in kinds:
                    continue
                yield pb.Event(seq=s, kind=event.kind, timestamp=event.time,
                               source=event.source, payload_json=_json(event.data))

    def Status(self, request: pb.StatusRequest, context: grpc.ServicerContext) -> Any:
        caller_role(context)
        with self._lock:
            workers = [
                pb.WorkerStatus(worker_id=r.worker_id, name=r.worker_id, worker_index=r.index,
                                updates=r.updates, last_version=r.last_version,
                                last_seen=r.last_seen)
                for r in self._workers.values()
            ]
        return pb.StatusReply(
            state=self.state,
            aggregation=_MODES[self.options.mode],
            model_version=self.version,
            total_steps=self.options.total_steps,
            workers=workers,
            uptime_seconds=time.time() - self.started,
        )


def _kind_name(kind: int) -> str:
    """The update kind's name; a value no enum member has (a hostile header) as a number."""
    try:
        return str(pb.UpdateKind.Name(kind))
    except ValueError:
        return f"unknown update kind {kind}"


def _json(data: Mapping[str, Any]) -> str:
    import json

    return json.dumps(data, default=str)


def serve_ps(
    servicer: ParameterServer,
    creds: MeshCredentials | Callable[[], MeshCredentials],
    peer_check: PeerCheck,
    *,
    host: str = "127.0.0.1",
    port: int = 0,
    max_workers: int = 16,
) -> tuple[grpc.Server, int]:
    """Serve the PS on the attested mesh: mTLS with mesh certificates + the evidence re-check.

    ``creds`` may be a callable returning the current (renewed) mesh credentials.
    """
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="ps-rpc"),
        interceptors=[AttestedPeerInterceptor(peer_check)],
        options=[
            ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
            ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
        ],
    )
    add_parameter_server(servicer, server)
    current = creds if callable(creds) else (lambda: creds)
    bound = server.add_secure_port(f"{host}:{port}", dynamic_server_credentials(current))
    if bound == 0:
        raise ConfigError(
            f"the parameter server cannot listen on {host}:{port} (port in use?).",
            fix="free the port or let the backend choose another one.",
        )
    server.start()
    return server, bound


def add_parameter_server(servicer: ParameterServer, server: grpc.Server) -> None:
    """Register ``servicer`` on ``server``: the generated handlers, but the tensor streams go
    through ``trainer.tensor_wire``. PullParameters yields chunks already serialized (cached
    per version), and PushUpdate's chunks are parsed without copying the tensor data. The
    bytes on the wire are the same protobuf messages; any client may use the generated stub.
    """
    captured = _CapturedHandlers()
    rpc.add_ParameterServerServicer_to_server(servicer, captured)  # type: ignore[no-untyped-call]
    handlers = dict(captured.handlers)
    handlers["PullParameters"] = grpc.unary_stream_rpc_method_handler(
        servicer.PullParameters,
        request_deserializer=pb.PullRequest.FromString,
        response_serializer=None,  # the servicer yields bytes
    )
    handlers["PushUpdate"] = grpc.stream_unary_rpc_method_handler(
        servicer.PushUpdate,
        request_deserializer=parse_chunk,
        response_serializer=pb.PushReply.SerializeToString,
    )
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler(captured.service, handlers),)
    )


class _CapturedHandlers:
    """Stands in for a server to take the generated method handlers."""

    def __init__(self) -> None:
        self.service = ""
        self.handlers: dict[str, grpc.RpcMethodHandler[Any, Any]] = {}

    def add_generic_rpc_handlers(self, handlers: object) -> None:
        pass

    def add_registered_method_handlers(
        self, service: str, handlers: dict[str, grpc.RpcMethodHandler[Any, Any]]
    ) -> None:
        self.service, self.handlers = service, handlers


def worker_peers(num_workers: int) -> Callable[[str], bool]:
    """Roles allowed to call the PS: this run's workers (and the owner's dashboard)."""
    allowed = {f"worker{i}" for i in range(num_workers)}
    return roles(*allowed, "owner")
