"""A worker: register, pull, compute on its private shard, push, repeat, over the attested mesh.

Batches are chosen deterministically: in ``sync`` mode the batch of global step ``v`` is
``stream.batch(v)``, so a run is reproducible step for step; in ``async`` mode a worker walks its
own stream; in ``fedavg`` mode round ``v`` uses local steps ``v*E .. v*E+E-1``.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import grpc
import numpy as np
import numpy.typing as npt

from hfl_lab._exceptions import ConfigError, HflLabError, WorkerError
from hfl_lab.config import LabConfig
from hfl_lab.events import LabEvent
from hfl_lab.trust.mesh import MESH_CA_CHECK
from trainer.data import BatchStream, load_cifar10, partition
from trainer.flat import FlatLayout, FlatTensors, flat_layout
from trainer.model import ResNet
from trainer.optim import MomentumSGD, PiecewiseConstantSchedule
from trainer.proto import parameter_server_pb2 as pb
from trainer.proto import parameter_server_pb2_grpc as rpc
from trainer.tensor_decode import StreamAssembler
from trainer.tensor_wire import PULL_METHOD, PUSH_METHOD, parse_chunk, serialize_tensors
from trainer.tensors import TensorSpec

__all__ = ["PendingPull", "PsConnection", "StepRecord", "Worker", "WorkerSummary",
           "worker_batches"]

log = logging.getLogger("trainer.worker")

FloatArray = npt.NDArray[np.float32]
_WIRE_NAMES = {pb.DTYPE_FLOAT32: "float32", pb.DTYPE_FLOAT16: "float16",
               pb.DTYPE_BFLOAT16: "bfloat16"}
_MODE_NAMES = {pb.AGGREGATION_MODE_SYNC: "sync", pb.AGGREGATION_MODE_ASYNC: "async",
               pb.AGGREGATION_MODE_FEDAVG: "fedavg"}
#: gRPC status codes after which a worker reconnects (the PS restarts or is briefly away)
RECONNECT_CODES = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED,
                             grpc.StatusCode.CANCELLED})
MAX_MESSAGE_BYTES = 8 << 20


@dataclass(frozen=True)
class StepRecord:
    """One step as the worker saw it; the dashboard's metrics event."""

    step: int
    loss: float
    accuracy: float
    lr: float
    compute_s: float
    push_s: float
    wait_s: float
    pull_s: float
    bytes_sent: int
    bytes_received: int
    accepted: bool
    staleness: int

    def event_data(self, role: str) -> dict[str, Any]:
        return {"role": role, **self.__dict__}


@dataclass
class WorkerSummary:
    steps: list[StepRecord] = field(default_factory=list)
    final_version: int = 0
    reconnects: int = 0
    finished: bool = False


@dataclass(frozen=True)
class Pulled:
    version: int
    weights: dict[str, FloatArray]
    wait_s: float
    transfer_s: float
    nbytes: int


class PendingPull:
    """A pull in flight: its stream is read, decoded and validated by :meth:`result`."""

    def __init__(self, stream: Any, specs: Sequence[TensorSpec], min_version: int) -> None:
        self._stream = stream
        self._specs = specs
        self.min_version = min_version

    def result(self) -> Pulled:
        """The pulled parameters. ``wait_s`` counts from this call to the first chunk: for a
        pull started early, only the wait that was left."""
        started = time.perf_counter()
        first: float | None = None
        assembler = StreamAssembler(self._specs)
        for chunk in self._stream:
            if first is None:
                first = time.perf_counter()
            assembler.add(chunk)
        decoded = assembler.finish()
        end = time.perf_counter()
        first = first or end
        return Pulled(decoded.header.model_version, decoded.tensors,  # type: ignore[arg-type]
                      first - started, end - first, assembler.received_bytes)

    def cancel(self) -> None:
        self._stream.cancel()


