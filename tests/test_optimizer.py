"""PS optimizer: momentum SGD with weight decay, the LR schedule, and checkpointable state."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pytest

from hfl_lab._exceptions import ConfigError
from trainer.optim import MomentumSGD, PiecewiseConstantSchedule, reference_schedule


@dataclass(frozen=True)
class Var:
    name: str
    shape: tuple[int, ...]
    trainable: bool = True
    batch_norm: bool = False


VARS = [
    Var("conv/kernel", (2, 2)),
    Var("bn/gamma", (2,), batch_norm=True),
    Var("bn/moving_mean", (2,), trainable=False, batch_norm=True),
]


def _weights() -> dict[str, np.ndarray]:
    return {
        "conv/kernel": np.array([[1.0, -2.0], [0.5, 4.0]], np.float32),
        "bn/gamma": np.array([1.0, 2.0], np.float32),
        "bn/moving_mean": np.array([0.3, 0.4], np.float32),
    }


def _grads(scale: float) -> dict[str, np.ndarray]:
    return {
        "conv/kernel": np.full((2, 2), scale, np.float32),
        "bn/gamma": np.array([scale, -scale], np.float32),
    }


def test_two_steps_match_hand_computed_momentum_and_decay() -> None:
    # Arrange
    lr, m, wd = 0.1, 0.9, 0.01
    opt = MomentumSGD(VARS, lr, momentum=m, weight_decay=wd)
    w0 = _weights()

    # Act
    w1 = opt.apply(w0, _grads(1.0))
    w2 = opt.apply(w1, _grads(2.0))

    # Assert (by hand): v1 = g1 + wd*w0; w1 = w0 - lr*v1; v2 = m*v1 + g2 + wd*w1; w2 = w1 - lr*v2
    k0 = w0["conv/kernel"].astype(np.float64)
    v1 = 1.0 + wd * k0
    k1 = k0 - lr * v1
    v2 = m * v1 + 2.0 + wd * k1
    k2 = k1 - lr * v2
    np.testing.assert_allclose(w1["conv/kernel"], k1, rtol=1e-6)
    np.testing.assert_allclose(w2["conv/kernel"], k2, rtol=1e-6)
    # BN gamma: momentum but no decay.
    g0 = w0["bn/gamma"].astype(np.float64)
    gv1 = np.array([1.0, -1.0])
    gv2 = m * gv1 + np.array([2.0, -2.0])
    np.testing.assert_allclose(w2["bn/gamma"], g0 - lr * gv1 - lr * gv2, rtol=1e-6)
    # Non-trainable values pass through untouched.
    np.testing.assert_array_equal(w2["bn/moving_mean"], w0["bn/moving_mean"])
    assert w2["conv/kernel"].dtype == np.float32
    assert opt.step == 2


def test_batch_norm_variables_are_excluded_from_decay() -> None:
    # Arrange: zero gradients, so any movement is weight decay.
    opt = MomentumSGD(VARS, 1.0, momentum=0.0, weight_decay=0.5)
    zeros = {"conv/kernel": np.zeros((2, 2), np.float32), "bn/gamma": np.zeros(2, np.float32)}

    # Act
    out = opt.apply(_weights(), zeros)

    # Assert
    assert opt.decayed == {"conv/kernel"}
    np.testing.assert_allclose(out["conv/kernel"], 0.5 * _weights()["conv/kernel"])
    np.testing.assert_array_equal(out["bn/gamma"], _weights()["bn/gamma"])


def test_gradient_names_must_match_trainable_variables() -> None:
    opt = MomentumSGD(VARS, 0.1)
    with pytest.raises(KeyError, match="missing"):
        opt.apply(_weights(), {"conv/kernel": np.zeros((2, 2), np.float32)})


def test_piecewise_schedule_boundaries_follow_tf_semantics() -> None:
    schedule = PiecewiseConstantSchedule(boundaries=(10, 20), values=(1.0, 0.1, 0.01))
    assert [schedule(s) for s in (0, 10, 11, 20, 21, 10**6)] == [1.0, 1.0, 0.1, 0.1, 0.01, 0.01]


def test_warmup_ramps_linearly_then_follows_the_schedule() -> None:
    schedule = PiecewiseConstantSchedule(boundaries=(100,), values=(0.4, 0.04), warmup_steps=4)
    assert [schedule(s) for s in range(6)] == pytest.approx([0.0, 0.1, 0.2, 0.3, 0.4, 0.4])
    assert schedule(101) == pytest.approx(0.04)


def test_reference_schedule_scales_lr_with_batch_and_decays_at_epochs() -> None:
    # Arrange: 50,000 images, batch 256 -> 195 steps per epoch.
    schedule = reference_schedule(steps_per_epoch=195, batch_size=256)

    # Assert
    assert schedule.boundaries == (195 * 91, 195 * 136, 195 * 182)
    assert schedule.values == pytest.approx((0.2, 0.02, 0.002, 0.0002))
    assert schedule(0) == pytest.approx(0.2)
    assert schedule(195 * 91 + 1) == pytest.approx(0.02)
    assert schedule(195 * 200) == pytest.approx(0.0002)
    assert reference_schedule(10, 128, warmup_epochs=5).warmup_steps == 50


def test_optimizer_follows_the_schedule() -> None:
    schedule = PiecewiseConstantSchedule(boundaries=(0,), values=(1.0, 0.5))
    opt = MomentumSGD(VARS, schedule, momentum=0.0, weight_decay=0.0)
    w = opt.apply(_weights(), _grads(1.0))
    assert opt.learning_rate == 0.5
    w = opt.apply(w, _grads(1.0))
    np.testing.assert_allclose(w["conv/kernel"], _weights()["conv/kernel"] - 1.5)


def test_bad_schedule_or_hyperparameters_raise_config_error() -> None:
    with pytest.raises(ConfigError, match="one more value"):
        PiecewiseConstantSchedule((1, 2), (0.1,))
    with pytest.raises(ConfigError, match="increasing"):
        PiecewiseConstantSchedule((2, 1), (0.1, 0.1, 0.1))
    with pytest.raises(ConfigError, match="momentum"):
        MomentumSGD(VARS, 0.1, momentum=1.5)


def test_state_export_import_round_trip_continues_identically() -> None:
    # Arrange
    original = MomentumSGD(VARS, 0.1, weight_decay=1e-3)
    w = original.apply(_weights(), _grads(1.0))
    w = original.apply(w, _grads(-0.5))
    state = original.state()
    restored = MomentumSGD(VARS, 0.1, weight_decay=1e-3)

    # Act
    restored.load_state(state)
    next_original = original.apply(w, _grads(0.25))
    next_restored = restored.apply(w, _grads(0.25))

    # Assert
    assert set(state) == {"step", "velocity/conv/kernel", "velocity/bn/gamma"}
    assert all(isinstance(v, np.ndarray) for v in state.values())
    assert restored.step == 3
    for name in next_original:
        np.testing.assert_array_equal(next_original[name], next_restored[name])
    # The exported state is a copy, not a view of the live velocities.
    assert not np.array_equal(
        state["velocity/conv/kernel"], original.state()["velocity/conv/kernel"]
    )


def test_load_state_rejects_wrong_shapes_and_missing_entries() -> None:
    opt = MomentumSGD(VARS, 0.1)
    state = opt.state()
    with pytest.raises(ConfigError, match="shape"):
        opt.load_state({**state, "velocity/bn/gamma": np.zeros(3, np.float32)})
    with pytest.raises(ConfigError, match="velocity"):
        opt.load_state({"step": np.asarray(1)})
