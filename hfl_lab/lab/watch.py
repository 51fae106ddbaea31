"""Watching a run from its first second: the backend starts on a thread while its events reach
the dashboard on the notebook's thread, as they happen.

A backend's ``start`` and ``wait_ready`` take a while (the trust service comes up and is
provisioned, each participant pulls its image and attests). Their lifecycle and attestation
events are already in the backend's stream, so :class:`RunWatch` reads that stream on a thread
of its own from the start, and the notebook's thread (the only one that touches the dashboard's
widgets, so the kernel's messages keep the running cell as their parent) feeds each event to the
dashboard while the start-up runs: the progress label follows the start-up (trust service up,
ps0 attested, ...) and the verdicts stream into the message pane instead of landing at once.
"""

from __future__ import annotations

import inspect
import queue
import threading
import time
from collections.abc import Iterator
from typing import Any

from hfl_lab._exceptions import BackendError
from hfl_lab.backends import Backend
from hfl_lab.config import LabConfig
from hfl_lab.dashboard import Dashboard
from hfl_lab.events import LabEvent, startup_event

__all__ = ["RunWatch"]

#: how often the notebook's thread looks up from the stream to refresh the view
_TICK_S = 0.2
_END = object()


def _events(backend: Backend, idle_timeout_s: float) -> Iterator[LabEvent]:
    """The backend's events; with an idle timeout where the backend takes one."""
    method: Any = backend.events
    if "idle_timeout_s" in inspect.signature(method).parameters:
        events: Iterator[LabEvent] = method(idle_timeout_s=idle_timeout_s)
        return events
    return backend.events()


class RunWatch:
    """One run's event stream, read on a thread; the caller's thread feeds the dashboard."""

    def __init__(self, backend: Backend, dashboard: Dashboard, config: LabConfig) -> None:
        self.backend = backend
        self.dashboard = dashboard
        self.config = config
        #: ps0's ``done`` data once it came; the participants that failed, with their detail
        self.done: dict[str, Any] | None = None
        self.failed: dict[str, str] = {}
        self._queue: queue.Queue[Any] = queue.Queue()
        self._ended = False
        self._last_progress = (-1, -1)
        self._reader = threading.Thread(target=self._read, daemon=True, name="lab-events")
        self._reader.start()

    def _read(self) -> None:
        try:
            for event in _events(self.backend, self.config.timeout_s):
                self._queue.put(event)
        finally:
            self._queue.put(_END)

    def _put_progress(self, done: int, total: int, label: str) -> None:
        """``wait_ready``'s progress (called on the start-up thread) as an event of the stream."""
        if (done, total) == self._last_progress:
            return
        self._last_progress = (done, total)
        self._queue.put(LabEvent("progress", "lab", {"done": done, "total": total,
                                                     "unit": "participants", "label": label}))
        if not self.dashboard.interactive:
            print(f"{label}: {done}/{total}", flush=True)

    def _next(self, timeout_s: float) -> LabEvent | None:
        """Feed the next event to the dashboard (None: none came within ``timeout_s``)."""
        try:
            item = self._queue.get(timeout=timeout_s)
        except queue.Empty:
            self.dashboard.refresh()  # shows what a throttled refresh held back
            return None
        if item is _END:
            self._ended = True
            return None
        event: LabEvent = item
        self.dashboard.feed(event)
        if event.kind == "lifecycle":
            state = event.data.get("state")
            if state == "done" and event.source == "ps0":
                self.done = dict(event.data)
            elif state == "failed" and event.source != "trust":
                self.failed[event.source] = str(event.data.get("detail") or "no detail")
        return event

    def start(self, ready_timeout_s: float, stage: str = "preparing the run") -> None:
        """``backend.start()`` and ``wait_ready`` on a thread; the events meanwhile go to the
        dashboard. Raises what the start-up raised."""
        self.dashboard.feed(startup_event(stage))
        self.dashboard.refresh(force=True)
        errors: list[BaseException] = []

        def bring_up() -> None:
            try:
                self.backend.start()
                self.backend.wait_ready(ready_timeout_s, progress=self._put_progress)
            except BaseException as error:  # noqa: BLE001 - raised on the caller's thread
                errors.append(error)

        thread = threading.Thread(target=bring_up, daemon=True, name="lab-start")
        thread.start()
        while thread.is_alive():
            self._next(_TICK_S)
        thread.join()
        if errors:
            raise errors[0]

    def until_done(self) -> dict[str, Any]:
        """Feed every event until the training ended; ps0's 'done' data."""
        deadline = time.monotonic() + self.config.timeout_s
        while not self._ended:
            self._next(_TICK_S)
            if self.done is not None and self.backend.name != "local":
                break  # pods stay up after training; the run is over
            if time.monotonic() > deadline:
                raise BackendError(
                    f"the training exceeded timeout_s={self.config.timeout_s:.0f} s.",
                    fix="raise timeout_s or train fewer steps.",
                )
        if self.done is None:
            if self.failed:
                role, detail = next(iter(self.failed.items()))
                first_line = detail.splitlines()[0] if detail else "no detail"
                raise BackendError(
                    f"the training did not finish: {', '.join(self.failed)} failed "
                    f"({first_line})",
                    fix=f"read {self.config.run_dir}/logs/{role}.log; its last lines name the "
                    "cause.",
                )
            raise BackendError(
                "the training ended without ps0 reporting it was done.",
                fix=f"read the participants' logs in {self.config.run_dir}/logs.",
            )
        return self.done
