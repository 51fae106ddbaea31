"""Dashboard: the live view of a run, fed by LabEvents; widgets with a front end, text without."""

from __future__ import annotations

import math
import sys
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any, TextIO

from hfl_lab._resources import ClosingContext
from hfl_lab.dashboard import frontend
from hfl_lab.dashboard._files import event_line, write_json_atomic
from hfl_lab.dashboard.figures import (
    AttestationFigure,
    DashboardFigure,
    LossFigure,
    StepTimeFigure,
    save_png,
)
from hfl_lab.dashboard.state import RunState
from hfl_lab.dashboard.text import event_text, text_summary
from hfl_lab.events import LabEvent

__all__ = ["Dashboard"]


class Dashboard(ClosingContext):
    """Live loss, step time and attestation matrix of one run, also written to ``run_dir``.

    ``feed`` each event of the backend's stream; the view refreshes at most every
    ``refresh_interval_s`` (figures every ``figure_interval_s``, files every
    ``save_interval_s``); ``close`` draws the final frame and writes every file:
    loss.png, step_time.png, attestation_matrix.png, metrics.json and events.jsonl.

    ``interactive=None`` detects a front end (:func:`frontend.has_front_end`): with one, the
    progress bar and attestation matrix are widgets; without one they are text on ``stream``
    (default stdout). Figures are displayed (and updated in place) whenever an IPython kernel
    runs the code, so papermill notebooks keep the last frame. ``shown`` limits the figures
    displayed (e.g. a hosted run has no worker step times); every PNG is written all the same.
    """

    def __init__(
        self,
        run_dir: str | Path,
        *,
        total_steps: int,
        interactive: bool | None = None,
        refresh_interval_s: float = 0.5,
        figure_interval_s: float = 2.0,
        save_interval_s: float = 10.0,
        step_time_window: int = 20,
        stream: TextIO | None = None,
        clock: Callable[[], float] = time.monotonic,
        shown: Sequence[str] | None = None,
    ) -> None:
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.state = RunState(total_steps=max(0, total_steps), step_time_window=step_time_window)
        self.interactive = frontend.has_front_end() if interactive is None else interactive
        self.refresh_interval_s = refresh_interval_s
        self.figure_interval_s = figure_interval_s
        self.save_interval_s = save_interval_s
        self.frames = 0  # refreshes that were not throttled away
        self._stream = stream if stream is not None else sys.stdout
        self._clock = clock
        self._lock = threading.RLock()
        self._closed = False
        self._last_refresh = -math.inf
        self._last_figures = -math.inf
        self._last_save = clock()
        self.figures: dict[str, DashboardFigure] = {
            "loss": LossFigure(),
            "step_time": StepTimeFigure(),
            "attestation": AttestationFigure(),
        }
        self._dirty = set(self.figures)  # content changed since last drawn
        self._unsaved = set(self.figures)  # drawn since the PNG was last written
        self._events = open(self.run_dir / "events.jsonl", "w", encoding="utf-8")  # noqa: SIM115
        self._progress: frontend.ProgressView
        self._views: dict[str, frontend.FigureView] = {}
        self._matrix_widget: frontend.AttestationWidget | None = None
        self._matrix_dirty = False
        if self.interactive:
            self._progress = frontend.WidgetProgress(self.state.total_steps)
        else:
            self._progress = frontend.TextProgress(self.state.total_steps, self._stream)
        if self.interactive or frontend.in_ipython_kernel():
            names = ["loss", "step_time"] + ([] if self.interactive else ["attestation"])
            for name in (n for n in names if shown is None or n in shown):
                figure = self.figures[name]
                self._views[name] = frontend.FigureView(figure.figure, figure.filename)
                self._draw(name)  # the first frame fixes the figure's place in the output
                self._views[name].update()
        if self.interactive:
            self._matrix_widget = frontend.AttestationWidget()

    # ------------------------------------------------------------------ feeding

    def feed(self, event: LabEvent) -> None:
        """Record one event (events.jsonl), fold it into the state, refresh if due."""
        with self._lock:
            if self._closed:
                raise RuntimeError("this dashboard is closed; create a new one for a new run")
            self._events.write(event_line(event) + "\n")
            before = len(self.state.attestations)
            changed = self.state.apply(event)
            self._dirty |= changed & set(self.figures)
            self._matrix_dirty |= "attestation" in changed
            if "text" in changed:
                record = (
                    self.state.attestations[-1] if len(self.state.attestations) > before else None
                )
                line = event_text(event.kind, event.source, event.data, record)
                if line:
                    self._progress.write(line)
        self.refresh()

    def feed_all(self, events: Iterable[LabEvent]) -> int:
        """Feed every event of ``events`` (e.g. a backend's stream); returns how many."""
        count = 0
        for event in events:
            self.feed(event)
            count += 1
        return count

    # ------------------------------------------------------------------ showing

    def refresh(self, *, force: bool = False) -> bool:
        """Update the view unless one was shown less than ``refresh_interval_s`` ago."""
        with self._lock:
            now = self._clock()
            if self._closed or (not force and now - self._last_refresh < self.refresh_interval_s):
                return False
            self._last_refresh = now
            self.frames += 1
            self._progress.update(self.state.max_step, self.state.total_steps, self._status())
            if self.interactive:
                frontend.mark_cell_busy()  # JupyterLab read "Idle" while training ran
            if self._matrix_widget is not None and self._matrix_dirty:
                self._matrix_widget.update(self.state)
                self._matrix_dirty = False
            if force or now - self._last_figures >= self.figure_interval_s:
                self._last_figures = now
                for name, view in self._views.items():
                    if name in self._dirty:
                        self._draw(name)
                        view.update()
            if force or now - self._last_save >= self.save_interval_s:
                self.save()
            return True

    def save(self) -> None:
        """Write the PNGs that changed, metrics.json, and flush events.jsonl, now."""
        with self._lock:
            self._last_save = self._clock()
            for name in sorted(self._dirty):
                self._draw(name)
            for name in sorted(self._unsaved):
                figure = self.figures[name]
                save_png(figure.figure, self.run_dir / figure.filename)
            self._unsaved.clear()
            write_json_atomic(self.run_dir / "metrics.json", self.metrics())
            if not self._events.closed:
                self._events.flush()

    def metrics(self) -> dict[str, Any]:
        """What metrics.json holds: series, step-time means, verdicts, counts, ``simulated``."""
        return {
            "run_dir": str(self.run_dir),
            "updated_at": time.time(),
            "finished": self._closed,
            **self.state.to_metrics(),
        }

    def summary(self) -> str:
        """The run as text (what a headless run prints at the end)."""
        return text_summary(self.metrics())

    def close(self) -> None:
        """Draw the final frame, write every file, and print the summary when headless."""
        with self._lock:
            if self._closed:
                return
            self.refresh(force=True)
            self._closed = True
            self.save()
            self._events.close()
            failed = any(v.get("state") == "failed" for v in self.state.lifecycle.values())
            self._progress.close(ok=not failed)
            if not self.interactive:
                print(self.summary(), file=self._stream, flush=True)

    # ------------------------------------------------------------------ internals

    def _draw(self, name: str) -> None:
        self.figures[name].draw(self.state)
        self._dirty.discard(name)
        self._unsaved.add(name)

    def _status(self) -> str:
        if not self.state.workers and self.state.max_step == 0:
            # before the first step: where the start-up is, so the first seconds do not look
            # frozen (trust service up · ps0 attested · worker0 attesting …)
            startup = self.state.startup_text()
            return f"start-up: {startup}" if startup else ""
        parts = []
        for series in self.state.workers.values():
            losses = [v for v in series["loss"] if v is not None]
            if losses:
                parts.append(f"loss {losses[-1]:.3f}")
                break
        if self.state.attestations:
            refused = len(self.state.refused)
            parts.append(f"{len(self.state.attestations)} attested, {refused} refused")
        if self.state.simulated:
            parts.append("SIMULATED")
        return " | ".join(parts)
