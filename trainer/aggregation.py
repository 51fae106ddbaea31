"""Thread-safe aggregation of worker contributions: sync K-of-N, bounded-staleness async, FedAvg;
the mean or a robust rule (coordinate-wise median, trimmed mean), and update norm clipping."""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from enum import StrEnum

import numpy as np
import numpy.typing as npt

from hfl_lab._exceptions import ConfigError
from trainer.flat import FlatLayout, FlatTensors, flat_squared_norm, is_flat

__all__ = [
    "Aggregator",
    "Counters",
    "Mode",
    "Outcome",
    "Rule",
    "Status",
    "Update",
    "clip_to_norm",
    "l2_norm",
    "trimmed_count",
]

FloatArray = npt.NDArray[np.float32]
Tensors = Mapping[str, npt.ArrayLike]


class Mode(StrEnum):
    """How contributions become updates."""

    SYNC = "sync"  # gradients; K of N per step, mean of the K (backup workers)
    ASYNC = "async"  # gradients; each applied on arrival if not too stale
    FEDAVG = "fedavg"  # weights after E local steps; sample-weighted mean of K per round


class Rule(StrEnum):
    """How the K contributions of a sync step or a FedAvg round combine (async: one, as is)."""

    MEAN = "mean"  # equal (sync) or sample-weighted (fedavg) mean: what the reference trains
    # Robust rules (Yin et al. 2018), unweighted and per coordinate: with K >= 3, one worker
    # cannot move a coordinate outside the range of the others' values.
    MEDIAN = "median"
    TRIMMED_MEAN = "trimmed_mean"  # mean after dropping the t largest and t smallest values


class Status(StrEnum):
    """What happened to one submission."""

    PENDING = "pending"  # accepted, waiting for the rest of the step/round
    APPLIED = "applied"  # accepted, and its update has been applied (it completed the step)
    LATE_DROPPED = "late_dropped"  # for a step/round already completed: dropped
    STALE_REFUSED = "stale_refused"  # async: staleness above the bound: refused
    REJECTED = "rejected"  # malformed (names, shapes, non-finite values), duplicate, or closed


@dataclass(frozen=True)
class Outcome:
    """The answer to :meth:`Aggregator.submit`."""

    status: Status
    version: int  # the aggregator's version after the submission
    staleness: int = 0
    reason: str = ""

    @property
    def accepted(self) -> bool:
        return self.status in (Status.PENDING, Status.APPLIED)


@dataclass(frozen=True)
class Update:
    """One aggregated update, moving the global model from ``base_version`` to ``version``.

    ``tensors`` are averaged gradients (sync, async) or averaged weights (fedavg), float32.
    """

    mode: Mode
    base_version: int
    version: int
    tensors: Mapping[str, FloatArray]
    non_trainable: Mapping[str, FloatArray]
    contributors: tuple[str, ...]
    num_samples: int
    staleness: int = 0


@dataclass(frozen=True)
class Counters:
    """Snapshot for the dashboard."""

    version: int
    updates: int  # aggregated updates applied
    applied: int  # worker contributions that went into an applied update
    pending: int  # contributions waiting for the current step/round
    late_dropped: int
    stale_refused: int
    rejected: int


