"""Runs selected benchmarks and turns their measurements into records."""

from __future__ import annotations

import sys
import traceback
from collections.abc import Iterable
from dataclasses import dataclass, field

from bench.registry import BenchContext, Benchmark
from bench.report import Record, describe_machine, make_record


@dataclass
class RunOutcome:
    records: list[Record] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)


def run_benchmarks(benchmarks: Iterable[Benchmark], ctx: BenchContext) -> RunOutcome:
    """Measure each benchmark; one that crashes is reported and the others still run."""
    outcome = RunOutcome()
    machine = describe_machine()
    for bench in benchmarks:
        print(f"running {bench.id}: {bench.what} ...", file=sys.stderr, flush=True)
        try:
            measured = bench.measure(ctx)
        except Exception:  # a broken benchmark must not hide the others' figures
            traceback.print_exc()
            outcome.failed.append(bench.id)
            continue
        outcome.records.append(
            make_record(
                bench.id,
                what=bench.what,
                value=measured.value,
                unit=bench.unit,
                goal=bench.goal,
                baseline=measured.baseline,
                machine=machine,
                judged_by=bench.judged_by,
            )
        )
    return outcome
