"""Benchmark records (docs/BENCH.md format): machine description, goals, merge, tables."""

from __future__ import annotations

import json
import operator
import os
import re
import shutil
import subprocess
import tempfile
from collections.abc import Callable, Iterable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, NotRequired, TypedDict

from hfl_lab._exceptions import ConfigError

RESULTS = Path(__file__).resolve().parent / "results.json"
SUPPLEMENTARY_PREFIX = "X-"  # figures beyond docs/BENCH.md, shown apart in the README

_GOAL = re.compile(r"^\s*(<=|>=|<|>)\s*([-+]?[0-9]*\.?[0-9]+(?:[eE][-+]?[0-9]+)?)\s*$")
_COMPARE: dict[str, Callable[[float, float], bool]] = {
    "<=": operator.le,
    ">=": operator.ge,
    "<": operator.lt,
    ">": operator.gt,
}


class Record(TypedDict):
    """One figure of bench/results.json; ``baseline``/``ratio`` absent where not a ratio."""

    id: str
    what: str
    value: float
    unit: str
    baseline: NotRequired[float]
    ratio: NotRequired[float]
    goal: str
    machine: str
    when: str


def make_record(
    id: str,  # named like the record field
    *,
    what: str,
    value: float,
    unit: str,
    goal: str,
    baseline: float | None = None,
    machine: str | None = None,
    when: datetime | None = None,
    judged_by: str = "ratio",
) -> Record:
    """A record with the fields in BENCH.md's order; ``ratio`` = value ÷ baseline."""
    parse_goal(goal)
    record: dict[str, Any] = {"id": id, "what": what, "value": _rounded(value), "unit": unit}
    if baseline is not None:
        record["baseline"] = _rounded(baseline)
        # BENCH.md: a figure that is not a ratio (judged by its value in seconds) has no
        # ratio field; its baseline stays, and the printed table still shows value ÷ baseline.
        if judged_by == "ratio":
            record["ratio"] = round(value / baseline, 4)
    record["goal"] = goal
    record["machine"] = machine if machine is not None else describe_machine()
    record["when"] = (when or datetime.now(UTC)).strftime("%Y-%m-%dT%H:%M:%SZ")
    return record  # type: ignore[return-value]


def _rounded(value: float) -> float:
    return float(f"{value:.6g}")


def parse_goal(goal: str) -> tuple[str, float] | None:
    """``("<=", 1.05)`` for a goal such as "<= 1.05"; None for "report" (no goal)."""
    if goal.strip() == "report":
        return None
    match = _GOAL.match(goal)
    if match is None:
        raise ConfigError(
            f"benchmark goal {goal!r} is not understood.",
            fix='write it as "<= 1.05", ">= 0.9" or "report".',
        )
    return match[1], float(match[2])


def judged_value(record: Record) -> float:
    """The figure a goal judges: the ratio where there is one, else the value."""
    return record.get("ratio", record["value"])


def goal_met(goal: str, value: float) -> bool | None:
    """Whether ``value`` meets ``goal``; None where the goal is only "report"."""
    parsed = parse_goal(goal)
    if parsed is None:
        return None
    op, bound = parsed
    return _COMPARE[op](value, bound)


def describe_machine() -> str:
    """ "2 cores, no GPU, Intel(R) Xeon(R) ..." for the machine this process runs on."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return f"{cores} cores, {_describe_gpus()}, {_cpu_model()}"


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return platform.processor() or platform.machine() or "unknown CPU"


def _describe_gpus() -> str:
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return "no GPU"
    try:
        out = subprocess.run(
            [smi, "--query-gpu=name", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=20,
            check=True,
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return "no GPU"
    names = [line.strip() for line in out.splitlines() if line.strip()]
    if not names:
        return "no GPU"
    kinds = sorted(set(names))
    return f"{len(names)} GPU{'s' if len(names) > 1 else ''} ({', '.join(kinds)})"


# ------------------------------------------------------------------------------ results file


def load_results(path: Path = RESULTS) -> list[Record]:
    if not path.exists():
        return []
    try:
        records = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ConfigError(
            f"{path} is not valid JSON ({exc}).",
            fix="repair it, or delete it and run `make bench` again.",
        ) from exc
    if not isinstance(records, list) or not all(
        isinstance(r, dict) and isinstance(r.get("id"), str) for r in records
    ):
        raise ConfigError(
            f"{path} is not a JSON list of records with an 'id'.",
            fix="repair it, or delete it and run `make bench` again.",
        )
    return records


def merge_records(existing: Iterable[Record], new: Iterable[Record]) -> list[Record]:
    """Records of ``new`` replace those with the same id in place; the others stay."""
    merged = {record["id"]: record for record in existing}
    for record in new:
        merged[record["id"]] = record
    return list(merged.values())


def write_results(records: list[Record], path: Path = RESULTS) -> None:
    """Write atomically, so an interrupted run leaves the previous file intact."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(
        "w", dir=path.parent, prefix=f".{path.name}.", suffix=".tmp", delete=False
    ) as tmp:
        json.dump(records, tmp, indent=2, ensure_ascii=False)
        tmp.write("\n")
    Path(tmp.name).replace(path)


