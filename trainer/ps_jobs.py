"""The parameter server's state holders beside the servicer.

- :class:`Housekeeper`: checkpoints and evaluations off the training path. One background
  thread takes typed jobs in order: checkpoints are written in version order; of several
  evaluations waiting, only the newest runs. A failed job is reported through ``on_failure``
  and the thread goes on serving.
- :class:`EventLog`: the numbered events ``WatchEvents`` streams.
- :class:`PullCache`: one version's parameters, serialized once for every pull, as the first
  pull streams them (:class:`SerializedStream`).
- :class:`StreamQuota`: how many long calls (pulls, event watches) each role holds at once.
"""

from __future__ import annotations

import collections
import contextlib
import json
import logging
import queue
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from hfl_lab._exceptions import HflLabError
from hfl_lab.events import LabEvent
from hfl_lab.vault.checkpoints import CheckpointStore
from trainer.checkpoint import TrainingState, encode_state
from trainer.flat import FlatTensors
from trainer.proto import parameter_server_pb2 as pb
from trainer.tensor_wire import SerializedChunk, serialize_tensors

__all__ = ["CheckpointJob", "EvaluationJob", "EventLog", "Housekeeper", "Job", "PullCache",
           "SerializedStream", "StreamQuota"]

log = logging.getLogger("trainer.ps")

Weights = Mapping[str, npt.NDArray[np.float32]]


@dataclass(frozen=True)
class CheckpointJob:
    """Write this state to the checkpoint store."""

    state: TrainingState

    @property
    def version(self) -> int:
        return self.state.version

    name = "checkpoint"


@dataclass(frozen=True)
class EvaluationJob:
    """Evaluate these weights (the global model at ``version``)."""

    version: int
    weights: Weights

    name = "eval"


@dataclass(frozen=True)
class _Stop:
    version = 0
    name = "stop"


Job = CheckpointJob | EvaluationJob


class Housekeeper:
    """Checkpoints and evaluations of the global model, on one daemon thread in the order they
    were asked for, and what became of them.

    ``emit(kind, **data)`` reports each written checkpoint, each evaluation and each failure
    as the PS's event.
    """

    def __init__(
        self,
        *,
        store: CheckpointStore | None,
        evaluate: Callable[[Weights], Mapping[str, float]] | None,
        emit: Callable[..., None],
        metadata: Mapping[str, Any],
        start_version: int,
    ) -> None:
        self.store = store
        self._evaluate = evaluate
        self._emit = emit
        self._metadata = dict(metadata)
        #: the newest checkpoint queued
        self.last_queued = start_version
        #: the newest checkpoint the store confirmed (a queued write can fail: a full volume)
        self.last_written: int | None = start_version if start_version > 0 else None
        self.failures = 0
        self._jobs: queue.Queue[Job | _Stop] = queue.Queue()
        self._thread = threading.Thread(target=self._run, daemon=True, name="ps-housekeeping")
        self._thread.start()

    def final(self, version: int, weights: Weights,
              optimizer: Mapping[str, Any]) -> dict[str, float]:
        """The end of training: the last checkpoint (unless queued already), every queued one
        on disk, then the final evaluation (a failure is reported; the model is saved)."""
        if self.store is not None and self.last_queued != version:
            self.checkpoint(version, weights, optimizer)
        self.join()
        try:
            return self.evaluate(version, weights)
        except Exception as e:  # noqa: BLE001 - the model is saved; report and still finish
            self._emit("log", level="error", message=f"final evaluation failed: {e}")
            return {}

    def checkpoint(self, version: int, weights: Weights, optimizer: Mapping[str, Any]) -> None:
        """Queue a checkpoint of ``weights`` and the optimizer state at ``version``."""
        state = TrainingState(version=version, weights=dict(weights),
                              optimizer=dict(optimizer), metadata=dict(self._metadata))
        self.last_queued = version
        self._jobs.put(CheckpointJob(state))

    def evaluate_later(self, version: int, weights: Weights) -> None:
        self._jobs.put(EvaluationJob(version, weights))

    def evaluate(self, version: int, weights: Weights) -> dict[str, float]:
        """Evaluate now, in the caller's thread; reported as an ``evaluation`` event."""
        if self._evaluate is None:
            return {}
        started = time.perf_counter()
        figures = dict(self._evaluate(weights))
        data: dict[str, Any] = {"step": version, "seconds": time.perf_counter() - started}
        data.update(figures)
        self._emit("evaluation", **data)
        return figures

    def join(self) -> None:
        """Wait until every job queued so far is done."""
        self._jobs.join()

    def stop(self) -> None:
        self._jobs.put(_Stop())

    def _write(self, state: TrainingState) -> None:
        if self.store is None:
            return
        started = time.perf_counter()
        payload = encode_state(state)
        info = self.store.save(state.version, payload, dict(state.metadata))
        self.last_written = state.version
        self._emit("log", level="info",
                   message=f"checkpoint at step {state.version} written "
                   f"({len(payload) / 1e6:.1f} MB, {time.perf_counter() - started:.2f} s)",
                   checkpoint_step=state.version, checkpoint=info.name)

    def _failed(self, job: Job, error: BaseException) -> None:
        self.failures += isinstance(job, CheckpointJob)
        what = str(error) if isinstance(error, HflLabError) else f"{type(error).__name__}: {error}"
        self._emit("log", level="error", message=f"{job.name} at step {job.version} failed: "
                   f"{what}")

    def _newer_evaluation_waits(self) -> bool:
        return any(isinstance(j, EvaluationJob) for j in list(self._jobs.queue))

    def _run(self) -> None:
        while True:
            job = self._jobs.get()
            try:
                if isinstance(job, _Stop):
                    return
                if isinstance(job, EvaluationJob):
                    if self._newer_evaluation_waits():
                        continue  # the latest evaluation wins
                    self.evaluate(job.version, job.weights)
                else:
                    self._write(job.state)
            except HflLabError as e:
                self._failed(job, e)  # type: ignore[arg-type]
            except Exception as e:  # keep serving; the failure is reported, not swallowed
                log.exception("%s at step %d failed", job.name, job.version)
                self._failed(job, e)  # type: ignore[arg-type]
            finally:
                self._jobs.task_done()