class PsConnection:
    """The PS stub with chunked transfers, timing and byte counts.

    Tensor streams bypass the stub's protobuf (de)serialization: pushes are sent as chunks
    serialized by ``trainer.tensor_wire`` and pulls are read by its parser, the same bytes on
    the wire with fewer copies of the tensor data.
    """

    def __init__(self, channel: grpc.Channel, *, timeout_s: float = 600.0) -> None:
        self.channel = channel
        self.stub = rpc.ParameterServerStub(channel)  # type: ignore[no-untyped-call]
        self.timeout_s = timeout_s
        self._pull = channel.unary_stream(
            PULL_METHOD, request_serializer=pb.PullRequest.SerializeToString,
            response_deserializer=parse_chunk,
        )
        self._push = channel.stream_unary(
            PUSH_METHOD, request_serializer=None,  # already bytes
            response_deserializer=pb.PushReply.FromString,
        )

    def close(self) -> None:
        self.channel.close()

    def leave(self, reason: str, timeout_s: float = 5.0) -> None:
        """Tell the PS this worker leaves the run (it stops counting towards the quorum)."""
        self.stub.Leave(pb.LeaveRequest(reason=reason), timeout=timeout_s)

    def register(self, name: str, index: int) -> pb.RegisterReply:
        reply: pb.RegisterReply = self.stub.Register(
            pb.RegisterRequest(role="worker", name=name, worker_index=index),
            timeout=30,
        )
        return reply

    def pull(
        self, worker_id: str, min_version: int, specs: Sequence[TensorSpec], wire: int = 0,
        *, flat: bool = True,
    ) -> Pulled:
        """The parameters of ``min_version`` or later, sent as a flat stream unless ``flat``
        is False; either way the weights are a ``FlatTensors`` when the model is all float32."""
        return self.start_pull(worker_id, min_version, specs, wire, flat=flat).result()

    def start_pull(
        self, worker_id: str, min_version: int, specs: Sequence[TensorSpec], wire: int = 0,
        *, flat: bool = True,
    ) -> PendingPull:
        """:meth:`pull`, started now and read by :meth:`PendingPull.result` later: the call is
        set up (and the PS starts waiting for ``min_version``) meanwhile."""
        stream = self._pull(
            pb.PullRequest(worker_id=worker_id, min_version=min_version,
                           wire_dtype=wire, flat=flat),  # type: ignore[arg-type]
            timeout=self.timeout_s,
        )
        return PendingPull(stream, specs, min_version)

    def push(
        self,
        tensors: Mapping[str, npt.NDArray[Any]],
        header: pb.StreamHeader,
        *,
        wire_dtype: str = "float32",
        chunk_bytes: int = 1 << 20,
    ) -> tuple[pb.PushReply, float, int]:
        sent = [0]

        def counted() -> Iterator[bytes]:
            for chunk in serialize_tensors(tensors, header=header, wire_dtype=wire_dtype,
                                           chunk_bytes=chunk_bytes):
                sent[0] += chunk.tensor_bytes
                yield chunk.data

        started = time.perf_counter()
        reply: pb.PushReply = self._push(counted(), timeout=self.timeout_s)
        return reply, time.perf_counter() - started, sent[0]


_PARTITIONS: dict[str, Literal["iid", "dirichlet"]] = {"iid": "iid", "dirichlet": "dirichlet"}


def worker_batches(lab: LabConfig, index: int) -> tuple[BatchStream, int]:
    """This worker's private shard as a batch stream, and the size of the whole training set."""
    data = load_cifar10(lab.require_data_path(), sha256=lab.data_sha256)
    scheme = _PARTITIONS.get(lab.partition)
    if scheme is None:  # LabConfig has checked it already
        raise ConfigError(f"unknown partition {lab.partition!r}.", fix="use 'iid' or 'dirichlet'.")
    parts = partition(data.train_labels, lab.workers, scheme,
                      alpha=lab.dirichlet_alpha, seed=lab.seed)
    stream = BatchStream(data.train_images, data.train_labels, parts[index], lab.batch_size,
                         seed=lab.seed * 1_000 + index, augmented=lab.augment)
    return stream, len(data.train_labels)


