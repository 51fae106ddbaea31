"""RunState: what the dashboard knows about a run, folded from the LabEvent stream."""

from __future__ import annotations

import math
import numbers
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from hfl_lab.events import KINDS, STARTUP, LabEvent

__all__ = ["STARTUP_LABEL", "STEP_PARTS", "AttestationRecord", "RunState", "check_difference"]

#: the parts of one worker step, stacked in the step-time figure (metrics event keys)
STEP_PARTS = ("compute_s", "push_s", "wait_s", "pull_s")
#: per-step series kept for every role that sends metrics events
SERIES_KEYS = ("step", "loss", "accuracy", "lr", *STEP_PARTS, "bytes_sent", "bytes_received")
EVAL_KEYS = ("step", "loss", "accuracy", "num_samples")
#: verdict labels of the attestation matrix
PASS, FAIL, SIMULATED_PASS = "pass", "fail", "simulated-pass"
_KEEP_PROBLEMS = 20
#: the progress label of the lab's own start-up steps (hfl_lab.events.startup_event)
STARTUP_LABEL = STARTUP
#: a participant's start-up stage after a lifecycle state (the trust service has its own words)
_STAGE_OF_STATE = {"starting": "starting", "ready": "ready", "failed": "failed",
                   "exited": "exited", "done": "done"}
#: stages a participant's verdicts still move on (later ones, e.g. checkpoint reports, do not)
_BEFORE_READY = {"starting", "pulling the image", "image key released", "attesting"}
_TRUST_STAGE = {"starting": "starting", "provisioning": "attesting to the owner",
                "ready": "up", "failed": "failed", "exited": "stopped"}


#: hex digits of a measurement a refusal shows (the whole value is in the checks)
_SHORT_HEX = 8


def _short(value: Any) -> str:
    text = " ".join(str(value).split())
    return text if len(text) <= _SHORT_HEX + 2 else text[:_SHORT_HEX] + "…"


def check_difference(checks: Iterable[Mapping[str, Any]]) -> str:
    """The first failed check that compares values, short: ``mr_td: expected f1bccc69…, got
    8d7e4a54…``; "" when no failed check names both (a refusal for another reason)."""
    for check in checks:
        expected, actual = check.get("expected"), check.get("actual")
        if check.get("passed") is True or expected in (None, "") or actual in (None, ""):
            continue
        return f"{check.get('name', '?')}: expected {_short(expected)}, got {_short(actual)}"
    return ""


