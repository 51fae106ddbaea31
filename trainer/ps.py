"""The parameter server: holds the global model, aggregates worker updates, serves parameters.

It only ever runs behind the attested mesh (``serve_ps``): every RPC comes from a peer whose
mesh certificate and embedded TD evidence were verified before the handler runs, and the
caller's identity is the role in that certificate, never a field of the request.
"""

from __future__ import annotations

import collections
import contextlib
import json
import logging
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, NoReturn

import grpc
import numpy as np
import numpy.typing as npt

from hfl_lab._exceptions import ConfigError, TensorValidationError
from hfl_lab.events import LabEvent
from hfl_lab.vault.checkpoints import CheckpointStore
from trainer.aggregation import Aggregator, Mode, Outcome, Status, Update
from trainer.optim import MomentumSGD
from trainer.proto import parameter_server_pb2 as pb
from trainer.proto import parameter_server_pb2_grpc as rpc
from trainer.ps_jobs import EventLog, Housekeeper, PullCache
from trainer.ps_options import MODES, WIRE, WIRE_NAMES, PsOptions, PsState
from trainer.ps_sessions import (
    SESSION_LEASE_S,
    Refusal,
    SessionTable,
    caller_identity,
    caller_role,
    refusal_for,
)
from trainer.tensor_decode import StreamAssembler
from trainer.tensor_wire import SerializedChunk, WireChunk, serialize_tensors
from trainer.tensors import TensorSpec, check_model_version

__all__ = ["ParameterServer", "PsOptions", "PsState"]

log = logging.getLogger("trainer.ps")