class EventLog:
    """The PS's recent events, numbered, for ``WatchEvents`` (the newest 10,000 are kept)."""

    def __init__(self, keep: int = 10_000) -> None:
        self._events: collections.deque[tuple[int, LabEvent]] = collections.deque(maxlen=keep)
        self._seq = 0
        self._cond = threading.Condition()

    def append(self, event: LabEvent) -> None:
        with self._cond:
            self._seq += 1
            self._events.append((self._seq, event))
            self._cond.notify_all()

    def wake(self) -> None:
        """Let every follower look again (the PS is closing)."""
        with self._cond:
            self._cond.notify_all()

    def follow(
        self, since: int, active: Callable[[], bool], finished: Callable[[], bool],
        deadline: float = float("inf"),
    ) -> Iterator[tuple[int, LabEvent]]:
        """Events after ``since`` as they come, while ``active()``; ends once ``finished()``
        or ``deadline`` (``time.monotonic()``) has passed and every event has been given."""
        seq = since
        while active():
            with self._cond:
                pending = [(s, e) for s, e in self._events if s > seq]
                if not pending:
                    left = deadline - time.monotonic()
                    if finished() or left <= 0:
                        return
                    self._cond.wait(min(0.5, left))
                    continue
            for s, event in pending:
                seq = s
                yield s, event


class SerializedStream:
    """One version's chunks, made as the first reader needs them and kept for every reader.

    A chunk goes out as soon as it is made, so gRPC sends it while the next one is made
    (the whole list first cost a 100 MB pull 14 ms before its first byte moved). Whichever
    reader is ahead makes the next chunk, under a lock held for that chunk only, never
    while a reader waits on the network; the others read what is made. An error making a
    chunk reaches every reader that gets that far.
    """

    def __init__(self, source: Iterator[SerializedChunk],
                 spent: Callable[[float], None] | None = None) -> None:
        self._source = source
        self._spent = spent
        self._chunks: list[SerializedChunk] = []
        self._done = False
        self._error: BaseException | None = None
        self._lock = threading.Lock()

    def __iter__(self) -> Iterator[SerializedChunk]:
        index = 0
        while True:
            if index < len(self._chunks):
                yield self._chunks[index]
                index += 1
                continue
            with self._lock:
                if index < len(self._chunks):
                    continue
                if self._error is not None:
                    raise self._error
                if self._done:
                    return
                self._chunks.extend(self._make_one())

    def _make_one(self) -> list[SerializedChunk]:
        started = time.perf_counter()
        try:
            return [next(self._source)]
        except StopIteration:
            self._done = True
            return []
        except BaseException as e:
            self._error = e
            raise
        finally:
            if self._spent is not None:
                self._spent(time.perf_counter() - started)


