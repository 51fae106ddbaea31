"""The host's live view of a workshop run (issue 23, notebook 07): the join links to hand out,
then the participants as they join, attest, train and leave, the global model's loss and the
attestation matrix as it grows, until the run ends.

It is the notebook's face of :class:`~hfl_lab.lab.workshop.HostedRun` (``hfl-lab host`` prints
the same as lines): :class:`WorkshopDashboard` is the lab's :class:`~hfl_lab.dashboard.Dashboard`
(loss plot, attestation matrix, progress, the run folder's files) that also feeds the run's
:class:`~hfl_lab.lab.workshop.SlotBoard`, shown as a table with a front end and as one line per
change headless, and :class:`~hfl_lab.lab.watch.RunWatch` reads the events on a thread.
"""

from __future__ import annotations

import html
import json
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

from hfl_lab._exceptions import ConfigError
from hfl_lab.config import LabConfig
from hfl_lab.config.join_link import DEFAULT_TTL_S, JoinLink
from hfl_lab.dashboard import Dashboard, frontend
from hfl_lab.dashboard._files import jsonable, write_json_atomic
from hfl_lab.dashboard.text import matrix_text
from hfl_lab.events import LabEvent
from hfl_lab.lab.notebook import Table, TableReport, show, show_image
from hfl_lab.lab.stand_ins import LocalJoiners
from hfl_lab.lab.training import total_steps
from hfl_lab.lab.watch import RunWatch
from hfl_lab.lab.workshop import HostedRun, SlotBoard

__all__ = ["JoinLinks", "WorkshopDashboard", "WorkshopOutcome", "host_workshop",
           "watch_workshop"]

#: what a finished workshop run leaves in its folder (and what a second run there would resume)
WORKSHOP_RECORD = "workshop.json"
PARTICIPANTS_FILE = "participants.json"
READY_TIMEOUT_S = 300.0


def host_workshop(config: LabConfig, *, address: str, slots: int, quorum: int = 0,
                  link_ttl_s: float = DEFAULT_TTL_S) -> HostedRun:
    """Start the trust service and ps0 on ``address`` and issue one join link per slot
    (``quorum`` 0: every live worker counts). The run folder must be new: ps0 would resume the
    checkpoints of a run that ended there."""
    run_dir = Path(config.run_dir)
    if (run_dir / WORKSHOP_RECORD).exists() or any((run_dir / "checkpoints").glob("*")):
        raise ConfigError(f"{run_dir} already holds a hosted run.",
                          fix="set run_dir to a new folder (e.g. ../runs/workshop-2), or delete "
                          "this one to host again.")
    if quorum < 0:
        raise ConfigError(f"quorum must be 0 (all live workers) or K >= 1, got {quorum}.",
                          fix="pass quorum=0, or the contributions per step you want.")
    run = HostedRun(config, address=address, slots=slots, quorum=quorum or None,
                    link_ttl_s=link_ttl_s)
    try:
        run.start(READY_TIMEOUT_S)
    except BaseException:
        run.stop()
        raise
    return run


@dataclass(repr=False)
class JoinLinks(TableReport):
    """The join links of a hosted run, one per slot: a click selects a whole link (HTML); one
    line per slot as text, to copy from a terminal or a headless notebook."""

    links: Sequence[JoinLink]

    @classmethod
    def of(cls, run: HostedRun) -> JoinLinks:
        """The links ``run`` issued, in slot order."""
        return cls(list(run.links.values()))

    def table(self) -> Table:
        table = Table(("slot", "join link (one per attendee: hfl-lab join '<link>')",
                       "valid until"), title="join links")
        for link in self.links:
            table.add(link.slot, link.encode(), _clock(link.expires_at))
        table.note = ("Each attendee runs `hfl-lab join '<link>'` with their own link. A link "
                      "only limits who may try: attestation decides who trains.")
        return table

    def _repr_html_(self) -> str:
        rows = "".join(
            f"<tr><td style='text-align:left'>{html.escape(link.slot)}</td>"
            f"<td style='text-align:left'><code style='user-select:all;word-break:break-all'>"
            f"{html.escape(link.encode())}</code></td>"
            f"<td style='text-align:left'>{_clock(link.expires_at)}</td></tr>"
            for link in self.links)
        return ("<div><b>join links</b> <small>(a click selects a whole link; each attendee "
                "runs <code>hfl-lab join '&lt;link&gt;'</code>)</small><table><tr>"
                "<th style='text-align:left'>slot</th><th style='text-align:left'>join link</th>"
                f"<th style='text-align:left'>valid until</th></tr>{rows}</table>"
                "<small>A link only limits who may try: attestation decides who trains."
                "</small></div>")


