"""Single-process training with the PS's optimizer: the baseline the distributed run must match."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt

from trainer.model import ResNet
from trainer.optim import MomentumSGD

__all__ = ["ReferenceRun", "train_reference"]

FloatArray = npt.NDArray[np.float32]
Batch = tuple[npt.NDArray[np.float32], npt.NDArray[np.int64]]


@dataclass
class ReferenceRun:
    """Final weights plus per-step mean loss and accuracy over the step's batches."""

    weights: dict[str, FloatArray]
    losses: list[float] = field(default_factory=list)
    accuracies: list[float] = field(default_factory=list)


def train_reference(
    model: ResNet,
    initial_weights: Mapping[str, FloatArray],
    steps: Iterable[Sequence[Batch]],
    optimizer: MomentumSGD,
    *,
    on_step: Callable[[int, float], None] | None = None,
) -> ReferenceRun:
    """Train as a synchronous PS would, without any networking.

    Each element of ``steps`` lists the batches of one step (one per worker in a sync K-of-N
    step): their gradients are averaged equally, the optimizer applies the mean, and the BN
    moving statistics become the mean of the values each batch's forward pass produced, which is
    exactly what the sync aggregator does with the workers' pushes.
    """
    model.set_weights(initial_weights)
    weights = model.get_weights()
    run = ReferenceRun(weights=weights)
    for index, batches in enumerate(steps):
        if not batches:
            raise ValueError(f"step {index} has no batches")
        results = [model.compute_gradients(x, y) for x, y in batches]
        mean_grads = _mean([r.gradients for r in results])
        mean_stats = _mean([r.non_trainable for r in results])
        weights = optimizer.apply(weights, mean_grads)
        weights.update(mean_stats)
        model.set_weights(weights)
        loss = float(np.mean([r.loss for r in results]))
        run.losses.append(loss)
        run.accuracies.append(float(np.mean([r.accuracy for r in results])))
        if on_step is not None:
            on_step(index, loss)
    run.weights = weights
    return run


def _mean(dicts: Sequence[Mapping[str, FloatArray]]) -> dict[str, FloatArray]:
    if not dicts:
        return {}
    return {
        name: (
            np.sum([np.asarray(d[name], dtype=np.float64) for d in dicts], axis=0) / len(dicts)
        ).astype(np.float32)
        for name in dicts[0]
    }