class PullCache:
    """The parameters of one version as serialized chunks, made once per version and wire
    dtype (as the first pull streams them: :class:`SerializedStream`), so every worker's pull
    of that version is sent the same bytes objects."""

    def __init__(self) -> None:
        self._cached: tuple[int, int, SerializedStream] | None = None
        self._lock = threading.Lock()

    def chunks(self, version: int, weights: Mapping[str, npt.NDArray[np.float32]],
               wire_name: str, wire: int, chunk_bytes: int,
               timings: dict[str, float]) -> SerializedStream:
        """``weights`` of ``version`` as ``TensorChunk`` messages on the ``wire_name`` dtype."""

        def encode() -> Iterator[SerializedChunk]:
            return serialize_tensors(
                weights,
                header=pb.StreamHeader(kind=pb.UPDATE_KIND_WEIGHTS, model_version=version),
                wire_dtype=wire_name, chunk_bytes=chunk_bytes,
            )

        def spent(seconds: float) -> None:
            timings["encode_s"] += seconds

        return self.get(version, wire, encode, spent)

    def get(
        self, version: int, wire: int, encode: Callable[[], Iterator[SerializedChunk]],
        spent: Callable[[float], None] | None = None,
    ) -> SerializedStream:
        cached = self._cached
        if cached is not None and cached[0] == version and cached[1] == wire:
            return cached[2]
        with self._lock:
            cached = self._cached
            if cached is not None and cached[0] == version and cached[1] == wire:
                return cached[2]
            stream = SerializedStream(encode(), spent)
            self._cached = (version, wire, stream)
            return stream

    def chunks_for(self, version: int, weights: Mapping[str, npt.NDArray[np.float32]],
                   wire_name: str, wire: int, chunk_bytes: int,
                   timings: dict[str, float]) -> SerializedStream:
        """:meth:`chunks`, cached apart for flat streams (``FlatTensors``) and tensor by
        tensor ones (any other mapping)."""
        key = wire if isinstance(weights, FlatTensors) else -1 - wire
        return self.chunks(version, weights, wire_name, key, chunk_bytes, timings)


class StreamQuota:
    """How many calls of one kind each role holds at once, at most ``limit``.

    A pull that waits for the next step and an event watch each hold one of the PS's RPC
    threads for as long as they last; the quota keeps one worker from holding them all.
    """

    def __init__(self, limit: int, what: str = "calls", fix: str = "wait for one to end") -> None:
        self.limit = limit
        self.what = what
        self.fix = fix
        self._held: collections.Counter[str] = collections.Counter()
        self._cond = threading.Condition()

    def refusal(self, role: str) -> str:
        return (f"{role} already has {self.limit} {self.what}, the most one role may hold. "
                f"Fix: {self.fix}")

    @contextlib.contextmanager
    def hold(self, role: str) -> Iterator[bool]:
        """True (and one held for ``role`` until the block ends) unless ``role`` holds
        ``limit`` already; then False, and nothing is held."""
        with self._cond:
            granted = self._held[role] < self.limit
            if granted:
                self._held[role] += 1
                self._cond.notify_all()
        try:
            yield granted
        finally:
            if granted:
                with self._cond:
                    self._held[role] -= 1
                    if not self._held[role]:
                        del self._held[role]
                    self._cond.notify_all()

    def held(self, role: str) -> int:
        with self._cond:
            return self._held[role]

    def wait_until_held(self, role: str, count: int, timeout: float = 60.0) -> bool:
        """Wait until ``role`` holds ``count`` (what a test or a monitor waits for)."""
        with self._cond:
            return self._cond.wait_for(lambda: self._held[role] == count, timeout=timeout)


def kind_name(kind: int) -> str:
    """The update kind's name; a value no enum member has (a hostile header) as a number."""
    try:
        return str(pb.UpdateKind.Name(kind))
    except ValueError:
        return f"unknown update kind {kind}"


def event_json(data: Mapping[str, Any]) -> str:
    return json.dumps(data, default=str)
