"""Benchmark harness: record format, goals, merging results.json, tables, registry and CLI."""

from __future__ import annotations

import json
import re
from datetime import UTC, datetime
from pathlib import Path

import pytest

from bench.__main__ import main
from bench.registry import BenchContext, Measurement, Registry, benchmark
from bench.report import (
    describe_machine,
    format_quantity,
    goal_met,
    load_results,
    make_record,
    merge_records,
    render_markdown,
    render_table,
    write_results,
)
from bench.runner import run_benchmarks
from hfl_lab._exceptions import ConfigError

WHEN = datetime(2026, 11, 30, 12, 0, tzinfo=UTC)
MACHINE = "2 cores, no GPU, Test CPU"


def record(id: str, value: float = 0.412, baseline: float | None = 0.398, goal: str = "<= 1.05"):
    return make_record(
        id,
        what=f"figure {id}",
        value=value,
        unit="s",
        goal=goal,
        baseline=baseline,
        machine=MACHINE,
        when=WHEN,
    )


def test_record_has_the_bench_md_fields_in_order() -> None:
    rec = record("P1-resnet56")

    assert list(rec) == [
        "id",
        "what",
        "value",
        "unit",
        "baseline",
        "ratio",
        "goal",
        "machine",
        "when",
    ]
    assert rec["ratio"] == pytest.approx(0.412 / 0.398, rel=1e-4)
    assert rec["when"] == "2026-11-30T12:00:00Z"
    assert json.loads(json.dumps(rec)) == rec


def test_record_without_baseline_leaves_ratio_out_and_judges_value() -> None:
    rec = record("P3-issuance", value=0.011, baseline=None, goal="<= 0.02")

    assert "ratio" not in rec and "baseline" not in rec
    assert "met" in render_table([rec]).splitlines()[-1]


@pytest.mark.parametrize(
    ("goal", "value", "met"),
    [
        ("<= 1.05", 1.05, True),
        ("<= 1.05", 1.06, False),
        (">= 0.9", 0.95, True),
        (">=0.9", 0.5, False),
        ("< 2", 2.0, False),
        ("> 0", 1e-9, True),
        ("report", 123.0, None),
    ],
)
def test_goal_check(goal: str, value: float, met: bool | None) -> None:
    assert goal_met(goal, value) is met


def test_unreadable_goal_is_refused_at_registration() -> None:
    with pytest.raises(ConfigError, match="not understood"):
        benchmark("X-bad", what="w", unit="s", goal="about 1", registry=Registry())


def test_merge_replaces_same_id_in_place_and_keeps_others() -> None:
    old = [record("A", 1.0), record("B", 2.0), record("C", 3.0)]
    new = [record("B", 20.0), record("D", 4.0)]

    merged = merge_records(old, new)

    assert [r["id"] for r in merged] == ["A", "B", "C", "D"]
    assert [r["value"] for r in merged] == [1.0, 20.0, 3.0, 4.0]


def test_results_file_round_trip_and_corruption(tmp_path: Path) -> None:
    path = tmp_path / "results.json"
    assert load_results(path) == []

    write_results([record("A")], path)

    assert load_results(path) == [record("A")]
    assert not list(tmp_path.glob(".*tmp"))
    path.write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        load_results(path)
    path.write_text('{"id": "A"}')
    with pytest.raises(ConfigError, match="list of records"):
        load_results(path)


def test_markdown_table_separates_supplementary_figures() -> None:
    records = [
        record("P1-resnet56", 0.5, 0.4),  # ratio 1.25: goal missed, still shown
        make_record(
            "X-codec-3.4MB",
            what="codec a|b",
            value=3e8,
            unit="B/s",
            goal="report",
            baseline=1.5e9,
            machine=MACHINE,
            when=WHEN,
        ),
    ]

    text = render_markdown(records)

    lines = text.splitlines()
    assert lines[0] == "| id | what | value | baseline | ratio | goal | met |"
    assert (
        "| `P1-resnet56` | figure P1-resnet56 | 500 ms | 400 ms | 1.250 | <= 1.05 | NOT met |"
        in lines
    )
    supplementary = lines.index("Supplementary figures (`X-` ids, not in docs/BENCH.md):")
    assert lines.index(next(line for line in lines if "`X-codec-3.4MB`" in line)) > supplementary
    assert "codec a\\|b | 300 MB/s | 1.5 GB/s | 0.200 | report | — |" in text
    assert f"Measured on {MACHINE}; latest 2026-11-30T12:00:00Z." in text


