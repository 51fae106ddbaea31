"""A live attestation matrix without training curves: what notebook 06 watches while it attacks.

It folds LabEvents into the dashboard's :class:`RunState` and draws the dashboard's own
attestation figure, so a refusal looks the same here as during training. With a front end the
matrix is the interactive widget (checks on hover, a pair picker); headless it is the figure,
updated in place, and one text line per verdict. It writes attestation_matrix.png,
metrics.json and events.jsonl into its folder.
"""

from __future__ import annotations

import dataclasses
import threading
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from hfl_lab._resources import ClosingContext
from hfl_lab.dashboard import frontend
from hfl_lab.dashboard._files import event_line, write_json_atomic
from hfl_lab.dashboard.figures import AttestationFigure, save_png
from hfl_lab.dashboard.state import RunState
from hfl_lab.dashboard.text import attestation_line, event_text, matrix_text
from hfl_lab.events import LabEvent
from hfl_lab.lab.notebook import show, show_image

__all__ = ["AttestationBoard"]


class AttestationBoard(ClosingContext):
    """Live attestation matrix of a set of verifications, also written to ``folder``."""

    def __init__(self, folder: str | Path, *, interactive: bool | None = None) -> None:
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.state = RunState()
        self.figure = AttestationFigure()
        self.interactive = frontend.has_front_end() if interactive is None else interactive
        self._lock = threading.RLock()
        self._events = open(self.folder / "events.jsonl", "w", encoding="utf-8")  # noqa: SIM115
        self._widget: frontend.AttestationWidget | None = None
        self._view: frontend.FigureView | None = None
        self.lines: list[str] = []
        self._closed = False
        if self.interactive:
            self._widget = frontend.AttestationWidget()
        if not self.interactive and frontend.in_ipython_kernel():
            # headless, the figure is the live matrix; with a front end the widget is, and
            # the figure once more would show every verdict twice
            self._view = frontend.FigureView(self.figure.figure, self.figure.filename)
        self._redraw()

    def feed(self, event: LabEvent) -> None:
        """Record one event; redraw when it was a verdict; print refusals and denials."""
        with self._lock:
            if self._closed:
                return
            self._events.write(event_line(event) + "\n")
            before = len(self.state.attestations)
            changed = self.state.apply(event)
            record = self.state.attestations[-1] if len(self.state.attestations) > before else None
            line = attestation_line(record) if record is not None else None
            if line is None and "text" in changed:
                line = event_text(event.kind, event.source, event.data)
            if line:
                self.lines.append(line)
                if not self.interactive:
                    print(line, flush=True)
            if "attestation" in changed:
                self._redraw()

    def _redraw(self) -> None:
        self.figure.draw(self.state)
        if self._widget is not None:
            self._widget.update(self.state)
        if self._view is not None:
            self._view.update()

    def metrics(self) -> dict[str, Any]:
        return {"run_dir": str(self.folder), "finished": self._closed, **self.state.to_metrics()}

    def save(self) -> None:
        with self._lock:
            save_png(self.figure.figure, self.folder / self.figure.filename)
            write_json_atomic(self.folder / "metrics.json", self.metrics())
            if not self._events.closed:
                self._events.flush()

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._redraw()
            self.save()
            self._events.close()

    def show_matrix(self, labels: Mapping[str, str] | None = None) -> None:
        """Show the final matrix here, at the end, once: the figure in a notebook (the live one
        is far above by then), its text form headless.

        ``labels`` names subjects by what they were (``AttackReport.subject_labels()``: an
        attacker that posed as worker0 is its attack, so the real workers do not look failed);
        attestation_matrix.png is redrawn with them.
        """
        with self._lock:
            state = relabelled(self.state, labels or {})
            self.figure.draw(state)
            save_png(self.figure.figure, self.folder / self.figure.filename)
        show_image(self.folder / self.figure.filename)
        if not self.interactive:
            show(_Text(matrix_text(state.to_metrics()["attestation_matrix"])))


def relabelled(state: RunState, labels: Mapping[str, str]) -> RunState:
    """A copy of ``state``'s verdicts with each subject in ``labels`` renamed."""
    out = RunState(total_steps=state.total_steps)
    for record in state.attestations:
        subject = labels.get(record.subject, record.subject)
        out.attestations.append(dataclasses.replace(record, subject=subject))
    for (verifier, subject), record in state.matrix.items():
        name = labels.get(subject, subject)
        out.matrix[(verifier, name)] = dataclasses.replace(record, subject=name)
    return out


class _Text:
    def __init__(self, text: str) -> None:
        self.text = text

    def __repr__(self) -> str:
        return self.text