# ------------------------------------------------------------------------------ tables


def format_quantity(value: float, unit: str) -> str:
    """Human form of a value in its unit: "1.23 GB/s", "12.4 ms", "1.035"."""
    if unit in ("B/s", "B"):
        for scale, prefix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
            if abs(value) >= scale:
                return f"{value / scale:.3g} {prefix}{unit}"
        return f"{value:.3g} {unit}"
    if unit == "s":
        if abs(value) < 1e-3:
            return f"{value * 1e6:.3g} µs"
        if abs(value) < 1:
            return f"{value * 1e3:.3g} ms"
        return f"{value:.3g} s"
    if unit == "ratio":
        return f"{value:.3f}"
    return f"{value:.4g} {unit}"


def _verdict(record: Record) -> str:
    met = goal_met(record["goal"], judged_value(record))
    return {True: "met", False: "NOT met", None: "—"}[met]


def _cells(record: Record) -> list[str]:
    baseline = record.get("baseline")
    ratio = record.get("ratio")
    if ratio is None and baseline:
        ratio = record["value"] / baseline
    return [
        record["id"],
        format_quantity(record["value"], record["unit"]),
        "" if baseline is None else format_quantity(baseline, record["unit"]),
        "" if ratio is None else f"{ratio:.3f}",
        record["goal"],
        _verdict(record),
    ]


def render_table(records: list[Record]) -> str:
    """Plain-text table for the terminal."""
    rows = [["id", "value", "baseline", "ratio", "goal", "met"]]
    rows += [_cells(record) for record in records]
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = [
        "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True))
        for row in rows
    ]
    lines.insert(1, "  ".join("-" * width for width in widths))
    return "\n".join(line.rstrip() for line in lines)


def render_markdown(records: list[Record]) -> str:
    """The README's benchmark section: BENCH.md figures, then supplementary X- figures."""
    if not records:
        return "_No benchmark results yet: run `make bench`._\n"
    machines = sorted({record["machine"] for record in records})
    with_machine = len(machines) > 1
    main = [r for r in records if not r["id"].startswith(SUPPLEMENTARY_PREFIX)]
    extra = [r for r in records if r["id"].startswith(SUPPLEMENTARY_PREFIX)]
    parts = []
    if main:
        parts.append(_markdown_table(main, with_machine))
    if extra:
        parts.append("Supplementary figures (`X-` ids, not in docs/BENCH.md):\n")
        parts.append(_markdown_table(extra, with_machine))
    latest = max(record["when"] for record in records)
    if with_machine:
        parts.append(f"Latest measurement {latest}.\n")
    else:
        parts.append(f"Measured on {machines[0]}; latest {latest}.\n")
    return "\n".join(parts)


def _markdown_table(records: list[Record], with_machine: bool) -> str:
    header = ["id", "what", "value", "baseline", "ratio", "goal", "met"]
    header += ["machine"] if with_machine else []
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for record in records:
        cells = _cells(record)
        row = [f"`{cells[0]}`", record["what"], *cells[1:]]
        row += [record["machine"]] if with_machine else []
        lines.append("| " + " | ".join(cell.replace("|", "\\|") for cell in row) + " |")
    return "\n".join(lines) + "\n"