class Aggregator:
    """Collects contributions from concurrent PS handler threads and produces updates.

    ``apply`` is called with each :class:`Update` under the aggregator's lock, in the thread whose
    submission completed it, *before* the version advances and waiters wake: so when
    :meth:`wait_for_version` returns, the PS already holds the new weights. If ``apply`` raises,
    the step's contributions are discarded, the version stays, and the error reaches that
    submitter; workers then resubmit for the same version.

    ``rule`` combines a sync step's or FedAvg round's K contributions (:class:`Rule`): the mean
    keeps running sums; the robust rules keep the K contributions until the step completes.
    The weight of a FedAvg contribution is the ``num_samples`` the caller passes: the PS passes
    its own figure, never the worker's claim.
    """

    def __init__(
        self,
        mode: Mode | str,
        num_workers: int,
        *,
        quorum: int | None = None,
        staleness_bound: int | None = None,
        apply: Callable[[Update], None] | None = None,
        start_version: int = 0,
        shapes: Mapping[str, tuple[int, ...]] | None = None,
        rule: Rule | str = Rule.MEAN,
        trim_fraction: float = 0.2,
    ) -> None:
        try:
            self.mode = Mode(mode)
        except ValueError:
            raise ConfigError(
                f"unknown aggregation mode {mode!r}.", fix="use 'sync', 'async' or 'fedavg'."
            ) from None
        try:
            self.rule = Rule(rule)
        except ValueError:
            raise ConfigError(
                f"unknown aggregation rule {rule!r}.",
                fix="use 'mean', 'median' or 'trimmed_mean'.",
            ) from None
        if self.rule is not Rule.MEAN and self.mode is Mode.ASYNC:
            raise ConfigError(
                f"aggregation rule {self.rule} needs several contributions per update; async "
                "applies each gradient on its own.",
                fix="use sync or fedavg for a robust rule; max_update_norm bounds async updates.",
            )
        if not 0 < trim_fraction < 0.5:
            raise ConfigError(
                f"trim_fraction must be > 0 and < 0.5, got {trim_fraction}.", fix="use e.g. 0.2."
            )
        self.trim_fraction = trim_fraction
        if num_workers < 1:
            raise ConfigError(f"num_workers must be >= 1, got {num_workers}.", fix="use >= 1.")
        self.num_workers = num_workers
        self._quorum = self._check_quorum(num_workers if quorum is None else quorum)
        # In steady-state async with N equally fast workers a gradient is about N-1 versions
        # old, so the default bound N refuses only real laggards.
        self.staleness_bound = num_workers if staleness_bound is None else staleness_bound
        if self.staleness_bound < 0:
            raise ConfigError("staleness_bound must be >= 0.", fix="use e.g. the worker count.")
        self._apply = apply
        self._shapes = dict(shapes) if shapes is not None else None
        #: flat layouts found to match ``shapes`` (checked once, not per contribution)
        self._layouts_checked: set[FlatLayout] = set()
        self._cond = threading.Condition()
        self._version = start_version
        self._closed = False
        self._wakes = 0
        self._last: Update | None = None
        self._counts = dict.fromkeys(
            ("updates", "applied", "late_dropped", "stale_refused", "rejected"), 0
        )
        self._reset_step()

    # ------------------------------------------------------------------ public interface

    @property
    def version(self) -> int:
        with self._cond:
            return self._version

    @property
    def quorum(self) -> int:
        return self._quorum

    @property
    def last_update(self) -> Update | None:
        with self._cond:
            return self._last

    def counters(self) -> Counters:
        with self._cond:
            return Counters(version=self._version, pending=len(self._contributors), **self._counts)

    def set_quorum(self, quorum: int) -> None:
        """Change K (e.g. after a worker died); completes the current step if now reached."""
        with self._cond:
            self._quorum = self._check_quorum(quorum)
            if self.mode is not Mode.ASYNC and len(self._contributors) >= self._quorum:
                self._complete(staleness=0)

    def submit(
        self,
        worker: str,
        version: int,
        tensors: Tensors,
        num_samples: int = 1,
        non_trainable: Tensors | None = None,
        *,
        checked_finite: bool = False,
    ) -> Outcome:
        """Offer gradients (sync/async) or weights (fedavg) computed at model ``version``.

        ``checked_finite``: the caller already refused NaN/Inf (the PS's stream decoder does),
        so the values are not scanned a second time.
        """
        with self._cond:
            current = self._version
            staleness = current - version
            if self._closed:
                return self._refuse(Status.REJECTED, "the aggregator is closed")
            if version > current:
                return self._refuse(
                    Status.REJECTED, f"version {version} is ahead of the server's {current}"
                )
            if self.mode is Mode.ASYNC:
                if staleness > self.staleness_bound:
                    return self._refuse(
                        Status.STALE_REFUSED,
                        f"staleness {staleness} exceeds the bound {self.staleness_bound}",
                        staleness,
                    )
            elif staleness > 0:
                return self._refuse(
                    Status.LATE_DROPPED, f"step {version} already completed", staleness
                )
            elif worker in self._contributors:
                return self._refuse(
                    Status.REJECTED, f"{worker} already contributed to step {version}"
                )
            problem = self._validate(tensors, non_trainable, num_samples, checked_finite)
            if problem:
                return self._refuse(Status.REJECTED, problem, staleness)
            self._accumulate(worker, tensors, non_trainable, num_samples)
            if self.mode is Mode.ASYNC or len(self._contributors) >= self._quorum:
                self._complete(staleness)
                return Outcome(Status.APPLIED, self._version, staleness)
            return Outcome(Status.PENDING, self._version, staleness)

    def wait_for_version(self, version: int, timeout: float | None = None) -> bool:
        """Block until the global version reaches ``version``; False on timeout, close or
        :meth:`wake`."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            woken = self._wakes
            while self._version < version and not self._closed and self._wakes == woken:
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    return False
                self._cond.wait(remaining)
            return self._version >= version

    def wake(self) -> None:
        """Return every :meth:`wait_for_version` now (a waiting call was cancelled)."""
        with self._cond:
            self._wakes += 1
            self._cond.notify_all()

    def close(self) -> None:
        """Refuse further submissions and wake every waiter."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()

    # ------------------------------------------------------------------ internals

    def _check_quorum(self, quorum: int) -> int:
        if not 1 <= quorum <= self.num_workers:
            raise ConfigError(
                f"quorum K={quorum} must be between 1 and the {self.num_workers} workers.",
                fix="set K <= N (K < N leaves N-K backup workers per step).",
            )
        return quorum

    def _reset_step(self) -> None:
        self._sums: dict[str, npt.NDArray[np.float64]] = {}
        self._nt_sums: dict[str, npt.NDArray[np.float64]] = {}
        self._single: dict[str, npt.NDArray[np.generic]] | None = None
        self._nt_single: dict[str, npt.NDArray[np.generic]] = {}
        #: robust rules: every contribution of the step, (trainable, non-trainable)
        self._stack: list[tuple[dict[str, npt.NDArray[np.generic]],
                                dict[str, npt.NDArray[np.generic]]]] = []
        self._single_weight = 1.0
        self._weight_total = 0.0
        self._samples = 0
        self._contributors: list[str] = []

    def _step_sums(
        self,
    ) -> tuple[Mapping[str, npt.NDArray[np.generic]], Mapping[str, npt.NDArray[np.generic]]]:
        """This step's contributions so far: the single first one, or the running sums."""
        if self._stack:
            return self._stack[0]
        if self._single is not None:
            return self._single, self._nt_single
        return self._sums, self._nt_sums

    def _refuse(self, status: Status, reason: str, staleness: int = 0) -> Outcome:
        self._counts[str(status)] += 1
        return Outcome(status, self._version, staleness, reason)

    def _validate(
        self,
        tensors: Tensors,
        non_trainable: Tensors | None,
        num_samples: int,
        checked_finite: bool = False,
    ) -> str:
        if num_samples < 1:
            return f"num_samples must be >= 1, got {num_samples}"
        if not tensors:
            return "no tensors submitted"
        if isinstance(tensors, FlatTensors) and is_flat(non_trainable or {}):
            return self._validate_flat(tensors, non_trainable, checked_finite)
        if self._shapes is not None:
            expected = self._shapes
        elif self._contributors:
            expected = {k: v.shape for k, v in self._step_sums()[0].items()}
        else:
            expected = {k: np.shape(v) for k, v in tensors.items()}
        if tensors.keys() != expected.keys():
            diff = sorted(set(tensors) ^ set(expected))
            return f"tensor names differ from the expected ones: {diff[:3]}"
        for name, value in tensors.items():
            if np.shape(value) != tuple(expected[name]):
                return f"{name!r} has shape {np.shape(value)}, expected {tuple(expected[name])}"
            if not checked_finite and not np.all(np.isfinite(value)):
                return f"{name!r} holds NaN or infinite values"
        frozen = self._step_sums()[1]
        if self._contributors and (non_trainable or {}).keys() != frozen.keys():
            return "non-trainable names differ from this step's other contributions"
        for name, value in (non_trainable or {}).items():
            if name in frozen and np.shape(value) != frozen[name].shape:
                return f"non-trainable {name!r} has shape {np.shape(value)}"
            if not checked_finite and not np.all(np.isfinite(value)):
                return f"non-trainable {name!r} holds NaN or infinite values"
        return ""

    def _validate_flat(self, tensors: FlatTensors, non_trainable: Tensors | None,
                       checked_finite: bool) -> str:
        """``_validate`` for flat contributions: a layout is checked once, the values at once."""
        layout = tensors.layout
        if layout not in self._layouts_checked:
            if self._shapes is not None:
                expected = self._shapes
            elif self._contributors:
                expected = {k: np.shape(v) for k, v in self._step_sums()[0].items()}
            else:
                expected = layout.shapes
            if layout.shapes != {k: tuple(v) for k, v in expected.items()}:
                diff = sorted(set(layout.shapes.items()) ^
                              {(k, tuple(v)) for k, v in expected.items()})
                return f"tensor names or shapes differ from the expected ones: {diff[:3]}"
            if self._shapes is not None:  # fixed for the aggregator's life: remember
                self._layouts_checked.add(layout)
        frozen = self._step_sums()[1]
        stats = {} if non_trainable is None else non_trainable
        if self._contributors:
            if isinstance(frozen, FlatTensors) and isinstance(stats, FlatTensors):
                if not frozen.layout.same_as(stats.layout):
                    return "non-trainable tensors differ from this step's other contributions"
            elif stats.keys() != frozen.keys():
                return "non-trainable names differ from this step's other contributions"
        if not checked_finite:
            for what, part in (("", tensors), ("non-trainable ", stats)):
                if isinstance(part, FlatTensors) and not np.isfinite(part.buffer).all():
                    first = int(np.flatnonzero(~np.isfinite(part.buffer))[0])
                    return f"{what}{part.layout.name_at(first)!r} holds NaN or infinite values"
        return ""

    def _accumulate(
        self,
        worker: str,
        tensors: Tensors,
        non_trainable: Tensors | None,
        num_samples: int,
    ) -> None:
        # Sync averages the K gradients equally; FedAvg weighs each model by its samples.
        weight = float(num_samples) if self.mode is Mode.FEDAVG else 1.0
        if isinstance(tensors, FlatTensors) and is_flat(non_trainable or {}):
            # an empty FlatTensors stays one: it still tells which buffer it is part of
            self._accumulate_flat(tensors, {} if non_trainable is None else non_trainable, weight)
        elif self.rule is not Rule.MEAN:
            self._stack.append(({k: np.asarray(v) for k, v in tensors.items()},
                                {k: np.asarray(v) for k, v in (non_trainable or {}).items()}))
        elif not self._contributors:
            # The first contribution is kept as it came (no float64 copy): with one contributor
            # (async, K=1) the mean is the contribution itself. A second one starts the sums.
            self._single = {k: np.asarray(v) for k, v in tensors.items()}
            self._nt_single = {k: np.asarray(v) for k, v in (non_trainable or {}).items()}
            self._single_weight = weight
        else:
            if self._single is not None:
                self._sums = _weighted(self._single, self._single_weight)
                self._nt_sums = _weighted(self._nt_single, self._single_weight)
                self._single = None
            for target, source in ((self._sums, tensors), (self._nt_sums, non_trainable or {})):
                for name, value in source.items():
                    target[name] += np.asarray(value, dtype=np.float64) * weight
        self._weight_total += weight
        self._samples += num_samples
        self._contributors.append(worker)

    def _accumulate_flat(self, tensors: FlatTensors, stats: Tensors, weight: float) -> None:
        """One vectorized operation per part (trainable, non-trainable) and contribution."""
        if self.rule is not Rule.MEAN:
            self._stack.append((tensors, stats))  # type: ignore[arg-type]
        elif not self._contributors:
            self._single, self._nt_single = tensors, stats  # type: ignore[assignment]
            self._single_weight = weight
        else:
            if self._single is not None:
                self._sums = _flat_weighted(self._single, self._single_weight)  # type: ignore
                self._nt_sums = _flat_weighted(self._nt_single, self._single_weight)  # type: ignore
                self._single = None
            for target, source in ((self._sums, tensors), (self._nt_sums, stats)):
                if isinstance(target, FlatTensors) and isinstance(source, FlatTensors):
                    if weight == 1.0:  # float32 -> float64 is exact: as the per-tensor sum
                        target.buffer += source.buffer
                    else:
                        target.buffer += source.buffer.astype(np.float64) * weight

    def _complete(self, staleness: int) -> None:
        total = self._weight_total
        if self._stack and isinstance(self._stack[0][0], FlatTensors):
            tensors = self._robust_flat([trainable for trainable, _ in self._stack])
            frozen = self._robust_flat([stats for _, stats in self._stack])
        elif isinstance(self._sums, FlatTensors):
            tensors = _flat_mean(self._sums, total)
            frozen = _flat_mean(self._nt_sums, total)
        elif self._stack:
            tensors = self._robust([trainable for trainable, _ in self._stack])
            frozen = self._robust([stats for _, stats in self._stack])
        elif isinstance(self._single, FlatTensors):  # one contributor: it is the mean
            tensors, frozen = self._single, self._nt_single
        elif self._single is not None:  # one contributor: its values are the mean
            tensors = {k: v.astype(np.float32, copy=False) for k, v in self._single.items()}
            frozen = {k: v.astype(np.float32, copy=False) for k, v in self._nt_single.items()}
        else:
            tensors = {k: (v / total).astype(np.float32) for k, v in self._sums.items()}
            frozen = {k: (v / total).astype(np.float32) for k, v in self._nt_sums.items()}
        update = Update(
            mode=self.mode,
            base_version=self._version,
            version=self._version + 1,
            tensors=tensors,
            non_trainable=frozen,
            contributors=tuple(self._contributors),
            num_samples=self._samples,
            staleness=staleness,
        )
        applied = len(self._contributors)
        self._reset_step()
        if self._apply is not None:
            self._apply(update)
        self._version = update.version
        self._last = update
        self._counts["updates"] += 1
        self._counts["applied"] += applied
        self._cond.notify_all()

    def _robust(self, parts: list[dict[str, npt.NDArray[np.generic]]]) -> dict[str, FloatArray]:
        """The robust rule per coordinate over the step's contributions (float64 inside)."""
        out: dict[str, FloatArray] = {}
        drop = trimmed_count(len(parts), self.trim_fraction)
        for name in parts[0]:
            stack = np.stack([np.asarray(p[name], dtype=np.float64) for p in parts])
            if self.rule is Rule.MEDIAN:
                value = np.median(stack, axis=0)
            else:
                value = np.sort(stack, axis=0)[drop:len(parts) - drop].mean(axis=0)
            out[name] = np.asarray(value, dtype=np.float32)
        return out


    def _robust_flat(self, parts: list[Mapping[str, npt.NDArray[np.generic]]]
                     ) -> Mapping[str, FloatArray]:
        """``_robust`` over flat contributions: one stack, one median or sort, per part."""
        if not isinstance(parts[0], FlatTensors):
            return {}
        layout = parts[0].layout
        drop = trimmed_count(len(parts), self.trim_fraction)
        stack = np.stack([np.asarray(p.buffer, dtype=np.float64)  # type: ignore[attr-defined]
                          for p in parts])
        if self.rule is Rule.MEDIAN:
            value = np.median(stack, axis=0)
        else:
            value = np.sort(stack, axis=0)[drop:len(parts) - drop].mean(axis=0)
        return FlatTensors(np.asarray(value, dtype=np.float32), layout)


