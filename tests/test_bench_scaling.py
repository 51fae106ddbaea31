"""P7 (bench/scaling.py): the knee analysis on known curves, and the whole figure, its records,
curve and plot, measured for real on two workers (the format, not the speed)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench.registry import BenchContext, Registry, benchmark
from bench.runner import run_benchmarks
from bench.scaling import Plan, Point, ScalingSession, find_knee
from hfl_lab.config import LabConfig


def point(workers: int, pushes_per_s: float, *, ps_cores: float, client_cores: float = 0.3,
          other_cores: float = 0.0, cpu_ms_per_push: float = 8.0) -> Point:
    """A point whose derived figures are the ones given (a 10 s round)."""
    seconds = 10.0
    pushes = round(pushes_per_s * seconds)
    return Point(
        workers=workers, steps=pushes // workers, ps_seconds=seconds,
        window_steps_per_s=(pushes_per_s / workers,), round_seconds=seconds,
        ps_cpu_s=ps_cores * seconds, client_cpu_s=client_cores * seconds,
        machine_busy_s=(ps_cores + client_cores + other_cores) * seconds, pushes=pushes,
        push_bytes=1 << 20, pull_bytes=1 << 20, worker_push_ms=10.0, worker_wait_ms=5.0,
        worker_pull_ms=2.0,
    )


def test_a_curve_that_saturates_has_its_knee_where_efficiency_falls_and_ps0_named() -> None:
    # Arrange: linear to 2 workers, then flat at ps0's one-core ceiling
    baseline = point(1, 60.0, ps_cores=0.48)
    points = [point(2, 110.0, ps_cores=0.88), point(4, 118.0, ps_cores=0.94),
              point(8, 120.0, ps_cores=0.96), point(16, 100.0, ps_cores=0.9)]

    # Act
    knee = find_knee(baseline, points, cores=2)

    # Assert
    assert (knee.linear_until, knee.not_linear_at) == (2, 4)
    assert (knee.peak_at, knee.peak_pushes_per_s, knee.saturated_from) == (8, 120.0, 2)
    assert "at N=4 ps0 is CPU-bound" in knee.reason
    assert "linear scaling ends near N = 1/0.48 = 2.1" in knee.reason


def test_a_linear_curve_has_no_knee_and_a_busy_machine_is_named_when_ps0_is_not() -> None:
    baseline = point(1, 50.0, ps_cores=0.4)
    linear = [point(2, 99.0, ps_cores=0.8), point(4, 190.0, ps_cores=0.8)]
    crowded = [point(2, 60.0, ps_cores=0.5, client_cores=0.5, other_cores=0.9)]
    idle = [point(2, 60.0, ps_cores=0.5, client_cores=0.3)]

    assert find_knee(baseline, linear, cores=2).not_linear_at is None
    assert find_knee(baseline, linear, cores=2).linear_until == 4
    assert "the machine's 2 cores are saturated" in find_knee(baseline, crowded, 2).reason
    assert "no CPU is saturated" in find_knee(baseline, idle, 2).reason


@pytest.mark.slow
def test_p7_on_two_workers_gives_a_record_the_curve_and_the_plot(tmp_path: Path,
                                                                  cifar_dir: Path) -> None:
    # Arrange: the real figure (trust service and ps0 processes, attested simulated workers),
    # on ResNet-8 and a few steps, its files in tmp_path, registered like the P7 figures
    lab = LabConfig.profile("quick", depth=8, batch_size=8, workers=2, aggregation="sync",
                            eval_every=0, checkpoint_every=0, vault=False,
                            workload_image="off", data_path=str(cifar_dir))
    plan = Plan(depth=8, batch_size=8, warmup_steps=1, pushes=8, min_steps=3, windows=2,
                split_pushes=3)
    plot, curve = tmp_path / "scaling.png", tmp_path / "scaling.json"
    session = ScalingSession(plan, lab=lab, plot=plot, curve_json=curve, max_workers=2)
    registry = Registry()
    benchmark("P7-2w", what="P7 on two workers", unit="pushes/s", goal="report",
              registry=registry, workers=2)(lambda ctx, workers: session.measure(workers))

    # Act
    try:
        outcome = run_benchmarks(registry.select(None), BenchContext(quick=True))
    finally:
        session.close()

    # Assert: a BENCH.md record, the curve with its baseline, and a PNG
    assert outcome.failed == []
    (record,) = outcome.records
    assert list(record) == ["id", "what", "value", "unit", "baseline", "ratio", "goal",
                            "machine", "when"]
    assert record["id"] == "P7-2w" and record["unit"] == "pushes/s"
    assert record["goal"] == "report"
    assert record["value"] > 0 and record["baseline"] > 0
    assert record["ratio"] == pytest.approx(record["value"] / record["baseline"], abs=1e-3)
    saved = json.loads(curve.read_text())
    assert saved["evidence"] == "SIMULATED TDs"
    assert saved["baseline"]["workers"] == 1
    assert [p["workers"] for p in saved["points"]] == [2]
    assert saved["points"][0]["pushes"] == 2 * plan.steps(2)
    assert saved["points"][0]["ps_cpu_ms_per_push"] > 0
    assert {"decode", "aggregate", "update"} <= set(saved["ps0_ms_per_push_in_process"])
    assert saved["knee"]["reason"].startswith("at N=")
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
