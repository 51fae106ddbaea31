"""Aggregation rules: sync K-of-N with backup workers, bounded-staleness async, FedAvg."""

from __future__ import annotations

import threading

import numpy as np
import pytest

from hfl_lab._exceptions import ConfigError
from trainer.aggregation import Aggregator, Mode, Status, Update


def _t(value: float) -> dict[str, np.ndarray]:
    return {"w": np.full((2, 3), value, np.float32), "b": np.array([value], np.float32)}


def _stats(value: float) -> dict[str, np.ndarray]:
    return {"bn/moving_mean": np.array([value, -value], np.float32)}


class Recorder:
    """Collects the updates an Aggregator applies, like the PS's apply callback."""

    def __init__(self) -> None:
        self.updates: list[Update] = []

    def __call__(self, update: Update) -> None:
        self.updates.append(update)


def test_sync_averages_the_first_k_of_n_and_releases_the_step() -> None:
    # Arrange
    applied = Recorder()
    agg = Aggregator("sync", num_workers=3, quorum=2, apply=applied)

    # Act
    first = agg.submit("w0", 0, _t(1.0), non_trainable=_stats(1.0))
    assert not agg.wait_for_version(1, timeout=0.01)
    second = agg.submit("w1", 0, _t(4.0), non_trainable=_stats(3.0))

    # Assert
    assert first.status is Status.PENDING and second.status is Status.APPLIED
    assert agg.wait_for_version(1, timeout=0.01)
    (update,) = applied.updates
    assert (update.base_version, update.version) == (0, 1)
    np.testing.assert_allclose(update.tensors["w"], 2.5)
    np.testing.assert_allclose(update.non_trainable["bn/moving_mean"], [2.0, -2.0])
    assert update.contributors == ("w0", "w1")
    assert agg.counters().applied == 2 and agg.counters().updates == 1


def test_sync_late_gradient_from_backup_worker_is_dropped_and_counted() -> None:
    # Arrange
    applied = Recorder()
    agg = Aggregator(Mode.SYNC, num_workers=3, quorum=2, apply=applied)
    agg.submit("w0", 0, _t(1.0))
    agg.submit("w1", 0, _t(1.0))

    # Act
    late = agg.submit("w2", 0, _t(100.0))

    # Assert
    assert late.status is Status.LATE_DROPPED and not late.accepted
    assert late.staleness == 1
    counters = agg.counters()
    assert counters.late_dropped == 1 and counters.pending == 0 and counters.version == 1
    assert len(applied.updates) == 1


def test_sync_rejects_duplicates_future_versions_and_malformed_tensors() -> None:
    agg = Aggregator("sync", num_workers=2, shapes={"w": (2, 3), "b": (1,)})
    assert agg.submit("w0", 0, _t(1.0)).status is Status.PENDING
    assert agg.submit("w0", 0, _t(1.0)).status is Status.REJECTED
    assert "ahead" in agg.submit("w1", 5, _t(1.0)).reason
    assert "shape" in agg.submit("w1", 0, {"w": np.zeros((3, 2)), "b": np.zeros(1)}).reason
    assert "names" in agg.submit("w1", 0, {"w": np.zeros((2, 3))}).reason
    nan = _t(1.0)
    nan["w"][0, 0] = np.nan
    assert "NaN" in agg.submit("w1", 0, nan).reason
    assert agg.counters().rejected == 5
    assert agg.submit("w1", 0, _t(3.0)).status is Status.APPLIED
    assert agg.last_update is not None
    np.testing.assert_allclose(agg.last_update.tensors["w"], 2.0)


def test_sync_set_quorum_releases_a_step_waiting_for_a_dead_worker() -> None:
    agg = Aggregator("sync", num_workers=3)
    agg.submit("w0", 0, _t(1.0))
    agg.submit("w1", 0, _t(2.0))
    assert agg.version == 0
    agg.set_quorum(2)
    assert agg.version == 1
    assert agg.last_update is not None
    np.testing.assert_allclose(agg.last_update.tensors["b"], 1.5)


def test_async_applies_on_arrival_within_the_staleness_bound() -> None:
    # Arrange
    applied = Recorder()
    agg = Aggregator("async", num_workers=2, staleness_bound=1, apply=applied)

    # Act
    fresh = agg.submit("w0", 0, _t(1.0))  # version 0 -> 1
    one_stale = agg.submit("w1", 0, _t(2.0))  # staleness 1: accepted, 1 -> 2
    too_stale = agg.submit("w0", 0, _t(3.0))  # staleness 2: refused

    # Assert
    assert fresh.status is Status.APPLIED and one_stale.status is Status.APPLIED
    assert one_stale.staleness == 1
    assert too_stale.status is Status.STALE_REFUSED and too_stale.staleness == 2
    assert [u.version for u in applied.updates] == [1, 2]
    np.testing.assert_allclose(applied.updates[1].tensors["w"], 2.0)
    counters = agg.counters()
    assert (counters.applied, counters.stale_refused, counters.version) == (2, 1, 2)


