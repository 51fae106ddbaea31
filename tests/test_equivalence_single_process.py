"""Without batch norm, averaging two batches' gradients is training on the concatenated batch."""

from __future__ import annotations

import numpy as np
import pytest

from trainer.model import build_resnet
from trainer.optim import MomentumSGD, PiecewiseConstantSchedule
from trainer.reference import train_reference

BATCH = 4
STEPS = 5


def _batches(count: int, seed: int = 0) -> list[Batch]:
    rng = np.random.default_rng(seed)
    return [
        (
            rng.standard_normal((BATCH, 32, 32, 3)).astype(np.float32),
            rng.integers(0, 10, size=BATCH),
        )
        for _ in range(count)
    ]


Batch = tuple[np.ndarray, np.ndarray]


def _concat(a: Batch, b: Batch) -> Batch:
    return np.concatenate([a[0], b[0]]), np.concatenate([a[1], b[1]])


def test_mean_of_two_batch_gradients_equals_gradient_of_the_double_batch() -> None:
    # Arrange
    model = build_resnet(8, batch_norm=False, seed=0)
    first, second = _batches(2)

    # Act
    g1 = model.compute_gradients(*first).gradients
    g2 = model.compute_gradients(*second).gradients
    joint = model.compute_gradients(*_concat(first, second))

    # Assert
    assert joint.num_samples == 2 * BATCH
    for name, grad in joint.gradients.items():
        np.testing.assert_allclose((g1[name] + g2[name]) / 2, grad, atol=1e-5, err_msg=name)
    assert max(float(np.abs(g).max()) for g in g1.values()) > 1e-3  # not trivially zero


def test_reference_training_with_averaged_gradients_equals_double_batch_training() -> None:
    # Arrange
    model = build_resnet(8, batch_norm=False, seed=1)
    initial = model.get_weights()
    pairs = [_batches(2, seed=10 + s) for s in range(STEPS)]
    schedule = PiecewiseConstantSchedule(boundaries=(2,), values=(0.05, 0.02))

    def optimizer() -> MomentumSGD:
        return MomentumSGD(model.variable_specs, schedule, momentum=0.9, weight_decay=2e-4)

    # Act
    averaged = train_reference(model, initial, pairs, optimizer())
    doubled = train_reference(model, initial, [[_concat(a, b)] for a, b in pairs], optimizer())

    # Assert
    assert len(averaged.losses) == len(doubled.losses) == STEPS
    np.testing.assert_allclose(averaged.losses, doubled.losses, atol=1e-4)
    moved = 0.0
    for name, value in doubled.weights.items():
        np.testing.assert_allclose(averaged.weights[name], value, atol=1e-4, err_msg=name)
        moved = max(moved, float(np.abs(value - initial[name]).max()))
    assert moved > 1e-2  # the five steps really trained


def test_batch_norm_breaks_the_equivalence_as_expected() -> None:
    # With BN, batch statistics differ between b and 2b: the check above must be able to fail.
    model = build_resnet(8, batch_norm=True, seed=0)
    first, second = _batches(2)
    g1 = model.compute_gradients(*first).gradients
    g2 = model.compute_gradients(*second).gradients
    joint = model.compute_gradients(*_concat(first, second)).gradients
    worst = max(float(np.abs((g1[k] + g2[k]) / 2 - joint[k]).max()) for k in joint)
    assert worst > 1e-3


def test_reference_run_trains_a_bn_model_and_updates_moving_stats() -> None:
    model = build_resnet(8, seed=0)
    initial = model.get_weights()
    opt = MomentumSGD(model.variable_specs, 0.05)
    fixed = _batches(1, seed=3)[0]
    run = train_reference(model, initial, [[fixed]] * 6, opt)
    assert run.losses[-1] < run.losses[0]
    assert not np.allclose(run.weights["stem_bn/moving_mean"], initial["stem_bn/moving_mean"])
    with pytest.raises(ValueError, match="no batches"):
        train_reference(model, initial, [[]], opt)
