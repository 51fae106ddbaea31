"""`python -m bench [--only ID ...] [--quick] [--markdown]`: run benchmarks, merge results."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from bench.registry import REGISTRY, BenchContext, discover
from bench.report import (
    RESULTS,
    load_results,
    merge_records,
    render_markdown,
    render_table,
    write_results,
)
from bench.runner import run_benchmarks
from hfl_lab._exceptions import HflLabError


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument("--only", nargs="+", metavar="ID", help="run only these benchmark ids")
    parser.add_argument("--quick", action="store_true", help="fewer repetitions (smoke run)")
    parser.add_argument(
        "--markdown",
        action="store_true",
        help="print the latest results as a README table; run nothing",
    )
    parser.add_argument(
        "--list", action="store_true", help="list registered benchmarks; run nothing"
    )
    parser.add_argument(
        "--results", type=Path, default=RESULTS, help=f"results file (default {RESULTS})"
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.markdown:
            print(render_markdown(load_results(args.results)), end="")
            return 0
        discover()
        if args.list:
            for bench in REGISTRY:
                print(f"{bench.id:<20} {bench.unit:<6} goal {bench.goal:<8} {bench.what}")
            return 0
        selected = REGISTRY.select(args.only)
        outcome = run_benchmarks(selected, BenchContext(quick=args.quick))
        write_results(merge_records(load_results(args.results), outcome.records), args.results)
    except HflLabError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(render_table(outcome.records))
    print(f"\nmerged {len(outcome.records)} record(s) into {args.results}")
    if outcome.failed:
        print(f"benchmarks that crashed: {', '.join(outcome.failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