def _clock(epoch: float) -> str:
    return time.strftime("%H:%M:%S", time.localtime(epoch))


class WorkshopDashboard(Dashboard):
    """The lab's dashboard (global loss, attestation matrix, progress, files) plus the
    participants of a hosted run: a table that grows live with a front end, one line per
    change without one; participants.json in the run folder."""

    def __init__(self, run_dir: str | Path, board: SlotBoard, *, total_steps: int,
                 interactive: bool | None = None, stream: TextIO | None = None,
                 **options: Any) -> None:
        self.board = board
        # a hosted run's worker metrics stay on the joiners' machines: no step-time plot
        super().__init__(run_dir, total_steps=total_steps, interactive=interactive,
                         stream=stream, shown=("loss", "attestation"), **options)
        self._table: Any = None
        if self.interactive:
            import ipywidgets as widgets

            self._table = widgets.HTML(value=board.table()._repr_html_())
            frontend.display(self._table)

    def feed(self, event: LabEvent) -> None:
        super().feed(event)
        with self._lock:
            line = self.board.update(event)
            if line is None:
                return
            self._progress.write(f"● {line}")
            if self._table is not None:
                self._table.value = self.board.table()._repr_html_()

    def _status(self) -> str:
        if self.state.max_step == 0 and not any(s.appeared for s in self.board.slots.values()):
            # the services are up and the links out: the room is what the run waits for
            up = self.state.startup.get("ps0") == "ready"
            taken = f"0 of {len(self.board.slots)} slots taken"
            return f"waiting for joiners ({taken})" if up else super()._status()
        return super()._status()

    def save(self) -> None:
        with self._lock:
            super().save()
            write_json_atomic(self.run_dir / PARTICIPANTS_FILE,
                              {"slots": self.board.rows(), "refusals": list(self.board.refusals)})

    def close(self) -> None:
        with self._lock:
            closed = self._closed
            super().close()
            if not closed and not self.interactive:
                print(self.board.table().to_text(), file=self._stream, flush=True)


