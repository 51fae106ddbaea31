"""Parameter-server optimizer: momentum SGD with L2 weight decay and a piecewise-constant LR."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import numpy.typing as npt

from hfl_lab._exceptions import ConfigError
from trainer.flat import FlatLayout, FlatTensors, flat_layout

__all__ = [
    "DEFAULT_MOMENTUM",
    "DEFAULT_WEIGHT_DECAY",
    "MomentumSGD",
    "PiecewiseConstantSchedule",
    "VariableInfo",
    "reference_schedule",
]

FloatArray = npt.NDArray[np.float32]

DEFAULT_MOMENTUM = 0.9
#: TF official resnet_cifar: weight_decay=2e-4 on every trainable variable but batch norm's.
DEFAULT_WEIGHT_DECAY = 2e-4
STATE_STEP = "step"
STATE_VELOCITY = "velocity/"


class VariableInfo(Protocol):
    """What the optimizer needs to know of a variable (``trainer.model.VariableSpec`` fits)."""

    @property
    def name(self) -> str: ...
    @property
    def shape(self) -> tuple[int, ...]: ...
    @property
    def trainable(self) -> bool: ...
    @property
    def batch_norm(self) -> bool: ...


@dataclass(frozen=True)
class PiecewiseConstantSchedule:
    """``values[i]`` for ``boundaries[i-1] < step <= boundaries[i]`` (tf piecewise_constant).

    With ``warmup_steps`` > 0 the rate ramps linearly, ``values[0] * step / warmup_steps`` for
    ``step < warmup_steps``, as the TF reference's ``learning_rate_with_decay(warmup=True)``.
    """

    boundaries: tuple[int, ...]
    values: tuple[float, ...]
    warmup_steps: int = 0

    def __post_init__(self) -> None:
        if len(self.values) != len(self.boundaries) + 1:
            raise ConfigError(
                f"a piecewise-constant schedule needs one more value than boundaries "
                f"(got {len(self.values)} values, {len(self.boundaries)} boundaries).",
                fix="give values for before the first boundary and after each boundary.",
            )
        if any(b <= a for a, b in zip(self.boundaries, self.boundaries[1:], strict=False)):
            raise ConfigError(
                f"schedule boundaries {list(self.boundaries)} are not strictly increasing.",
                fix="sort the boundaries and remove duplicates.",
            )
        if self.warmup_steps < 0 or any(v < 0 for v in self.values):
            raise ConfigError(
                "learning rates and warm-up steps must be non-negative.",
                fix="check the schedule's values and warmup_steps.",
            )

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            return self.values[0] * step / self.warmup_steps
        for boundary, value in zip(self.boundaries, self.values, strict=False):
            if step <= boundary:
                return value
        return self.values[-1]


def reference_schedule(
    steps_per_epoch: int,
    batch_size: int,
    *,
    base_lr: float = 0.1,
    boundary_epochs: Sequence[int] = (91, 136, 182),
    decay_rates: Sequence[float] = (1.0, 0.1, 0.01, 0.001),
    warmup_epochs: int = 0,
) -> PiecewiseConstantSchedule:
    """The TF reference resnet_cifar schedule: 0.1 x batch/128, decayed at epochs 91/136/182.

    ``batch_size`` is the global batch of one update (sum over the workers averaged together).
    """
    if steps_per_epoch < 1 or batch_size < 1:
        raise ConfigError(
            f"steps_per_epoch ({steps_per_epoch}) and batch_size ({batch_size}) must be >= 1.",
            fix="derive them from the training-set size and the global batch size.",
        )
    initial = base_lr * batch_size / 128
    return PiecewiseConstantSchedule(
        boundaries=tuple(int(steps_per_epoch * e) for e in boundary_epochs),
        values=tuple(initial * r for r in decay_rates),
        warmup_steps=int(steps_per_epoch * warmup_epochs),
    )


@dataclass(frozen=True)
class _Trainable:
    name: str
    shape: tuple[int, ...]
    dtype: str = "float32"
    trainable: bool = True


class MomentumSGD:
    """TF MomentumOptimizer on numpy dicts: ``v = m*v + g; w -= lr*v`` with ``g += wd*w``.

    Weight decay (the gradient of ``wd/2 * ||w||^2``, the reference's L2 loss term) applies to
    trainable variables that are not batch-norm parameters; non-trainable variables are never
    touched here.
    """

    def __init__(
        self,
        variables: Sequence[VariableInfo],
        schedule: PiecewiseConstantSchedule | float,
        *,
        momentum: float = DEFAULT_MOMENTUM,
        weight_decay: float = DEFAULT_WEIGHT_DECAY,
    ) -> None:
        if not 0 <= momentum < 1 or weight_decay < 0:
            raise ConfigError(
                f"momentum must be in [0, 1) and weight_decay >= 0 "
                f"(got {momentum}, {weight_decay}).",
                fix="use e.g. momentum 0.9 and weight_decay 2e-4.",
            )
        self.schedule = (
            schedule
            if isinstance(schedule, PiecewiseConstantSchedule)
            else PiecewiseConstantSchedule((), (float(schedule),))
        )
        self.momentum = momentum
        self.weight_decay = weight_decay
        trainable = [v for v in variables if v.trainable]
        self._shapes = {v.name: tuple(v.shape) for v in trainable}
        self.decayed = frozenset(v.name for v in trainable if not v.batch_norm)
        layout = flat_layout([_Trainable(v.name, tuple(v.shape)) for v in trainable])
        assert layout is not None  # float32 by construction; names are unique (a dict above)
        #: the trainable variables as one flat buffer: gradients, velocity and weights alike
        self.layout: FlatLayout = layout
        self._velocity_flat: FloatArray = np.zeros(layout.size, np.float32)
        self._velocity: dict[str, FloatArray] = dict(FlatTensors(self._velocity_flat, layout))
        #: element ranges of the decayed variables, adjacent ones merged (batch norm's are not)
        runs: list[list[int]] = []
        for name, start, end, _ in layout.entries:
            if name in self.decayed and end > start:
                if runs and runs[-1][1] == start:
                    runs[-1][1] = end
                else:
                    runs.append([start, end])
        self._decay_runs = [(a, b) for a, b in runs]
        self._scratch: FloatArray | None = None
        self.step = 0

    @property
    def learning_rate(self) -> float:
        """The rate the next :meth:`apply` will use."""
        return self.schedule(self.step)

    def apply(
        self, weights: Mapping[str, FloatArray], gradients: Mapping[str, FloatArray]
    ) -> dict[str, FloatArray]:
        """One update; returns new weights (entries without a gradient pass through unchanged)."""
        missing = self._shapes.keys() - gradients.keys()
        extra = gradients.keys() - self._shapes.keys()
        if missing or extra:
            raise KeyError(
                f"gradients do not match the trainable variables: missing {sorted(missing)[:3]}, "
                f"unexpected {sorted(extra)[:3]}"
            )
        lr = np.float32(self.learning_rate)
        m = np.float32(self.momentum)
        wd = np.float32(self.weight_decay)
        updated = dict(weights)
        for name, shape in self._shapes.items():
            w = np.asarray(weights[name], dtype=np.float32)
            g = np.asarray(gradients[name], dtype=np.float32)
            if g.shape != shape or w.shape != shape:
                raise ValueError(f"{name}: gradient {g.shape} / weight {w.shape}, expected {shape}")
            if name in self.decayed and wd:
                g = g + wd * w
            v = self._velocity[name]
            v *= m
            v += g
            updated[name] = (w - lr * v).astype(np.float32)
        self.step += 1
        return updated

    def apply_flat(self, weights: FloatArray, gradients: FloatArray,
                   out: FloatArray | None = None) -> FloatArray:
        """:meth:`apply` on flat buffers of :attr:`layout`: the same float operations, element
        for element, as one vectorized operation each (weight decay: one per run of decayed
        variables). The new weights go to ``out`` (a new buffer when None); the inputs are
        left as they are."""
        size = self.layout.size
        if weights.shape != (size,) or gradients.shape != (size,):
            raise ValueError(f"flat gradient {gradients.shape} / weight {weights.shape}, "
                             f"expected ({size},)")
        lr = np.float32(self.learning_rate)
        m = np.float32(self.momentum)
        wd = np.float32(self.weight_decay)
        g = gradients
        if wd and self._decay_runs:
            if self._scratch is None:
                self._scratch = np.empty(size, np.float32)
            g = self._scratch
            np.copyto(g, gradients)
            for start, end in self._decay_runs:  # g + wd * w, as apply() computes it
                g[start:end] += wd * weights[start:end]
        v = self._velocity_flat
        v *= m
        v += g
        new = np.empty(size, np.float32) if out is None else out
        np.multiply(v, lr, out=new)
        np.subtract(weights, new, out=new)
        self.step += 1
        return new

    def state(self) -> dict[str, npt.NDArray[np.generic]]:
        """Copy of the optimizer state (step and velocities) for a checkpoint."""
        state: dict[str, npt.NDArray[np.generic]] = {
            STATE_STEP: np.asarray(self.step, dtype=np.int64)
        }
        copied = FlatTensors(self._velocity_flat.copy(), self.layout)  # one copy, then views
        for name in self._velocity:
            state[STATE_VELOCITY + name] = copied[name]
        return state

    @property
    def velocity(self) -> FlatTensors:
        """The velocities as one flat buffer (a view: do not modify)."""
        return FlatTensors(self._velocity_flat, self.layout)

    def load_state(self, state: Mapping[str, npt.ArrayLike]) -> None:
        """Restore :meth:`state` output; the variable set and shapes must match."""
        if STATE_STEP not in state:
            raise ConfigError(
                "optimizer state has no 'step' entry.",
                fix="restore from a checkpoint written by MomentumSGD.state().",
            )
        velocity: dict[str, FloatArray] = {}
        flat = np.zeros(self.layout.size, np.float32)
        views = FlatTensors(flat, self.layout)
        for name, shape in self._shapes.items():
            key = STATE_VELOCITY + name
            if key not in state:
                raise ConfigError(
                    f"optimizer state lacks the velocity of {name!r}.",
                    fix="restore from a checkpoint of a model with the same depth.",
                )
            value = np.array(state[key], dtype=np.float32, copy=True)
            if value.shape != shape:
                raise ConfigError(
                    f"optimizer velocity of {name!r} has shape {value.shape}, expected {shape}.",
                    fix="restore from a checkpoint of a model with the same depth.",
                )
            velocity[name] = views[name]
            velocity[name][...] = value
        self._velocity_flat = flat
        self._velocity = velocity
        self.step = int(np.asarray(state[STATE_STEP]))
