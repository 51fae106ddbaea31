"""The interface every backend offers the notebooks: check, start, wait, watch, retrieve, stop."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, runtime_checkable

from hfl_lab._exceptions import HflLabError
from hfl_lab.events import LabEvent

#: called while waiting: (done, total, label), e.g. (3, 5, "pods ready")
ProgressCallback = Callable[[int, int, str], None]

#: how either backend names a trust service that failed the owner's check
OWNER_REFUSED = ("the trust service did not pass the owner's check, so nothing was sent to it "
                 "(the owner's credential stays with the owner)")


def refused_by_owner(error: HflLabError) -> HflLabError:
    """``error`` (a trust service that failed the owner's check) named as the owner's refusal,
    the same way on every backend: the same exception, its type and, for an
    ``AttestationError``, its check and the values compared kept; its message prefixed."""
    if not error.message.startswith(OWNER_REFUSED):
        error.message = f"{OWNER_REFUSED}: {error.message}"
    return error


@dataclass(frozen=True)
class PreflightCheck:
    """One precondition of a backend: whether it holds, what was seen, and how to fix it."""

    name: str
    ok: bool
    detail: str
    fix: str = ""

    def __str__(self) -> str:
        mark = "ok " if self.ok else "FAIL"
        text = f"[{mark}] {self.name}: {self.detail}"
        if not self.ok and self.fix:
            text += f" Fix: {self.fix}"
        return text


@runtime_checkable
class Backend(Protocol):
    """Where participants (trust service, ps0, workers) run; the notebooks drive only this."""

    @property
    def name(self) -> str:
        """``"local"`` or ``"kubernetes"``."""
        ...

    def preflight(self) -> list[PreflightCheck]:
        """Every precondition, checked; nothing is started or changed."""
        ...

    def start(self) -> None:
        """Start the trust service, ps0 and the workers (returns once they are launched)."""
        ...

    def wait_ready(self, timeout_s: float, progress: ProgressCallback | None = None) -> None:
        """Block until every participant is ready; ``BackendError`` on failure or timeout."""
        ...

    def events(self) -> Iterator[LabEvent]:
        """The run's events (lifecycle, logs, and what participants emit) until teardown."""
        ...

    def fetch_vault(self, dest: Path) -> Path:
        """Copy the sealed model volume out of ps0 to ``dest`` (a file path); returns it."""
        ...

    def teardown(self) -> None:
        """Stop and remove every participant; safe to call twice."""
        ...
