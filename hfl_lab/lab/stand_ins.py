"""Joiners on this machine that stand in for attendees: a headless workshop run (papermill, a
rehearsal, a test) has nobody in the room, so notebook 07 joins its own links from here.

Each stand-in is what ``hfl-lab join <link>`` starts on a laptop (:func:`join_run`: verify the
host against the link, enroll, one worker TD), with its own folder under the run's
``joiners/``. With ``modified`` the last one runs a copy of the workload whose worker code has
one comment line added, as an attendee who edited it would: its TD measures a different MR_TD,
and the host's trust service refuses it at attestation, the measurement named on both sides.
"""

from __future__ import annotations

import shutil
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hfl_lab._exceptions import ConfigError
from hfl_lab._resources import ClosingContext
from hfl_lab.backends.local.joiner import WORKLOAD_ROOT, JoinedWorker
from hfl_lab.dashboard import frontend
from hfl_lab.events import LabEvent
from hfl_lab.lab.joining import join_run
from hfl_lab.lab.notebook import Table, TableReport
from hfl_lab.lab.workshop import HostedRun
from hfl_lab.tee.sim.measure import source_files

__all__ = ["EDITED_FILE", "LocalJoiners", "StandIn", "edited_workload"]

#: the file an attendee edits in the stand-in with modified code, and the line added to it
EDITED_FILE = "trainer/worker.py"
EDIT = "# an attendee's edit: one comment line, and the worker's MR_TD is another\n"
#: stand-ins a headless run starts when the notebook leaves the count to the lab
HEADLESS_JOINERS = 2
#: the notebook's ``local_joiners: int = -1``: HEADLESS_JOINERS headless, none with a front end
AUTO = -1
#: seconds the stand-ins get, once the run ended, to read the final model and exit by themselves
ENDING_S = 30.0


def edited_workload(dest: Path, root: Path = WORKLOAD_ROOT) -> Path:
    """A copy of the workload's measured sources under ``dest`` with one comment line added
    to the worker's code."""
    for file in source_files(root):
        target = dest / file.relative_to(root)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(file, target)
    with (dest / EDITED_FILE).open("a", encoding="utf-8") as f:
        f.write(EDIT)
    return dest


@dataclass
class StandIn:
    """One stand-in joiner: its worker, and what its own screen would have shown."""

    slot: str
    modified: bool
    worker: JoinedWorker
    losses: list[float] = field(default_factory=list)
    last_step: int | None = None
    #: the worker's own last word: its failure (a refusal names the check), or how it ended
    detail: str = ""
    _reader: threading.Thread | None = field(default=None, repr=False)

    def read(self) -> None:
        """Drain the worker's events (on a thread) into what its screen would show."""
        for event in self.worker.events():
            self._record(event)

    def _record(self, event: LabEvent) -> None:
        data = event.data
        if event.kind == "metrics" and isinstance(data.get("loss"), int | float):
            self.losses.append(float(data["loss"]))
            self.last_step = int(data.get("step", 0))
        elif event.kind == "lifecycle" and data.get("state") in ("failed", "exited"):
            self.detail = str(data.get("detail") or data.get("state"))

    def summary(self) -> dict[str, Any]:
        code = "edited worker code" if self.modified else "genuine code"
        if self.losses:
            outcome = (f"trained {len(self.losses)} steps (last step {self.last_step}), batch "
                       f"loss {self.losses[0]:.3f} → {self.losses[-1]:.3f}")
        elif self.detail:
            outcome = self.detail
        elif self.worker.process.returncode is None:
            outcome = "joining: its worker TD attests to the host"
        else:
            outcome = "did not train"
        if self.losses and self.detail:
            outcome += f"; {self.detail}"
        return {"slot": self.slot, "code": code, "modified": self.modified,
                "steps": len(self.losses), "outcome": outcome,
                "exit_code": self.worker.process.returncode}


class LocalJoiners(ClosingContext, TableReport):
    """Stand-in joiners on this machine (their worker TDs as local processes)."""

    def __init__(self, stand_ins: list[StandIn], scratch: tempfile.TemporaryDirectory[str] | None
                 ) -> None:
        self.stand_ins = stand_ins
        self._scratch = scratch

    @classmethod
    def start(cls, run: HostedRun, count: int = AUTO, *, modified: bool = True,
              folder: str | Path | None = None) -> LocalJoiners:
        """Join ``count`` of the run's slots from here (``AUTO``, -1: two when headless, none
        with a front end, where attendees join); with ``modified`` the last of two or more runs
        edited code."""
        if count == AUTO:
            count = 0 if frontend.has_front_end() else min(HEADLESS_JOINERS, len(run.links))
        if count < 0:
            raise ConfigError(f"local_joiners must be -1 (automatic) or a count >= 0, got "
                              f"{count}.",
                              fix="pass 0 (the attendees join), 2, or -1 (2 when headless).")
        slots = list(run.links)
        if count > len(slots):
            raise ConfigError(
                f"{count} joiners on this machine, but the run has {len(slots)} slots.",
                fix=f"set local_joiners to at most {len(slots)}, or host more slots.")
        base = Path(folder) if folder is not None else Path(run.config.run_dir) / "joiners"
        scratch = None
        stand_ins: list[StandIn] = []
        joiners = cls(stand_ins, None)
        try:
            for i, slot in enumerate(slots[:count]):
                # alone, an edited joiner would leave the run without a worker: it never ends
                edited = modified and count >= 2 and i == count - 1
                root = None
                if edited:
                    scratch = tempfile.TemporaryDirectory(prefix="hfl-lab-edited-")
                    joiners._scratch = scratch
                    root = edited_workload(Path(scratch.name))
                worker = join_run(run.links[slot].encode(), run_dir=base / slot,
                                  data_path=run.config.data_path or None, workload_root=root)
                stand_in = StandIn(slot, edited, worker)
                stand_in._reader = threading.Thread(target=stand_in.read, daemon=True,
                                                    name=f"stand-in-{slot}")
                stand_in._reader.start()
                stand_ins.append(stand_in)
        except BaseException:
            joiners.stop()
            raise
        return joiners

    def wait_ended(self, timeout_s: float = ENDING_S) -> bool:
        """After the run ended: give each worker ``timeout_s`` in all to end by itself (it
        reads the final model, says how it ended and exits, as on an attendee's laptop);
        whether all did. :meth:`stop` ends the rest."""
        deadline = time.monotonic() + timeout_s
        return all(stand_in.worker.wait_ended(max(0.0, deadline - time.monotonic()))
                   for stand_in in self.stand_ins)

    def stop(self) -> None:
        """Leave: each worker stops (SIGTERM, SIGKILL if it must); the edited copy is removed."""
        for stand_in in self.stand_ins:
            stand_in.worker.stop()
            if stand_in._reader is not None:
                stand_in._reader.join(timeout=30)
        if self._scratch is not None:
            self._scratch.cleanup()
            self._scratch = None

    def close(self) -> None:
        self.stop()

    def summary(self) -> list[dict[str, Any]]:
        return [s.summary() for s in self.stand_ins]

    def table(self) -> Table:
        table = Table(("slot", "code", "outcome"),
                      title="joiners on this machine stand in for attendees")
        for row in self.summary():
            table.add(row["slot"], row["code"], row["outcome"])
        if not self.stand_ins:
            table.note = "none: the attendees join with their links"
        else:
            table.note = ("each is what `hfl-lab join <link>` starts on a laptop; the outcome "
                          "fills in as they train")
        return table
