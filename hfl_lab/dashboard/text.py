"""The dashboard as text: one line per notable event and a summary of metrics.json."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from hfl_lab._exceptions import ConfigError
from hfl_lab.dashboard.state import AttestationRecord, check_difference

__all__ = ["attestation_line", "event_text", "matrix_text", "summarize_run", "text_summary"]

_MARKS = {"pass": "PASS", "simulated-pass": "PASS (SIMULATED)", "fail": "FAIL"}


def attestation_line(record: AttestationRecord) -> str:
    """``✓ worker0 → ps0: PASS (SIMULATED)`` or ``✗ … : FAIL — reason``."""
    mark = "✗" if record.verdict == "fail" else "✓"
    line = f"{mark} attestation {record.verifier} → {record.subject}: {_MARKS[record.verdict]}"
    if record.verdict != "fail":
        return line
    difference = record.difference
    return line + f" — {record.reason}" + (f" ({difference})" if difference else "")


def matrix_text(matrix: Mapping[str, Any]) -> str:
    """metrics.json's ``attestation_matrix`` as a text grid (rows verifier, columns subject)."""
    verifiers: Sequence[str] = matrix.get("verifiers", [])
    subjects: Sequence[str] = matrix.get("subjects", [])
    if not verifiers:
        return "attestation: none yet"
    cells = {(c["verifier"], c["subject"]): c for c in matrix.get("cells", [])}
    header = ["verifier \\ subject", *subjects]
    rows = [header]
    for verifier in verifiers:
        row = [verifier]
        for subject in subjects:
            cell = cells.get((verifier, subject))
            row.append(_MARKS[cell["verdict"]] if cell else "-")
        rows.append(row)
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    lines = ["  ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)) for r in rows]
    refused = [c for c in cells.values() if c["verdict"] == "fail"]
    for c in refused:
        difference = check_difference(c.get("checks", []))
        lines.append(f"  refused {c['verifier']} → {c['subject']}: {c['reason']}"
                     + (f" ({difference})" if difference else ""))
    return "\n".join(lines)


def _last(values: Sequence[Any]) -> Any:
    present = [v for v in values if v is not None]
    return present[-1] if present else None


def _fmt(value: Any, spec: str = ".4f") -> str:
    return "n/a" if value is None else format(value, spec)


def text_summary(metrics: Mapping[str, Any]) -> str:
    """A plain-text report of a run (metrics.json content), for headless runs and terminals."""
    lines = []
    if metrics.get("simulated"):
        lines.append(f"*** SIMULATED *** {metrics.get('simulated_note', '')}")
    total = metrics.get("total_steps") or "?"
    lines.append(f"steps: {metrics.get('steps_done', 0)}/{total}")
    for role, series in sorted(metrics.get("workers", {}).items()):
        losses = [v for v in series.get("loss", []) if v is not None]
        first = losses[0] if losses else None
        lines.append(
            f"  {role}: {len(series.get('step', []))} steps, loss {_fmt(first)} → "
            f"{_fmt(_last(losses))}, batch accuracy {_fmt(_last(series.get('accuracy', [])))}"
        )
    evaluation = metrics.get("evaluation", {})
    if evaluation.get("step"):
        lines.append(
            f"global model at step {evaluation['step'][-1]}: test loss "
            f"{_fmt(_last(evaluation.get('loss', [])))}, test accuracy "
            f"{_fmt(_last(evaluation.get('accuracy', [])))}"
        )
    means = metrics.get("step_time_means", {})
    if means:
        lines.append("mean step time (ms): role  compute  push  wait  pull  total")
        for role, parts in sorted(means.items()):
            cols = [
                _fmt(1000 * parts[k], ".1f") if k in parts else "n/a"
                for k in ("compute_s", "push_s", "wait_s", "pull_s", "total_s")
            ]
            lines.append(f"  {role}  " + "  ".join(cols))
    lines.append(matrix_text(metrics.get("attestation_matrix", {})))
    counts = metrics.get("counts", {})
    by_kind = ", ".join(f"{k} {v}" for k, v in sorted(counts.get("by_kind", {}).items()))
    lines.append(
        f"events: {counts.get('events', 0)} ({by_kind}); ignored {counts.get('ignored', 0)}"
    )
    denied = [a for a in metrics.get("audit", []) if not a.get("allowed")]
    lines += [f"  denied by {a['source']}: {a['action']} — {a['reason']}" for a in denied]
    failed = {s: v for s, v in metrics.get("lifecycle", {}).items() if v.get("state") == "failed"}
    lines += [f"  {s} failed: {v.get('detail', '')}" for s, v in sorted(failed.items())]
    return "\n".join(lines)


def summarize_run(run_dir: str | Path) -> str:
    """:func:`text_summary` of the metrics.json a dashboard wrote into ``run_dir``."""
    path = Path(run_dir) / "metrics.json"
    try:
        metrics = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ConfigError(
            f"cannot read {path}: {e}.", fix="point at the run folder of a finished run."
        ) from None
    return text_summary(metrics)


def event_text(kind: str, source: str, data: Mapping[str, Any],
               record: AttestationRecord | None = None) -> str | None:
    """The line a headless run prints for a notable event, or None for routine ones."""
    if kind == "attestation" and isinstance(record, AttestationRecord):
        return attestation_line(record)
    if kind == "evaluation":
        loss, accuracy = data.get("loss"), data.get("accuracy")
        return (
            f"evaluation at step {data.get('step')}: test loss {_num(loss)}, "
            f"test accuracy {_num(accuracy)}"
        )
    if kind == "lifecycle" and data.get("state") == "failed":
        return f"✗ {source} failed: {data.get('detail') or 'no detail'}"
    if kind == "audit" and data.get("allowed") is not True:
        return f"✗ {source} denied {data.get('action', '?')}: {data.get('reason') or 'no reason'}"
    return None


def _num(value: Any) -> str:
    return _fmt(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else "n/a"