def test_fedavg_weights_models_by_sample_counts() -> None:
    # Arrange
    applied = Recorder()
    agg = Aggregator("fedavg", num_workers=3, apply=applied)

    # Act
    agg.submit("w0", 0, _t(1.0), num_samples=100, non_trainable=_stats(0.0))
    agg.submit("w1", 0, _t(2.0), num_samples=300, non_trainable=_stats(4.0))
    outcome = agg.submit("w2", 0, _t(10.0), num_samples=600, non_trainable=_stats(1.0))

    # Assert: (1*100 + 2*300 + 10*600) / 1000
    assert outcome.status is Status.APPLIED
    (update,) = applied.updates
    np.testing.assert_allclose(update.tensors["w"], 6.7, rtol=1e-6)
    np.testing.assert_allclose(update.non_trainable["bn/moving_mean"], [1.8, -1.8], rtol=1e-6)
    assert update.num_samples == 1000
    assert agg.submit("w0", 0, _t(1.0), num_samples=5).status is Status.LATE_DROPPED
    assert agg.submit("w0", 1, _t(1.0), num_samples=0).status is Status.REJECTED


def test_failing_apply_leaves_the_version_and_allows_resubmission() -> None:
    calls = []

    def flaky(update: Update) -> None:
        calls.append(update)
        if len(calls) == 1:
            raise RuntimeError("disk full")

    agg = Aggregator("sync", num_workers=1, apply=flaky)
    with pytest.raises(RuntimeError):
        agg.submit("w0", 0, _t(1.0))
    assert agg.version == 0
    assert agg.submit("w0", 0, _t(1.0)).status is Status.APPLIED
    assert agg.version == 1


def test_bad_configuration_raises_config_error() -> None:
    with pytest.raises(ConfigError, match="mode"):
        Aggregator("gossip", num_workers=2)
    with pytest.raises(ConfigError, match="quorum"):
        Aggregator("sync", num_workers=2, quorum=3)


def test_close_wakes_waiters_and_refuses_submissions() -> None:
    agg = Aggregator("sync", num_workers=2)
    result: list[bool] = []
    # the wait's own limit far past the join's: the False comes from close (which it may see
    # before it waits), and a waiter scheduled late still ends within the join
    waiter = threading.Thread(target=lambda: result.append(agg.wait_for_version(1, timeout=300)))
    waiter.start()
    agg.close()
    waiter.join(timeout=60)
    assert not waiter.is_alive() and result == [False]
    assert agg.submit("w0", 0, _t(1.0)).status is Status.REJECTED


def test_concurrent_sync_workers_all_steps_average_exactly() -> None:
    # Arrange: 8 workers x 25 steps, each blocking until its step is released, like gRPC
    # handler threads; the "PS" applies every update as w -= mean gradient.
    num_workers, steps = 8, 25
    weights = {"w": np.zeros((2, 3), np.float32), "b": np.zeros(1, np.float32)}

    def apply(update: Update) -> None:
        for name, grad in update.tensors.items():
            weights[name] = weights[name] - grad

    agg = Aggregator("sync", num_workers=num_workers, apply=apply)
    errors: list[str] = []

    def worker(index: int) -> None:
        for step in range(steps):
            outcome = agg.submit(f"w{index}", step, _t(float(index + step)))
            if not outcome.accepted:
                errors.append(outcome.reason)
            if not agg.wait_for_version(step + 1, timeout=10):
                errors.append(f"w{index} timed out at step {step}")
                return

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(num_workers)]

    # Act
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)

    # Assert: step s averages index+s over indices 0..7 -> 3.5 + s
    assert errors == []
    assert agg.version == steps
    expected = -sum(3.5 + s for s in range(steps))
    np.testing.assert_allclose(weights["w"], expected, rtol=1e-6)
    counters = agg.counters()
    assert counters.applied == num_workers * steps and counters.updates == steps


def test_concurrent_async_submits_are_all_accounted_for() -> None:
    agg = Aggregator("async", num_workers=6, staleness_bound=2)
    barrier = threading.Barrier(6)

    def worker(index: int) -> None:
        barrier.wait()
        for _ in range(50):
            agg.submit(f"w{index}", max(agg.version - index % 4, 0), _t(1.0))

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)

    counters = agg.counters()
    assert counters.applied + counters.stale_refused + counters.rejected == 300
    assert counters.applied == counters.version == counters.updates
    assert counters.stale_refused > 0