def test_markdown_shows_machine_column_when_machines_differ() -> None:
    other = make_record(
        "P4",
        what="w",
        value=0.05,
        unit="ratio",
        goal="<= 0.1",
        machine="16 cores, 1 GPU (H200), Xeon",
        when=WHEN,
    )

    text = render_markdown([record("P1-resnet20"), other])

    assert text.splitlines()[0].endswith("| met | machine |")
    assert "| met | 16 cores, 1 GPU (H200), Xeon |" in text
    assert render_markdown([]).startswith("_No benchmark results yet")


@pytest.mark.parametrize(
    ("value", "unit", "text"),
    [
        (2.5e9, "B/s", "2.5 GB/s"),
        (0.0123, "s", "12.3 ms"),
        (4e-6, "s", "4 µs"),
        (1.0349, "ratio", "1.035"),
    ],
)
def test_quantities_are_human_readable(value: float, unit: str, text: str) -> None:
    assert format_quantity(value, unit) == text


def test_machine_is_described_as_cores_gpu_and_cpu() -> None:
    assert re.fullmatch(r"\d+ cores, (no GPU|\d+ GPUs? \(.+\)), .+", describe_machine())


def test_runner_measures_registered_benchmarks_and_survives_a_crash() -> None:
    registry = Registry()
    calls: list[tuple[bool, int]] = []

    @benchmark("X-one", what="one", unit="B/s", goal=">= 0.5", registry=registry, size=1)
    @benchmark("X-two", what="two", unit="B/s", goal=">= 0.5", registry=registry, size=2)
    def fake(ctx: BenchContext, *, size: int) -> Measurement:
        calls.append((ctx.quick, size))
        return Measurement(value=size * 10.0, baseline=40.0)

    @benchmark("X-broken", what="broken", unit="s", registry=registry)
    def broken(ctx: BenchContext) -> Measurement:
        raise RuntimeError("boom")

    outcome = run_benchmarks(registry.select(None), BenchContext(quick=True))

    assert sorted(calls) == [(True, 1), (True, 2)]
    assert [r["id"] for r in outcome.records] == ["X-two", "X-one"]  # decorators apply bottom-up
    assert [r["ratio"] for r in outcome.records] == [0.5, 0.25]
    assert outcome.failed == ["X-broken"]
    with pytest.raises(ConfigError, match="X-nope"):
        registry.select(["X-nope"])
    with pytest.raises(ConfigError, match="twice"):
        benchmark("X-one", what="again", unit="s", registry=registry)(broken)


def test_an_id_selects_its_family_of_figures() -> None:
    registry = Registry()

    def fake(ctx: BenchContext) -> Measurement:
        return Measurement(1.0)

    for bench_id in ("X-join", "X-join-step", "X-join-resume", "X-joint", "P7-2w", "P7-4w"):
        benchmark(bench_id, what=bench_id, unit="s", registry=registry)(fake)

    assert [b.id for b in registry.select(["X-join"])] == ["X-join", "X-join-step",
                                                           "X-join-resume"]
    assert [b.id for b in registry.select(["P7-4w", "X-join-step"])] == ["X-join-step", "P7-4w"]
    assert [b.id for b in registry.select(["P7"])] == ["P7-2w", "P7-4w"]
    with pytest.raises(ConfigError, match="X-jo"):
        registry.select(["X-jo"])


def test_cli_markdown_and_unknown_id(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    results = tmp_path / "results.json"
    write_results([record("P1-resnet56")], results)

    assert main(["--markdown", "--results", str(results)]) == 0
    assert "`P1-resnet56`" in capsys.readouterr().out
    assert main(["--only", "X-no-such-id", "--results", str(results)]) == 2
    assert "X-no-such-id" in capsys.readouterr().err
    assert load_results(results) == [record("P1-resnet56")]  # nothing run, nothing changed


def test_codec_benchmarks_are_registered_without_running() -> None:
    assert main(["--list"]) == 0