@dataclass(repr=False)  # shown as its table (TableReport)
class WorkshopOutcome(TableReport):
    """How a hosted run went, seen from the host: steps, the global model's loss, who took
    part, who was refused (and, where they ran here, how the stand-in joiners fared)."""

    run_dir: Path
    total_steps: int
    final_step: int | None
    seconds: float
    #: the global model's test loss at each evaluation: (step, loss)
    global_loss: list[tuple[int, float]] = field(default_factory=list)
    accuracy: float | None = None
    participants: list[dict[str, Any]] = field(default_factory=list)
    refusals: list[str] = field(default_factory=list)
    attestations: int = 0
    refused: int = 0
    simulated: bool = False
    joiners: list[dict[str, Any]] = field(default_factory=list)
    #: the final participants table and attestation matrix (text), for the headless view
    participants_text: str = ""
    matrix: dict[str, Any] = field(default_factory=dict)

    def table(self) -> Table:
        table = Table(("", "value"), title="workshop run: result (the host's view)")
        table.add("steps", f"{self.final_step if self.final_step is not None else '?'} of "
                  f"{self.total_steps}")
        if self.global_loss:
            (s0, first), (s1, last) = self.global_loss[0], self.global_loss[-1]
            table.add("global model test loss", f"{first:.3f} (step {s0}) → {last:.3f} "
                      f"(step {s1})")
        table.add("test accuracy (global model)",
                  "n/a" if self.accuracy is None else f"{self.accuracy:.1%}")
        trained = [p["slot"] for p in self.participants if p["state"] in ("training", "done")]
        table.add("trained", ", ".join(trained) or "nobody")
        refused = [p["slot"] for p in self.participants if p["state"] == "refused"]
        table.add("refused", ", ".join(refused + [r.partition(":")[0] for r in self.refusals])
                  or "nobody")
        table.add("attestations", f"{self.attestations} ({self.refused} refused)")
        for joiner in self.joiners:
            table.add(f"stand-in {joiner['slot']} ({joiner['code']})", joiner["outcome"])
        table.add("wall time", f"{self.seconds:.0f} s")
        table.add("run folder", self.run_dir)
        if self.simulated:
            table.note = ("SIMULATED TDs: a verdict proves the workload of an honest joiner, "
                          "never its hardware.")
        return table

    def to_dict(self) -> dict[str, Any]:
        return {
            "run_dir": str(self.run_dir), "total_steps": self.total_steps,
            "final_step": self.final_step, "seconds": self.seconds,
            "global_loss": [list(p) for p in self.global_loss], "accuracy": self.accuracy,
            "participants": self.participants, "refusals": self.refusals,
            "attestations": self.attestations, "refused": self.refused,
            "simulated": self.simulated, "joiners": self.joiners,
        }

    def save(self) -> Path:
        path = self.run_dir / WORKSHOP_RECORD
        path.write_text(json.dumps(jsonable(self.to_dict()), indent=2) + "\n", encoding="utf-8")
        return path

    def show_matrix(self) -> None:
        """The final attestation matrix and participants, once, at the end: the figure in a
        notebook, and their text form headless."""
        show_image(self.run_dir / "attestation_matrix.png")
        if not frontend.has_front_end():
            show(_Text(self.participants_text + "\n\n" + matrix_text(self.matrix)))


def watch_workshop(run: HostedRun, joiners: LocalJoiners | None = None, *,
                   interactive: bool | None = None) -> WorkshopOutcome:
    """Show the hosted run live until it ends, then stop it (and the stand-in joiners); the
    outcome is also written to the run folder (workshop.json)."""
    config = run.config
    steps = total_steps(config)
    began = time.monotonic()
    dashboard = WorkshopDashboard(config.run_dir, run.board, total_steps=steps,
                                  interactive=interactive)
    try:
        watch = RunWatch(run.backend, dashboard, config)
        done = watch.until_done()
        if joiners is not None:  # as on the attendees' laptops: each ends on its own
            joiners.wait_ended()
    finally:
        dashboard.close()
        if joiners is not None:
            joiners.stop()
        run.stop()
    state = dashboard.state
    evaluation = state.evaluation
    global_loss = [(int(s), float(v)) for s, v in zip(evaluation["step"], evaluation["loss"],
                                                       strict=True)
                   if s is not None and v is not None]
    accuracy = (done.get("evaluation") or {}).get("accuracy")
    metrics = state.to_metrics()
    outcome = WorkshopOutcome(
        Path(config.run_dir).resolve(), steps, done.get("version"), time.monotonic() - began,
        global_loss, float(accuracy) if isinstance(accuracy, int | float) else None,
        run.board.rows(), list(run.board.refusals), len(state.attestations),
        len(state.refused), state.simulated,
        joiners.summary() if joiners is not None else [],
        run.board.table().to_text(), metrics["attestation_matrix"],
    )
    outcome.save()
    return outcome


class _Text:
    def __init__(self, text: str) -> None:
        self.text = text

    def __repr__(self) -> str:
        return self.text
