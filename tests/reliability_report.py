"""The reliability suite's figures: ``bench/reliability.json``, ids R1–R8 (shared/docs/BENCH.md).

Each test of the suite records its cases here with :func:`record`. When
``HFL_LAB_RELIABILITY_REPORT`` names a file (``make reliability`` sets it to
``bench/reliability.json``), the cases are merged into that file: one record per id whose
``tried``/``held``/``lost`` are the sums over its cases, and whose ``details`` keep the
per-case figures. Without the variable (plain ``make test``) nothing is written, the
records are still returned so that tests can assert on them.
"""

from __future__ import annotations

import datetime as dt
import fcntl
import json
import os
import platform
from pathlib import Path
from typing import Any

REPORT_ENV = "HFL_LAB_RELIABILITY_REPORT"
#: per-case counters that are also summed over the cases at the top of a record's details
SUMMED = (
    "accepted_mutated", "certificates_issued", "checkpoints_verified", "corrupt_checkpoints",
    "crashes", "hangs", "secrets_released", "steps_lost", "tensors_exchanged",
    "certificates_wrongly_issued", "poisoned_commits", "code_executed",
)

WHAT = {
    "R1": "hostile evidence: fuzzed quotes, certificates and evidence",
    "R2": "hostile peers refused",
    "R3": "hostile messages refused, training unaffected",
    "R4": "kill -9 faults recovered",
    "R5": "disk full and read-only run folder",
    "R6": "secrets found in the run folder, logs and notebook outputs",
    "R7": "load: simulated workers against one PS",
    "R8": "attacks by a host or cluster admin, a storage admin, an attested worker and an "
    "unauthenticated client",
}


def record(
    rid: str,
    case: str,
    *,
    tried: int = 1,
    held: int,
    lost: int = 0,
    **details: Any,
) -> dict[str, Any]:
    """Record one case of item ``rid``; returns the case as written (also without a report)."""
    if rid not in WHAT:
        raise ValueError(f"unknown reliability id {rid!r}; valid: {', '.join(WHAT)}")
    entry = {"tried": int(tried), "held": int(held), "lost": int(lost), **details}
    path = os.environ.get(REPORT_ENV)
    if path:
        _merge(Path(path), rid, case, entry)
    return entry


def _merge(path: Path, rid: str, case: str, entry: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_suffix(".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            records = json.loads(path.read_text()) if path.exists() else []
        except ValueError:
            records = []
        by_id = {r["id"]: r for r in records if isinstance(r, dict) and "id" in r}
        rec = by_id.get(rid) or {"id": rid, "what": WHAT[rid], "details": {"cases": {}}}
        cases = rec.setdefault("details", {}).setdefault("cases", {})
        cases[case] = entry
        rec["tried"] = sum(c["tried"] for c in cases.values())
        rec["held"] = sum(c["held"] for c in cases.values())
        rec["lost"] = sum(c["lost"] for c in cases.values())
        # counters the cases report (e.g. R2's tensors_exchanged) are summed at the top too
        for name in SUMMED:
            values = [c[name] for c in cases.values() if isinstance(c.get(name), int | float)]
            if values:
                rec["details"][name] = sum(values)
        rec["machine"] = (
            f"{os.cpu_count()} cores, {platform.machine()}, Python {platform.python_version()}"
        )
        rec["when"] = dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        by_id[rid] = rec
        ordered = [by_id[k] for k in sorted(by_id)]
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(ordered, indent=2) + "\n")
        os.replace(tmp, path)
