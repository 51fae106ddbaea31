"""The outcome of verifying evidence: every check with expected and actual values and a reason."""

from __future__ import annotations

import html
import json
from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass(frozen=True)
class Check:
    """One comparison the verifier made."""

    name: str
    passed: bool
    expected: str = ""
    actual: str = ""
    reason: str = ""


@dataclass
class Verdict:
    """Pass/fail of one piece of evidence, with every check that decided it."""

    checks: list[Check] = field(default_factory=list)
    evidence_kind: str = "tdx-quote"
    simulated: bool = False
    tcb_status: str | None = None
    advisory_ids: list[str] = field(default_factory=list)
    measurements: dict[str, str] = field(default_factory=dict)
    subject: str = ""
    verifier: str = ""
    verified_at: float = 0.0
    quote_digest: str = ""

    @property
    def accepted(self) -> bool:
        return bool(self.checks) and all(c.passed for c in self.checks)

    @property
    def failures(self) -> list[Check]:
        return [c for c in self.checks if not c.passed]

    @property
    def reason(self) -> str:
        """One line: why it was refused (every failed check), or that it was accepted."""
        if self.accepted:
            sim = " (SIMULATED TD: not a hardware guarantee)" if self.simulated else ""
            return "accepted" + sim
        return "; ".join(f"{c.name}: {c.reason}" for c in self.failures)

    def check(self, name: str) -> Check:
        for c in self.checks:
            if c.name == name:
                return c
        raise KeyError(name)

    def add(
        self, name: str, passed: bool, expected: object = "", actual: object = "", reason: str = ""
    ) -> None:
        self.checks.append(Check(name, passed, str(expected), str(actual), reason))

    # -- rendering ------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        return {
            "accepted": self.accepted,
            "reason": self.reason,
            "evidence_kind": self.evidence_kind,
            "simulated": self.simulated,
            "tcb_status": self.tcb_status,
            "advisory_ids": self.advisory_ids,
            "subject": self.subject,
            "verifier": self.verifier,
            "verified_at": self.verified_at,
            "quote_digest": self.quote_digest,
            "measurements": self.measurements,
            "checks": [asdict(c) for c in self.checks],
        }

    def to_json(self, indent: int | None = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent)

    def to_table(self, width: int = 40) -> str:
        """A plain-text table for terminals and headless notebook runs."""

        def cut(s: str) -> str:
            return s if len(s) <= width else s[: width - 1] + "…"

        head = "ACCEPTED" if self.accepted else "REJECTED"
        if self.simulated:
            head += "  [SIMULATED TD: evidence from the lab's own chain, not hardware]"
        rows = [("check", "ok", "expected", "actual", "reason")]
        rows += [
            (c.name, "✓" if c.passed else "✗", cut(c.expected), cut(c.actual), c.reason)
            for c in self.checks
        ]
        widths = [max(len(r[i]) for r in rows) for i in range(4)]
        lines = [f"{head}  ({self.evidence_kind}, TCB {self.tcb_status or 'unknown'})"]
        for r in rows:
            lines.append("  ".join(r[i].ljust(widths[i]) for i in range(4)) + "  " + r[4])
        return "\n".join(lines)

    def _repr_html_(self) -> str:
        color = "#1a7f37" if self.accepted else "#cf222e"
        title = "ACCEPTED" if self.accepted else "REJECTED"
        sim = (
            "<span style='background:#fff3cd;padding:2px 6px'>SIMULATED TD — not a hardware "
            "guarantee</span>"
            if self.simulated
            else ""
        )
        rows = "".join(
            f"<tr><td>{html.escape(c.name)}</td><td>{mark_html(c.passed)}</td>"
            f"<td>{value_html(c.expected)}</td><td>{value_html(c.actual)}</td>"
            f"<td>{html.escape(c.reason)}</td></tr>"
            for c in self.checks
        )
        tcb = self.tcb_status or ("none: simulated" if self.simulated else "not evaluated")
        return (
            f"<div><b style='color:{color}'>{title}</b> {html.escape(self.subject)} "
            f"(TCB {html.escape(tcb)}) {sim}"
            "<table><tr><th>check</th><th></th><th>expected</th><th>actual</th><th>reason</th>"
            f"</tr>{rows}</table></div>"
        )


def mark_html(passed: bool) -> str:
    """A check's pass/fail mark as coloured text (✓/✗ are in every text font; the emoji marks
    were empty boxes in a browser without an emoji font)."""
    if passed:
        return "<b style='color:#1a7f37;white-space:nowrap' title='passed'>✓ pass</b>"
    return "<b style='color:#cf222e;white-space:nowrap' title='failed'>✗ FAIL</b>"


def value_html(value: object, width: int = 24) -> str:
    """A value cut to ``width`` characters with an ellipsis, the whole of it on hover."""
    text = str(value)
    shown = text if len(text) <= width else text[: width - 1] + "…"
    return f"<code title='{html.escape(text, quote=True)}'>{html.escape(shown)}</code>"