def _flat_weighted(values: Mapping[str, npt.NDArray[np.generic]],
                   weight: float) -> Mapping[str, npt.NDArray[np.generic]]:
    if not isinstance(values, FlatTensors):
        return {}
    return FlatTensors(values.buffer.astype(np.float64) * weight, values.layout)


def _flat_mean(sums: Mapping[str, npt.NDArray[np.generic]],
               total: float) -> Mapping[str, FloatArray]:
    if not isinstance(sums, FlatTensors):
        return {}
    return FlatTensors((sums.buffer / total).astype(np.float32), sums.layout)


def trimmed_count(contributions: int, fraction: float) -> int:
    """How many values ``trimmed_mean`` drops at each end: ``ceil(fraction x K)``, so that a
    fraction such as 0.2 trims one of three, and never so many that nothing is left."""
    wanted = math.ceil(round(fraction * contributions, 9))
    return max(0, min(wanted, (contributions - 1) // 2))


def l2_norm(tensors: Tensors) -> float:
    """The L2 norm of all ``tensors`` together, summed in float64 (finite float32 values never
    overflow it: 3.4e38 squared is about 1e77)."""
    if isinstance(tensors, FlatTensors):
        return math.sqrt(flat_squared_norm(tensors.buffer))
    return math.sqrt(sum(float(np.square(np.asarray(v), dtype=np.float64).sum())
                         for v in tensors.values()))


def clip_to_norm(tensors: Tensors, bound: float) -> tuple[Mapping[str, FloatArray], float]:
    """``tensors`` scaled down to L2 norm ``bound`` when their norm is above it, and that norm.

    Below the bound the arrays are returned as they came (as float32), bit for bit."""
    norm = l2_norm(tensors)
    if isinstance(tensors, FlatTensors):
        if norm <= bound:
            return tensors, norm
        scaled = (tensors.buffer.astype(np.float64) * (bound / norm)).astype(np.float32)
        return FlatTensors(scaled, tensors.layout), norm
    if norm <= bound:
        return {k: np.asarray(v, dtype=np.float32) for k, v in tensors.items()}, norm
    scale = bound / norm
    return {k: (np.asarray(v, dtype=np.float64) * scale).astype(np.float32)
            for k, v in tensors.items()}, norm


def _weighted(
    values: Mapping[str, npt.NDArray[np.generic]], weight: float
) -> dict[str, npt.NDArray[np.float64]]:
    return {k: np.asarray(v, dtype=np.float64) * weight for k, v in values.items()}