FloatArray = npt.NDArray[np.float32]
Weights = dict[str, FloatArray]

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
        self.name = name
        self._emit = emit
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
        self.state = PsState.DONE if start_version >= options.total_steps else PsState.WAITING
        self.started = time.time()
        self.sessions = SessionTable(session_lease_s)
        self._lock = threading.Lock()
        self._pull_cache = PullCache()
        self.refusals: collections.Counter[str] = collections.Counter()
        #: tensors that crossed the wire with a peer: complete tensors decoded from pushes,
        #: tensors streamed (at least their first piece) to pulls
        self.tensors_received = 0
        self.tensors_sent = 0
        self.timings: dict[str, float] = collections.defaultdict(float)
        self.events = EventLog()
        self._last_progress = 0.0
        self.housekeeping = Housekeeper(
            store=store, evaluate=evaluate, emit=self._event, start_version=start_version,
            metadata={**(checkpoint_metadata or {}), "mode": str(options.mode),
                      "model": options.model_name},
        )
        self.finished = threading.Event()
        self.result: dict[str, Any] = {}
        self._finishing = False
        if self.state is PsState.DONE:
            self._finish(start_version)

    # ------------------------------------------------------------------ state

    @property
    def session_lease_s(self) -> float:
        """Seconds a quiet connection keeps its worker's session (``ps_sessions``)."""
        return self.sessions.lease_s

    @session_lease_s.setter
    def session_lease_s(self, value: float) -> None:
        self.sessions.lease_s = value

    @property
    def store(self) -> CheckpointStore | None:
        return self.housekeeping.store

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
        self.events.append(event)
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
            self.housekeeping.checkpoint(version, new, self.optimizer.state())
        if opts.eval_every and version % opts.eval_every == 0 and version < opts.total_steps:
            self.housekeeping.evaluate_later(version, new)
        now = time.monotonic()
        if now - self._last_progress >= 0.2 or version >= opts.total_steps:
            self._last_progress = now
            self._event("progress", done=version, total=opts.total_steps, unit="steps",
                        label="training", contributors=list(update.contributors),
                        staleness=update.staleness)

    def _finish(self, version: int) -> None:
        """Close aggregation, write the last checkpoint, evaluate, and announce ``done``."""
        with self._lock:
            if self._finishing:
                return
            self._finishing = True
            self.state = PsState.DONE
        self.aggregator.close()
        weights = self.weights()
        housekeeping = self.housekeeping
        if self.store is not None and housekeeping.last_queued != version:
            housekeeping.checkpoint(version, weights, self.optimizer.state())
        housekeeping.join()  # every queued checkpoint is on disk before "done"
        evaluation: dict[str, float] = {}
        try:
            evaluation = housekeeping.evaluate(version, weights)
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
            "checkpoint_step": housekeeping.last_written if self.store is not None else None,
            "checkpoint_failures": housekeeping.failures,
        }
        self._event("lifecycle", state="done", detail=f"training finished at step {version}",
                    **self.result)
        self.finished.set()

    def close(self) -> None:
        self.aggregator.close()
        self.housekeeping.stop()
        self.events.wake()

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
        with self.sessions.call(caller) as refusal:
            if refusal is not None:
                self._refuse_with(context, refusal, caller.role)
            yield caller.role

    def _refuse_with(self, context: grpc.ServicerContext, refusal: Refusal, who: str) -> NoReturn:
        self._refuse(context, refusal.code, refusal.message, who)

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
        previous, refusal = self.sessions.register(name, index, caller)
        if refusal is not None:
            self._refuse_with(context, refusal, who)
        with self._lock:
            if self.state is PsState.WAITING:
                self.state = PsState.TRAINING
        how = "registered"
        if previous is not None:
            superseded = previous.session.caller.fingerprint != caller.fingerprint
            how = "re-registered with a newer certificate" if superseded else "re-registered"
        self._event("log", level="info", message=f"{name} {how} at step {self.version}",
                    peer=name)
        return pb.RegisterReply(
            worker_id=name,
            aggregation=MODES[self.options.mode],
            model=[spec.to_proto() for spec in self.specs],
            model_version=self.version,
            config=self.options.training_config(self.aggregator.quorum,
                                                self.aggregator.staleness_bound),
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
            if self.state is PsState.DONE or self.finished.is_set():
                self.sessions.release(who)
                self._refuse(context, grpc.StatusCode.OUT_OF_RANGE,
                             f"training finished at step {self.version}; there is no step "
                             f"{wanted}", who)
            if not context.is_active():
                return
            self.aggregator.wait_for_version(wanted, timeout=0.5)
        wire = request.wire_dtype or WIRE[self.options.wire_dtype]
        if wire not in WIRE_NAMES:
            self._refuse(context, grpc.StatusCode.INVALID_ARGUMENT,
                         f"wire dtype {wire} is not float32, float16 or bfloat16", who)
        version, chunks = self._chunks(wire)
        if version >= self.options.total_steps:
            self.sessions.release(who)
        for chunk in chunks:
            with self._lock:
                self.tensors_sent += chunk.tensors_started
            yield chunk.data

    def wait_workers_released(self, timeout_s: float) -> bool:
        """After training: wait until every registered worker has been told it is over."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.sessions.all_released():
                return True
            time.sleep(0.1)
        return False

    def _chunks(self, wire: int) -> tuple[int, list[SerializedChunk]]:
        """The current parameters as serialized chunks, made once per version and wire dtype:
        every worker's pull of a version is sent the same bytes objects."""
        version, weights = self._snapshot

        def encode() -> list[SerializedChunk]:
            started = time.perf_counter()
            chunks = list(serialize_tensors(
                weights,
                header=pb.StreamHeader(kind=pb.UPDATE_KIND_WEIGHTS, model_version=version),
                wire_dtype=WIRE_NAMES[wire],
                chunk_bytes=self.options.chunk_bytes,
            ))
            self.timings["encode_s"] += time.perf_counter() - started
            return chunks

        return version, self._pull_cache.get(version, wire, encode)

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
        if self.finished.is_set() or self.state is PsState.DONE:
            self.sessions.release(who)
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
        refusal = refusal_for(outcome, who)
        if refusal is not None:
            self._refuse_with(context, refusal, who)
        self.sessions.record_update(who, accepted=outcome.accepted,
                                    version=header.model_version)
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
        for seq, event in self.events.follow(request.since_seq, context.is_active,
                                             self.finished.is_set):
            if not kinds or event.kind in kinds:
                yield pb.Event(seq=seq, kind=event.kind, timestamp=event.time,
                               source=event.source, payload_json=_json(event.data))

    def Status(self, request: pb.StatusRequest, context: grpc.ServicerContext) -> Any:
        caller_role(context)
        workers = [
            pb.WorkerStatus(worker_id=r.worker_id, name=r.worker_id, worker_index=r.index,
                            updates=r.updates, last_version=r.last_version,
                            last_seen=r.last_seen)
            for r in self.sessions.records()
        ]
        return pb.StatusReply(
            state=str(self.state),
            aggregation=MODES[self.options.mode],
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
    return json.dumps(data, default=str)
