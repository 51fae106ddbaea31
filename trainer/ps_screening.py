"""What the parameter server checks in an update before it counts (issue 18, item 5).

An attested worker may still be hostile: its FedAvg weight is the PS's own figure for its shard,
never its claim; each update's L2 norm is bounded (``max_update_norm``, scaled down rather than
refused); and the new global weights are checked finite before they are committed
(:func:`non_finite`, :func:`overflow`).
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable, Mapping
from typing import Any

import grpc
import numpy as np
import numpy.typing as npt

from hfl_lab._exceptions import TensorValidationError
from trainer.aggregation import Mode, Update, clip_to_norm, l2_norm
from trainer.flat import (
    FlatTensors,
    all_finite,
    below_bound,
    flat_squared_norm,
    quick_squared_norm,
)
from trainer.optim import MomentumSGD
from trainer.proto import parameter_server_pb2 as pb
from trainer.ps_jobs import kind_name
from trainer.ps_options import PsOptions

__all__ = ["NormProbe", "UpdateScreen", "non_finite", "overflow"]

Weights = Mapping[str, npt.NDArray[np.float32]]


class NormProbe:
    """The quick squared norm (:func:`~trainer.flat.quick_squared_norm`) of a flat push's
    trainable part, less the global weights of ``version`` in FedAvg, summed chunk by chunk
    as the push arrives (``StreamAssembler``'s ``on_elements``): most of the bound's pass
    then runs while the rest of the push is still on the network."""

    def __init__(self, size: int, version: int, base: FlatTensors | None) -> None:
        self.size = size  # elements of the trainable part
        self.version = version
        self.base = base  # FedAvg: the global weights the change is measured from
        self.covered = 0  # elements summed, in order from the first; -1: not in order
        self.squared = 0.0

    def __call__(self, values: npt.NDArray[np.float32], start: int) -> None:
        end = min(start + len(values), self.size)
        if end <= start or self.covered < 0:
            return
        if start != self.covered:
            self.covered = -1
            return
        minus = None if self.base is None else self.base.buffer[start:end]
        self.squared += quick_squared_norm(values[: end - start], minus)
        self.covered = end

    def squared_norm(self, update: FlatTensors, base: FlatTensors | None) -> float | None:
        """The summed quick norm if it covers all of ``update`` from ``base``, else None."""
        if self.covered != update.layout.size or self.base is not base:
            return None
        return self.squared


class UpdateScreen:
    """A parameter server's checks of one worker's update before the aggregator sees it."""

    def __init__(
        self,
        options: PsOptions,
        optimizer: MomentumSGD,
        snapshot: Callable[[], tuple[int, Weights]],
        event: Callable[..., None],
    ) -> None:
        self.options = options
        self.optimizer = optimizer
        self._snapshot = snapshot
        self._event = event
        self._lock = threading.Lock()
        #: workers whose FedAvg num_samples claim differed from the PS's figure (noted once)
        self._claims_noted: set[str] = set()

    def header_problem(self, who: str,
                       header: pb.StreamHeader) -> tuple[grpc.StatusCode, str] | None:
        """Why a pushed stream's header is refused: it names another worker, or the wrong kind
        of update for this PS's mode; None when it is fine."""
        if header.worker_id and header.worker_id != who:
            return (grpc.StatusCode.PERMISSION_DENIED,
                    f"the update claims worker {header.worker_id!r} but came from {who!r}")
        expected = (pb.UPDATE_KIND_WEIGHTS if self.options.mode is Mode.FEDAVG
                    else pb.UPDATE_KIND_GRADIENTS)
        if header.kind != expected:
            return (grpc.StatusCode.INVALID_ARGUMENT,
                    f"this PS aggregates in {self.options.mode} mode and expects "
                    f"{kind_name(expected)}, got {kind_name(header.kind)}")
        return None

    def refuse_non_finite(self, update: Update, new: Weights,
                          saved: Mapping[str, Any] | None) -> None:
        """Refuse (:func:`overflow`) new weights or optimizer velocities that are not all
        finite, putting the optimizer back to ``saved`` first; they are never committed."""
        bad = non_finite(new)
        if bad is None and saved is not None:
            bad = non_finite(self.optimizer.velocity)
        if bad is not None:
            if saved is not None:
                self.optimizer.load_state(saved)
            raise overflow(update, *bad)

    def norm_probe(self) -> NormProbe | None:
        """A :class:`NormProbe` for the next push, or None when no bound applies or the
        model has no flat form."""
        version, current = self._snapshot()
        if self.options.max_update_norm <= 0 or not isinstance(current, FlatTensors):
            return None
        base = current if self.options.mode is Mode.FEDAVG else None
        return NormProbe(current.layout.trainable_size, version, base)

    def bounded(self, who: str, version: int, update: Weights,
                probe: NormProbe | None = None) -> Weights:
        """``update`` scaled down to ``max_update_norm`` when its L2 norm is above it.

        Clipped rather than refused: an honest gradient spike still counts, scaled, and a
        refused sync push would leave its step waiting; the bound is far above honest norms
        (see the parameter). In FedAvg the model's change from the round's global weights is
        bounded by what E local steps with gradients of that norm can move it."""
        opts = self.options
        bound = opts.max_update_norm
        if bound <= 0:
            return update
        if opts.mode is not Mode.FEDAVG:
            if isinstance(update, FlatTensors):
                squared = None if probe is None else probe.squared_norm(update, None)
                if squared is None:
                    squared = quick_squared_norm(update.buffer)
                if below_bound(squared, bound, update.layout.size):
                    return update  # clearly within the bound: no exact norm needed
            clipped, norm = clip_to_norm(update, bound)
            if norm <= bound:
                return update
        else:
            base, current = self._snapshot()
            if base != version:
                return update  # not this round's model: the aggregator drops or refuses it
            bound *= self.local_reach(version)
            if isinstance(update, FlatTensors) and isinstance(current, FlatTensors):
                return self._bounded_flat(who, update, current, bound, probe)
            change = {n: np.asarray(v, dtype=np.float64) - current[n] for n, v in update.items()}
            norm = l2_norm(change)
            if norm <= bound:
                return update
            scale = bound / norm
            clipped = {n: (current[n] + change[n] * scale).astype(np.float32) for n in change}
        self._scaled_down(who, norm, bound)
        return clipped

    def _bounded_flat(self, who: str, update: FlatTensors, current: FlatTensors,
                      bound: float, probe: NormProbe | None = None) -> Weights:
        """FedAvg's bound on flat buffers: the change's norm without a float64 copy of it;
        float32 blocks first (:func:`~trainer.flat.quick_squared_norm`), and the exact float64
        norm only when that is not clearly below the bound, so the decision is the exact one."""
        base = current.trainable.buffer
        if not update.layout.same_as(current.layout.trainable):
            return update  # the aggregator refuses it
        squared = None if probe is None else probe.squared_norm(update, current)
        if squared is None:
            squared = quick_squared_norm(update.buffer, base)
        if below_bound(squared, bound, update.layout.size):
            return update  # clearly within the bound (the usual case): no exact norm needed
        norm = math.sqrt(flat_squared_norm(update.buffer, base))
        if norm <= bound:
            return update
        change = update.buffer.astype(np.float64) - base
        change *= bound / norm
        change += base
        self._scaled_down(who, norm, bound)
        return FlatTensors(change.astype(np.float32), update.layout)

    def _scaled_down(self, who: str, norm: float, bound: float) -> None:
        opts = self.options
        self._event("log", level="warning", peer=who, update_norm=norm, bound=bound,
                    message=f"the update from {who} has L2 norm {norm:.3g}, above the bound "
                    f"{bound:.3g} (max_update_norm {opts.max_update_norm:g}): scaled down to it")

    def local_reach(self, version: int) -> float:
        """How far E local momentum-SGD steps of round ``version`` can move the weights per unit
        of gradient norm: the sum of lr(vE+e) x (1 - m^(e+1)) / (1 - m) over e < E (a worker's
        round starts from zero velocity, with the PS's schedule; ``Worker._local_round``)."""
        schedule, m = self.optimizer.schedule, self.optimizer.momentum
        steps = max(1, self.options.local_steps)
        return sum(schedule(version * steps + e) * (1 - m ** (e + 1)) / (1 - m)
                   for e in range(steps))

    def weight_of(self, who: str, claimed: int, index: int | None) -> int:
        """The weight of ``who``'s update: the PS's own figure, never the worker's claim (in
        FedAvg one that differs from the configuration's is reported, once per worker)."""
        opts = self.options
        if opts.mode is not Mode.FEDAVG:
            return opts.samples_per_update  # sync/async average equally anyway
        if claimed != opts.samples_per_update:
            with self._lock:
                first = who not in self._claims_noted
                self._claims_noted.add(who)
            if first:
                self._event("log", level="warning", peer=who, claimed=claimed,
                            message=f"{who} claims {claimed} samples per round where this run's "
                            f"configuration gives {opts.samples_per_update}: the claim is "
                            "ignored; the PS weighs each model by its shard's size")
        return opts.fedavg_weight(-1 if index is None else index)


def non_finite(tensors: Mapping[str, npt.NDArray[Any]]) -> tuple[str, int] | None:
    """The first tensor holding NaN/Inf, and how many; None when all are finite."""
    if isinstance(tensors, FlatTensors):
        if all_finite(tensors.buffer):
            return None
        first = int(np.flatnonzero(~np.isfinite(tensors.buffer))[0])
        name = tensors.layout.name_at(first)
        value = tensors[name]
        return name, int(value.size - np.count_nonzero(np.isfinite(value)))
    for name, value in tensors.items():
        finite = np.isfinite(value)
        if not finite.all():
            return name, int(finite.size - np.count_nonzero(finite))
    return None


def overflow(update: Update, tensor: str, count: int) -> TensorValidationError:
    """Why the step's update is refused; its sender alone, or every contributor, resubmits."""
    who = ", ".join(update.contributors)
    alone = len(update.contributors) == 1
    step = update.base_version
    return TensorValidationError(
        f"the update of step {step} from {who} would make the global {tensor!r} non-finite "
        f"({count} NaN/Inf values): refused, the weights stay those of step {step}"
        + ("" if alone else f"; {who} compute step {step} again"),
        code=grpc.StatusCode.INVALID_ARGUMENT if alone else grpc.StatusCode.FAILED_PRECONDITION,
        tensor=tensor, expected="finite values", actual=f"{count} NaN/Inf values",
        fix="bound updates with max_update_norm (0 turns the bound off) or a robust "
        "aggregation_rule; an honest run that gets here diverges: lower learning_rate.",
    )
