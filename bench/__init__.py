"""Benchmarks: ratios against baselines measured in the same run, written to results.json.

Add a figure by decorating a function in any module of this package::

    from bench import BenchContext, Measurement, benchmark

    @benchmark("P2-3.4MB", what="PS push+pull ÷ raw mTLS echo", unit="B/s", goal=">= 0.9")
    def push_pull(ctx: BenchContext) -> Measurement: ...

`python -m bench` imports every module of the package, runs what is registered and merges the
records into bench/results.json (see docs/BENCH.md for the format).
"""

from __future__ import annotations

from bench.registry import REGISTRY, BenchContext, Benchmark, Measurement, Registry, benchmark
from bench.report import Record, describe_machine, goal_met, merge_records, render_markdown

__all__ = [
    "REGISTRY",
    "BenchContext",
    "Benchmark",
    "Measurement",
    "Record",
    "Registry",
    "benchmark",
    "describe_machine",
    "goal_met",
    "merge_records",
    "render_markdown",
]