def number(value: Any) -> float | None:
    """A finite float from an int/float/numpy scalar, else None (bools are not numbers here)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        return None
    result = float(value)
    return result if math.isfinite(result) else None


@dataclass(frozen=True)
class AttestationRecord:
    """One verification: who verified whom, the verdict, why, and every check."""

    verifier: str
    subject: str
    accepted: bool
    simulated: bool
    reason: str
    time: float
    checks: tuple[dict[str, Any], ...] = ()
    measurements: dict[str, str] = field(default_factory=dict)

    @property
    def difference(self) -> str:
        """What differed, short (``mr_td: expected f1bccc69…, got 8d7e4a54…``), or ""."""
        return "" if self.accepted else check_difference(self.checks)

    @property
    def verdict(self) -> str:
        """``pass``, ``simulated-pass`` or ``fail``."""
        if not self.accepted:
            return FAIL
        return SIMULATED_PASS if self.simulated else PASS

    def to_dict(self) -> dict[str, Any]:
        return {
            "verifier": self.verifier,
            "subject": self.subject,
            "verdict": self.verdict,
            "accepted": self.accepted,
            "simulated": self.simulated,
            "reason": self.reason,
            "time": self.time,
            "checks": [dict(c) for c in self.checks],
            "measurements": dict(self.measurements),
        }


class RunState:
    """Series, verdicts and counts of one run; :meth:`apply` says which views an event changed."""

    def __init__(self, *, total_steps: int = 0, step_time_window: int = 20) -> None:
        self.total_steps = total_steps
        self.step_time_window = step_time_window
        self.workers: dict[str, dict[str, list[float | None]]] = {}
        self.evaluation: dict[str, list[float | None]] = {k: [] for k in EVAL_KEYS}
        self.attestations: list[AttestationRecord] = []
        self.matrix: dict[tuple[str, str], AttestationRecord] = {}
        self.lifecycle: dict[str, dict[str, Any]] = {}
        self.audit: list[dict[str, Any]] = []
        self.progress: dict[str, dict[str, Any]] = {}
        self.counts: Counter[str] = Counter()
        self.log_levels: Counter[str] = Counter()
        self.problems: list[str] = []
        #: what each participant is doing while the run starts (role -> stage), in launch order
        self.startup: dict[str, str] = {}
        #: the lab's own start-up step before any participant runs ("preparing the run ...")
        self.startup_note = ""
        self.max_step = 0
        self.events = 0
        self.ignored = 0

    # ------------------------------------------------------------------ folding events

    def apply(self, event: LabEvent) -> set[str]:
        """Fold one event in; returns the views it changed (loss, step_time, attestation, ...)."""
        self.events += 1
        if event.kind not in KINDS or not isinstance(event.data, dict):
            return self._ignore(event, f"unknown kind {event.kind!r} or data not a mapping")
        self.counts[event.kind] += 1
        handler = getattr(self, f"_on_{event.kind}")
        changed: set[str] = handler(event)
        return changed

    def _ignore(self, event: LabEvent, why: str) -> set[str]:
        self.ignored += 1
        self.problems = [*self.problems, f"{event.kind} from {event.source}: {why}"][
            -_KEEP_PROBLEMS:
        ]
        return set()

    def _on_metrics(self, event: LabEvent) -> set[str]:
        data = event.data
        step = number(data.get("step"))
        if step is None:
            return self._ignore(event, "metrics without a numeric 'step'")
        role = str(data.get("role") or event.source)
        series = self.workers.setdefault(role, {k: [] for k in SERIES_KEYS})
        for key in SERIES_KEYS:
            series[key].append(int(step) if key == "step" else number(data.get(key)))
        self.max_step = max(self.max_step, int(step))
        changed = {"loss", "progress"}
        if any(number(data.get(k)) is not None for k in STEP_PARTS):
            changed.add("step_time")
        return changed

    def _on_evaluation(self, event: LabEvent) -> set[str]:
        step = number(event.data.get("step"))
        if step is None:
            return self._ignore(event, "evaluation without a numeric 'step'")
        for key in EVAL_KEYS:
            value = number(event.data.get(key))
            self.evaluation[key].append(int(step) if key == "step" else value)
        return {"loss", "text"}

    def _on_attestation(self, event: LabEvent) -> set[str]:
        data = event.data
        subject = data.get("subject")
        if not subject:
            return self._ignore(event, "attestation without a 'subject'")
        accepted = data.get("accepted") is True
        checks = tuple(dict(c) for c in data.get("checks") or () if isinstance(c, dict))
        reason = str(data.get("reason") or "")
        if not accepted and not reason:
            failed = [c for c in checks if not c.get("passed")]
            reason = "; ".join(f"{c.get('name')}: {c.get('reason', '')}" for c in failed)
        measurements = data.get("measurements")
        record = AttestationRecord(
            verifier=str(data.get("verifier") or event.source),
            subject=str(subject),
            accepted=accepted,
            simulated=data.get("simulated") is True,
            reason=reason or ("accepted" if accepted else "refused (no reason given)"),
            time=event.time,
            checks=checks,
            measurements=(
                {str(k): str(v) for k, v in measurements.items()}
                if isinstance(measurements, dict)
                else {}
            ),
        )
        self.attestations.append(record)
        self.matrix[(record.verifier, record.subject)] = record
        changed = {"attestation", "text"}
        if (record.verifier in ("trust", "key-broker")
                and self.startup.get(record.subject) in _BEFORE_READY):
            if record.verifier == "trust":  # the trust service issues its mesh certificate
                self.startup[record.subject] = "attested" if accepted else "refused"
            elif accepted and self.startup[record.subject] == "pulling the image":
                self.startup[record.subject] = "image key released"
            changed.add("progress")
        return changed

    def _on_lifecycle(self, event: LabEvent) -> set[str]:
        state = str(event.data.get("state", ""))
        detail = str(event.data.get("detail") or "")
        self.lifecycle[event.source] = {
            "state": state,
            "pid": event.data.get("pid"),
            "detail": detail,
            "time": event.time,
        }
        changed = {"text"} if state == "failed" else set()
        if self._startup_stage(event.source, state, detail):
            changed.add("progress")
        return changed

    def _startup_stage(self, role: str, state: str, detail: str) -> bool:
        """Follow a participant through its start-up; False when its stage did not change."""
        if role == "trust":
            stage = _TRUST_STAGE.get(state, state or None)
        elif state == "starting" and "image" in detail:
            stage = "pulling the image"
        elif state == "starting" and not detail and role in self.startup:
            stage = "attesting"  # its workload's own first word: the next thing it does is attest
        else:
            stage = _STAGE_OF_STATE.get(state, state or None)
        if stage is None or self.startup.get(role) == stage:
            return False
        self.startup[role] = stage
        self.startup_note = ""  # the lab's own step is over once a participant moves
        return True

    def _on_audit(self, event: LabEvent) -> set[str]:
        entry = {
            "source": event.source,
            "action": str(event.data.get("action", "")),
            "allowed": event.data.get("allowed") is True,
            "reason": str(event.data.get("reason") or ""),
            "time": event.time,
        }
        self.audit.append(entry)
        return set() if entry["allowed"] else {"text"}

    def _on_log(self, event: LabEvent) -> set[str]:
        self.log_levels[str(event.data.get("level", "info")).lower()] += 1
        return set()

    def _on_progress(self, event: LabEvent) -> set[str]:
        done = number(event.data.get("done"))
        if done is None:
            return self._ignore(event, "progress without a numeric 'done'")
        total = number(event.data.get("total"))
        label = str(event.data.get("label") or "training")
        if label == STARTUP_LABEL:
            self.startup_note = str(event.data.get("stage") or "")
        self.progress[label] = {
            "done": done,
            "total": total,
            "unit": str(event.data.get("unit") or ""),
            "source": event.source,
        }
        if label == "training":
            self.max_step = max(self.max_step, int(done))
            if total:
                self.total_steps = int(total)
        return {"progress"}

    # ------------------------------------------------------------------ derived values

    @property
    def simulated(self) -> bool:
        """Whether any verdict of this run rests on simulated-TD evidence."""
        return any(r.simulated for r in self.attestations)

    @property
    def refused(self) -> list[AttestationRecord]:
        return [r for r in self.attestations if not r.accepted]

    def startup_text(self) -> str:
        """Where the start-up is: ``trust service up · ps0 attested · worker0 attesting``."""
        parts = [f"trust service {self.startup['trust']}"] if "trust" in self.startup else []
        by_stage: dict[str, list[str]] = {}  # participants at the same stage share one part
        for role, stage in self.startup.items():
            if role != "trust":
                by_stage.setdefault(stage, []).append(role)
        for stage, roles in by_stage.items():
            who = ", ".join(roles) if len(roles) <= 3 else f"{len(roles)} participants"
            parts.append(f"{who} {stage}")
        if self.startup_note:
            parts.append(self.startup_note)
        return " · ".join(parts)

    def verifiers(self) -> list[str]:
        return sorted({v for v, _ in self.matrix})

    def subjects(self) -> list[str]:
        return sorted({s for _, s in self.matrix})

    def step_totals(self, role: str, window: int | None = None) -> list[float | None]:
        """A role's step times (the parts summed, seconds) over the last ``window`` steps."""
        series = self.workers[role]
        rows = zip(*(series[k][-window if window else None :] for k in STEP_PARTS), strict=True)
        return [sum(v for v in row if v is not None) if any(v is not None for v in row) else None
                for row in rows]

    def step_time_means(self, window: int | None = None, *,
                        below_s: float | None = None) -> dict[str, dict[str, float]]:
        """Per role, the mean of each step part (and their total) over the last ``window`` steps;
        with ``below_s``, of the steps that took at most that long."""
        out: dict[str, dict[str, float]] = {}
        for role, series in self.workers.items():
            means: dict[str, float] = {}
            totals = self.step_totals(role, window)
            for key in STEP_PARTS:
                values = [v for v, total in zip(series[key][-window if window else None :],
                                                totals, strict=True)
                          if v is not None and (below_s is None or (total or 0) <= below_s)]
                if values:
                    means[key] = sum(values) / len(values)
            if means:
                means["total_s"] = sum(means.values())
                out[role] = means
        return out

    def to_metrics(self) -> dict[str, Any]:
        """Everything metrics.json holds."""
        return {
            "total_steps": self.total_steps,
            "steps_done": self.max_step,
            "simulated": self.simulated,
            "simulated_note": (
                "SIMULATED TD evidence: verdicts prove what runs, not that it runs on TDX hardware"
                if self.simulated
                else ""
            ),
            "workers": {role: dict(series) for role, series in self.workers.items()},
            "evaluation": dict(self.evaluation),
            "step_time_means": self.step_time_means(),
            "step_time_recent": self.step_time_means(self.step_time_window),
            "attestations": [r.to_dict() for r in self.attestations],
            "attestation_matrix": {
                "verifiers": self.verifiers(),
                "subjects": self.subjects(),
                "cells": [r.to_dict() for r in self.matrix.values()],
            },
            "lifecycle": dict(self.lifecycle),
            "audit": list(self.audit),
            "progress": dict(self.progress),
            "counts": {
                "events": self.events,
                "by_kind": dict(self.counts),
                "ignored": self.ignored,
                "attestations": len(self.attestations),
                "attestations_refused": len(self.refused),
                "audit_denied": sum(1 for a in self.audit if not a["allowed"]),
                "log_levels": dict(self.log_levels),
            },
            "problems": list(self.problems),
        }
