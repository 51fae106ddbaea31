"""The parameter server: holds the global model, aggregates worker updates, serves parameters.

It only ever runs behind the attested mesh (``serve_ps``): every RPC comes from a peer whose
mesh certificate and embedded TD evidence were verified before the handler runs, and the
caller's identity is the role in that certificate, never a field of the request.
"""

from __future__ import annotations

import collections
import contextlib
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
from trainer.buffer_pool import DECODE_POOL
from trainer.flat import FlatTensors, flat_layout
from trainer.optim import MomentumSGD
from trainer.proto import parameter_server_pb2 as pb
from trainer.proto import parameter_server_pb2_grpc as rpc
from trainer.ps_jobs import (
    EventLog,
    Housekeeper,
    PullCache,
    SerializedStream,
    StreamQuota,
    event_json,
)
from trainer.ps_options import (
    MAX_PULL_AHEAD,
    MAX_PULLS_PER_ROLE,
    MAX_WATCHES_PER_ROLE,
    MODES,
    PULL_WAIT_LIMIT_S,
    WATCH_LIMIT_S,
    WIRE,
    WIRE_NAMES,
    PsOptions,
    PsState,
    pull_too_far,
)
from trainer.ps_screening import UpdateScreen, non_finite
from trainer.ps_sessions import (
    SESSION_LEASE_S,
    Refusal,
    SessionTable,
    caller_identity,
    caller_role,
    refusal_for,
)
from trainer.tensor_decode import StreamAssembler
from trainer.tensor_wire import WireChunk
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
        initial = {s.name: np.asarray(weights[s.name], dtype=np.float32) for s in self.specs}
        #: the model as one flat buffer (trainable, then non-trainable) when it is all float32
        self.layout = flat_layout(self.specs)
        self._snapshot: tuple[int, Weights] = (
            start_version,
            self.layout.gather(initial) if self.layout is not None else initial,  # type: ignore
        )
        bad = non_finite(self._snapshot[1])
        if bad is not None:
            raise ConfigError(
                f"the initial weights hold {bad[1]} NaN/Inf values in {bad[0]!r}.",
                fix="start from the model's own weights or an earlier checkpoint (this PS "
                "refuses every update that would make its weights non-finite).",
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
            rule=options.aggregation_rule,
            trim_fraction=options.trim_fraction,
        )
        self.state = PsState.DONE if start_version >= options.total_steps else PsState.WAITING
        self.started = time.time()
        self.sessions = SessionTable(session_lease_s)
        self.screen = UpdateScreen(options, optimizer, lambda: self._snapshot, self._event)
        self._lock = threading.Lock()
        #: held across a membership change (Register, Leave), its line and its quorum refit, and
        #: by every refit: another worker's pull refits every 0.5 s, and one that saw a leave
        #: before the Leave call logged it announced the hold before the "left" line
        self._membership = threading.RLock()
        #: the live quorum and live count last announced (``_fit_quorum``)
        self._live_seen: tuple[int, int] = (0, -1)
        self._pull_cache = PullCache()
        #: long calls per role (see MAX_PULLS_PER_ROLE) and how long each may last
        self.pull_quota = StreamQuota(MAX_PULLS_PER_ROLE, "pulls in flight", "pull once at a "
                                      "time; wait for a pull to end before starting another")
        self.watch_quota = StreamQuota(MAX_WATCHES_PER_ROLE, "event watches", "watch once, "
                                       "and resume with since_seq when a watch ends")
        self.max_pull_wait_s = PULL_WAIT_LIMIT_S
        self.max_watch_s = WATCH_LIMIT_S
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
        """Called by the aggregator under its lock; must leave the PS at ``update.version``.

        New weights (or optimizer velocities) that are not all finite are never committed:
        the optimizer is put back, and the aggregator discards the step (``_overflow``)."""
        started = time.perf_counter()
        _, current = self._snapshot
        saved = None
        flat = self._apply_flat(update, current)
        if flat is not None:
            new, saved = flat
        elif update.mode is Mode.FEDAVG:
            new = dict(current)
            new.update(update.tensors)
        else:
            saved = self.optimizer.state()
            with np.errstate(over="ignore", invalid="ignore"):  # an overflow is refused below
                new = self.optimizer.apply(current, update.tensors)
        if flat is None:
            new.update(update.non_trainable)
        if flat is None or new is not getattr(update.tensors, "whole", None):
            self.screen.refuse_non_finite(update, new, saved)
        # else: one worker's decoded push, adopted whole; the stream decoder (or the
        # aggregator's validation) found both its parts finite already
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

    def _apply_flat(self, update: Update, current: Mapping[str, FloatArray]
                    ) -> tuple[Weights, dict[str, Any] | None] | None:
        """The new weights in one new flat buffer: the optimizer over the trainable part, the
        averaged statistics copied over the rest; None when the update is not flat."""
        tensors, stats = update.tensors, update.non_trainable
        if not (isinstance(current, FlatTensors) and isinstance(tensors, FlatTensors)
                and tensors.layout.same_as(current.layout.trainable)
                and (not stats or (isinstance(stats, FlatTensors)
                                   and stats.layout.same_as(current.layout.non_trainable)))):
            return None
        layout = current.layout
        whole = tensors.whole
        if (update.mode is Mode.FEDAVG and whole is not None and isinstance(stats, FlatTensors)
                and stats.whole is whole and whole.layout.same_as(layout)):
            # one worker's model, as decoded from its push: the new weights as they are
            return whole, None  # type: ignore[return-value]
        split = layout.trainable_size
        buffer = DECODE_POOL.take_floats(layout.size)  # an earlier version's, once unused
        saved = None
        if update.mode is Mode.FEDAVG:
            buffer[:split] = tensors.buffer
        else:
            saved = self.optimizer.state()
            with np.errstate(over="ignore", invalid="ignore"):  # an overflow is refused later
                self.optimizer.apply_flat(current.buffer[:split], tensors.buffer,
                                          out=buffer[:split])
        buffer[split:] = stats.buffer if isinstance(stats, FlatTensors) else current.buffer[split:]
        return FlatTensors(buffer, layout), saved  # type: ignore[return-value]

    def _finish(self, version: int) -> None:
        """Close aggregation, write the last checkpoint, evaluate, and announce ``done``."""
        with self._lock:
            if self._finishing:
                return
            self._finishing = True
            self.state = PsState.DONE
        self.aggregator.close()
        housekeeping = self.housekeeping
        evaluation = housekeeping.final(version, self.weights(), self.optimizer.state())
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

    def _fit_quorum(self) -> None:
        """``quorum_rule: live``: K of the workers live now (at least 1, at most the run's K),
        so a worker that leaves stops counting at once (Leave) or when its lease lapses, and
        one that joins counts from its registration. With ``min_live_workers`` M, K is at
        least M: no step completes while fewer than M are live (the run holds)."""
        if not self.options.live_quorum or self.options.mode is Mode.ASYNC:
            return
        rule = self.options.quorum or self.options.num_workers
        floor = min(self.options.min_live, self.options.num_workers)
        with self._membership:
            live = self.sessions.live_count()
            quorum = max(1, floor, min(rule, live))
            with self._lock:
                changed, self._live_seen = (quorum, live) != self._live_seen, (quorum, live)
            if quorum != self.aggregator.quorum:
                self.aggregator.set_quorum(quorum)
            if changed:
                held = (f"; holding until {floor - live} more worker(s) join"
                        if live < floor else "")
                self._event("log", level="info", message=f"quorum K={quorum} of the live "
                            f"workers (rule K={rule}, {live} live) at step {self.version}{held}")

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
        with self._membership:  # "registered" comes before the quorum line it causes
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
            self._fit_quorum()
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
        with self._session_call(context) as who, self.pull_quota.hold(who) as granted:
            if not granted:
                self._refuse(context, grpc.StatusCode.RESOURCE_EXHAUSTED,
                             self.pull_quota.refusal(who), who)
            yield from self._pull(who, request, context)

    def _pull(
        self, who: str, request: pb.PullRequest, context: grpc.ServicerContext
    ) -> Iterator[bytes]:
        wanted = request.min_version
        deadline = time.monotonic() + self.max_pull_wait_s
        if self.version < wanted:
            # a worker that gives up a pull it started early (its push was refused) frees
            # this thread and its pull quota at once, not at the next poll
            context.add_callback(self.aggregator.wake)
        while self.version < wanted:
            if self.state is PsState.DONE or self.finished.is_set():
                self.sessions.release(who)
                self._refuse(context, grpc.StatusCode.OUT_OF_RANGE,
                             f"training finished at step {self.version}; there is no step "
                             f"{wanted}", who)
            if wanted > self.version + MAX_PULL_AHEAD:
                self._refuse(context, grpc.StatusCode.INVALID_ARGUMENT,
                             pull_too_far(wanted, self.version), who)
            if not context.is_active():
                return
            left = deadline - time.monotonic()
            if left <= 0:
                self._refuse(context, grpc.StatusCode.DEADLINE_EXCEEDED,
                             f"step {wanted} did not come within {self.max_pull_wait_s:g} s (the "
                             f"PS is at step {self.version}); pull again", who)
            self._fit_quorum()  # a worker that left must not hold this step
            self.aggregator.wait_for_version(wanted, timeout=min(0.5, left))
        wire = request.wire_dtype or WIRE[self.options.wire_dtype]
        if wire not in WIRE_NAMES:
            self._refuse(context, grpc.StatusCode.INVALID_ARGUMENT,
                         f"wire dtype {wire} is not float32, float16 or bfloat16", who)
        version, chunks = self._chunks(wire, request.flat)
        try:
            for chunk in chunks:
                with self._lock:
                    self.tensors_sent += chunk.tensors_started
                yield chunk.data
        finally:
            if version >= self.options.total_steps:
                # told once the final model is sent (or the worker gave up on it), not when
                # its stream starts: ps0 --exit-when-done stops serving, with a 1 s grace, once
                # every worker was told, and a final stream still in flight then was cut
                self.sessions.release(who)

    def wait_workers_released(self, timeout_s: float) -> bool:
        """After training: wait until every registered worker has been told it is over."""
        return self.sessions.wait_all_released(timeout_s)

    def _chunks(self, wire: int, flat: bool = False) -> tuple[int, SerializedStream]:
        """The current parameters as serialized chunks, made once per version and wire dtype:
        a flat stream when asked for (and the model has a flat form), else tensor by tensor."""
        version, weights = self._snapshot
        if isinstance(weights, FlatTensors) and not flat:
            weights = dict(weights)
        return version, self._pull_cache.chunks_for(version, weights, WIRE_NAMES[wire], wire,
                                                    self.options.chunk_bytes, self.timings)

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
        probe = self.screen.norm_probe()
        assembler = StreamAssembler(self.specs, on_elements=probe)
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
        problem = self.screen.header_problem(who, header)
        if problem is not None:
            self._refuse(context, *problem, who)
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
        if isinstance(tensors, FlatTensors):  # views of the two parts of the buffer
            trainable, frozen = tensors.trainable, tensors.non_trainable
        else:
            trainable = {name: tensors[name] for name in self._trainable}  # type: ignore
            frozen = {name: tensors[name] for name in self._frozen}  # type: ignore
        trainable = self.screen.bounded(who, header.model_version, trainable,  # type: ignore
                                        probe)
        try:
            outcome = self.aggregator.submit(
                who,
                header.model_version,
                trainable,
                num_samples=self.screen.weight_of(who, header.num_samples,
                                                  self.sessions.index_of(who)),
                non_trainable=frozen,
                checked_finite=True,  # the stream decoder refused NaN/Inf already
            )
        except TensorValidationError as e:  # the step's new weights would be non-finite
            self._refuse(context, e.code, e.one_line(), who)
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
        """The PS's events after ``since_seq`` as they come, for at most ``max_watch_s``
        (then the stream ends; resume with the last ``seq``), at most two per role at once."""
        who = caller_role(context)
        with self.watch_quota.hold(who) as granted:
            if not granted:
                self._refuse(context, grpc.StatusCode.RESOURCE_EXHAUSTED,
                             self.watch_quota.refusal(who), who)
            kinds = set(request.kinds)
            deadline = time.monotonic() + self.max_watch_s
            for seq, event in self.events.follow(request.since_seq, context.is_active,
                                                 self.finished.is_set, deadline):
                if not kinds or event.kind in kinds:
                    yield pb.Event(seq=seq, kind=event.kind, timestamp=event.time,
                                   source=event.source, payload_json=event_json(event.data))

    def Leave(self, request: pb.LeaveRequest, context: grpc.ServicerContext) -> Any:
        """A worker leaves: it stops counting towards a live quorum now, not when its lease
        lapses, so the others' next step does not wait for it."""
        reason = request.reason[:200]
        with self._membership:  # "left" comes before the hold it causes (see _membership)
            with self._session_call(context) as who:
                self.sessions.leave(who)
            self._event("log", level="info", message=f"{who} left at step {self.version}"
                        + (f" ({reason})" if reason else ""), peer=who)
            self._fit_quorum()
        return pb.Ack(ok=True, detail="left")

    def Status(self, request: pb.StatusRequest, context: grpc.ServicerContext) -> Any:
        caller_role(context)
        return pb.StatusReply(
            state=str(self.state),
            aggregation=MODES[self.options.mode],
            model_version=self.version,
            total_steps=self.options.total_steps,
            workers=[pb.WorkerStatus(worker_id=r.worker_id, name=r.worker_id,
                                     worker_index=r.index, updates=r.updates,
                                     last_version=r.last_version, last_seen=r.last_seen)
                     for r in self.sessions.records()],
            uptime_seconds=time.time() - self.started,
        )