class Worker:
    """Runs the training loop of one worker until the PS says training is finished."""

    def __init__(
        self,
        index: int,
        model: ResNet,
        stream: BatchStream,
        connect: Callable[[], grpc.Channel],
        *,
        schedule: PiecewiseConstantSchedule | None = None,
        momentum: float = 0.9,
        weight_decay: float = 2e-4,
        emit: Callable[[LabEvent], None] | None = None,
        on_registered: Callable[[pb.RegisterReply], None] | None = None,
        reconnect_timeout_s: float = 120.0,
        max_steps: int | None = None,
        generation: Callable[[], int] | None = None,
        reattest: Callable[[], bool] | None = None,
    ) -> None:
        self.index = index
        self.name = f"worker{index}"
        self.model = model
        self.stream = stream
        self._connect = connect
        self.schedule = schedule
        self.momentum = momentum
        self.weight_decay = weight_decay
        self._emit = emit
        self._on_registered = on_registered
        self.reconnect_timeout_s = reconnect_timeout_s
        self.max_steps = max_steps
        #: the mesh identity's renewal count: a change means "reconnect with the new certificate"
        self._generation = generation
        #: attest again with a trust service that came back (ps0's certificate is from
        #: another mesh CA than this worker's): True when new credentials are in place
        self._reattest = reattest
        self._seen_generation = generation() if generation is not None else 0
        self.summary = WorkerSummary()
        self._conn: PsConnection | None = None
        self._specs: list[TensorSpec] = []
        self._layout: FlatLayout | None = None
        self._reply: pb.RegisterReply | None = None
        self._local_step = 0
        #: the next step's pull, started before this step's push (see _step)
        self._prefetched: PendingPull | None = None
        #: a pull already read (at a certificate renewal), which the next step uses
        self._ready: Pulled | None = None

    # -- connection ----------------------------------------------------------------------

    def _event(self, kind: str, **data: Any) -> None:
        if self._emit is not None:
            self._emit(LabEvent(kind, self.name, data))

    def _register(self) -> PsConnection:
        conn = PsConnection(self._connect())
        try:
            reply = conn.register(self.name, self.index)
        except BaseException:
            conn.close()
            raise
        specs = [TensorSpec.from_proto(s) for s in reply.model]
        own = {s.name: (s.shape, s.trainable) for s in self.model.variable_specs}
        theirs = {s.name: (s.shape, s.trainable) for s in specs}
        if own != theirs:
            conn.close()
            diff = sorted(set(own.items()) ^ set(theirs.items()))[:2]
            raise WorkerError(
                f"the PS announces a different model ({reply.config.model}) than this worker "
                f"built (resnet{self.model.depth}); first differences: {diff}.",
                fix="start every participant from the same config file.",
            )
        self._specs = specs
        #: the model's tensors as one flat buffer: how updates travel (None: tensor by tensor)
        self._layout = flat_layout(specs)
        self._reply = reply
        if self._on_registered is not None:
            self._on_registered(reply)
        return conn

    def _reconnect(self, reason: str, *, first: bool = False) -> PsConnection:
        """(Re)connect with back-off: verify the PS's attestation again and re-register."""
        self._drop_prefetched()
        if self._conn is not None:
            self._conn.close()
            self._conn = None
        if not first:
            self.summary.reconnects += 1
            self._event("log", level="warning",
                        message=f"{self.name}: PS unreachable ({reason}); reconnecting")
        deadline = time.monotonic() + self.reconnect_timeout_s
        delay = 0.2
        while True:
            try:
                conn = self._register()
            except grpc.RpcError as e:
                # ALREADY_EXISTS: this role's previous session (same certificate, another
                # connection) has not lapsed yet; the PS accepts us once it has
                retry = e.code() in RECONNECT_CODES or e.code() == grpc.StatusCode.ALREADY_EXISTS
                if not retry or time.monotonic() + delay > deadline:
                    raise self._fatal(e) from None
            except HflLabError as e:
                check = getattr(e, "check", None)
                if check == MESH_CA_CHECK and self._reattest is not None \
                        and time.monotonic() < deadline:
                    self._event("log", level="warning", message=(
                        f"{self.name}: ps0's certificate is from another mesh CA (the trust "
                        "service restarted?); attesting again"))
                    if self._reattest() and self._generation is not None:
                        self._seen_generation = self._generation()
                elif check != "connection" or time.monotonic() > deadline:
                    raise
            else:
                if not first:
                    self._event("log", level="info",
                                message=f"{self.name}: reconnected at step {self._version()}")
                return conn
            time.sleep(delay)
            delay = min(2.0, delay * 2)

    def _version(self) -> int:
        return self._reply.model_version if self._reply is not None else 0

    def _fatal(self, e: grpc.RpcError) -> WorkerError:
        code = e.code()
        detail = e.details() or ""
        if code in (grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.UNAUTHENTICATED):
            fix = "check this worker's attestation: its TD evidence must satisfy the policy."
        elif code in RECONNECT_CODES:
            fix = "the PS stayed unreachable; check that it runs (its log is in the run folder)."
        else:
            fix = "start every participant from the same config file and code."
        return WorkerError(f"{self.name}: the PS refused or failed ({code.name}): {detail}",
                           fix=fix)

    # -- training --------------------------------------------------------------------------

    def run(self) -> WorkerSummary:
        """Train until the PS says the run is over (or ``max_steps``); on Ctrl-C/SIGTERM
        (KeyboardInterrupt) or ``max_steps`` tell the PS this worker leaves, so a live quorum
        stops waiting for it at once."""
        try:
            summary = self._run()
        except KeyboardInterrupt:
            self._leave("stopped")
            raise
        if self.max_steps is not None and len(summary.steps) >= self.max_steps \
                and not summary.finished:
            self._leave(f"left after {len(summary.steps)} steps")
        if self._conn is not None:
            self._conn.close()
        return summary

    def _leave(self, reason: str) -> None:
        self._drop_prefetched()
        conn = self._conn
        if conn is None:
            return
        try:
            conn.leave(reason)
        except grpc.RpcError as e:  # the PS is gone or the run is over: nothing to tell
            log.info("%s: could not tell the PS it leaves (%s)", self.name, e.code().name)
        else:
            self._event("log", level="info", message=f"{self.name} left the run ({reason})")
        finally:
            conn.close()
            self._conn = None

    def _run(self) -> WorkerSummary:
        self._conn = self._reconnect("starting", first=True)
        assert self._reply is not None
        mode = _MODE_NAMES.get(self._reply.aggregation, "sync")
        next_version = self._reply.model_version
        total = self._reply.config.total_steps
        while True:
            if self.max_steps is not None and len(self.summary.steps) >= self.max_steps:
                break
            if self._generation is not None and self._generation() != self._seen_generation:
                self._seen_generation = self._generation()
                # This step's pull, started on the old connection, is read there first (its
                # certificate is still valid: renewal comes at half-life). After the last step
                # it says the run is over, and ps0, whose every worker has then been sent the
                # final model, may be gone before a new connection could register.
                self._ready = self._read_prefetched(next_version)
                if self._ready is None or self._ready.version < total:
                    self._conn = self._reconnect("mesh certificate renewed", first=True)
            try:
                record, next_version = self._step(mode, next_version)
            except grpc.RpcError as e:
                self._drop_prefetched()
                code = e.code()
                if code == grpc.StatusCode.OUT_OF_RANGE:
                    self.summary.finished = True
                    break
                if code in RECONNECT_CODES:
                    self._conn = self._reconnect(e.details() or code.name)
                    # a restarted PS resumes from its last checkpoint, maybe behind us
                    next_version = self._version()
                    continue
                if code in (grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.ALREADY_EXISTS):
                    # stale, not (or no longer) registered, or a duplicate: catch up and go on
                    self._event("log", level="warning",
                                message=f"{self.name}: {code.name}: {e.details()}")
                    if "register" in (e.details() or ""):
                        self._conn = self._reconnect("asked to register again", first=True)
                        next_version = self._version()
                    continue
                raise self._fatal(e) from None
            if record is None:
                self.summary.finished = True
                break
            self.summary.steps.append(record)
            self._event("metrics", **record.event_data(self.name))
            if next_version > total:
                break
        self.summary.final_version = next_version
        self._drop_prefetched()
        return self.summary

    def _take_prefetched(self, min_version: int) -> PendingPull | None:
        """The prefetched pull if it is for ``min_version`` (one for another is cancelled)."""
        pending, self._prefetched = self._prefetched, None
        if pending is not None and pending.min_version != min_version:
            pending.cancel()
            return None
        return pending

    def _read_prefetched(self, min_version: int) -> Pulled | None:
        """The prefetched pull of ``min_version``, read now; None if there is none or its call
        failed (the next step pulls again)."""
        pending = self._take_prefetched(min_version)
        if pending is None:
            return None
        try:
            return pending.result()
        except grpc.RpcError:
            return None

    def _drop_prefetched(self) -> None:
        pending, self._prefetched = self._prefetched, None
        if pending is not None:
            pending.cancel()

    def _step(self, mode: str, min_version: int) -> tuple[StepRecord | None, int]:
        assert self._conn is not None and self._reply is not None
        config = self._reply.config
        pulled, self._ready = self._ready, None
        if pulled is None or pulled.version < min_version:
            pending = self._take_prefetched(min_version)
            if pending is None:
                pending = self._conn.start_pull(self.name, min_version, self._specs)
            pulled = pending.result()
        version = pulled.version
        if version >= config.total_steps:
            return None, version
        started = time.perf_counter()
        self.model.set_weights(pulled.weights)
        if mode == "fedavg":
            tensors, loss, accuracy, samples, lr = self._local_round(pulled.weights, version,
                                                                     config.local_steps)
            kind = pb.UPDATE_KIND_WEIGHTS
        else:
            step = version if mode == "sync" else self._local_step
            x, y = self.stream.batch(step)
            result = self.model.compute_gradients(x, y)
            flat = getattr(result, "flat", None)  # a replayed result may have none
            tensors = (flat if flat is not None and self._layout is not None
                       and flat.layout.same_as(self._layout)
                       else {**result.gradients, **result.non_trainable})
            loss, accuracy, samples = result.loss, result.accuracy, result.num_samples
            lr = self.schedule(version) if self.schedule is not None else 0.0
            kind = pb.UPDATE_KIND_GRADIENTS
        self._local_step += 1
        compute_s = time.perf_counter() - started
        ordered: Mapping[str, npt.NDArray[Any]] = (
            tensors if isinstance(tensors, FlatTensors)
            else self._layout.gather(tensors) if self._layout is not None
            else {spec.name: tensors[spec.name] for spec in self._specs})
        header = pb.StreamHeader(
            kind=kind,
            model_version=version,
            worker_id=self.name,
            num_samples=samples,
            metrics=pb.StepMetrics(step=version, loss=loss, accuracy=accuracy,
                                   learning_rate=lr, compute_seconds=compute_s),
        )
        # The next step's pull starts before this push: its call is set up, and ps0 waits in
        # it, while ps0 takes and applies this update; one call's latency less per step. Not
        # after the last step this worker was asked for: nobody would read it.
        if self.max_steps is None or len(self.summary.steps) + 1 < self.max_steps:
            self._prefetched = self._conn.start_pull(self.name, version + 1, self._specs)
        reply, push_s, sent = self._conn.push(
            ordered, header, wire_dtype=_WIRE_NAMES.get(config.wire_dtype, "float32"),
            chunk_bytes=config.chunk_bytes or (1 << 20),
        )
        record = StepRecord(
            step=version, loss=loss, accuracy=accuracy, lr=lr, compute_s=compute_s,
            push_s=push_s, wait_s=pulled.wait_s, pull_s=pulled.transfer_s, bytes_sent=sent,
            bytes_received=pulled.nbytes, accepted=reply.accepted, staleness=reply.staleness,
        )
        # Next: the version after the one this update was computed from (sync waits for the
        # step to complete; async at least sees its own update applied).
        return record, version + 1

    def _local_round(
        self, weights: Mapping[str, FloatArray], version: int, local_steps: int
    ) -> tuple[dict[str, FloatArray], float, float, int, float]:
        """FedAvg: E local momentum-SGD steps from the global weights; the new weights."""
        local_steps = max(1, local_steps)
        schedule = self.schedule or PiecewiseConstantSchedule((), (0.1,))
        optimizer = MomentumSGD(self.model.variable_specs, schedule, momentum=self.momentum,
                                weight_decay=self.weight_decay)
        optimizer.step = version * local_steps
        current = dict(weights)
        losses, accuracies, samples = [], [], 0
        lr = optimizer.learning_rate
        for e in range(local_steps):
            x, y = self.stream.batch(version * local_steps + e)
            result = self.model.compute_gradients(x, y)
            current = optimizer.apply(current, result.gradients)
            current.update(result.non_trainable)
            self.model.set_weights(current)
            losses.append(result.loss)
            accuracies.append(result.accuracy)
            samples += result.num_samples
        return current, float(np.mean(losses)), float(np.mean(accuracies)), samples, lr
