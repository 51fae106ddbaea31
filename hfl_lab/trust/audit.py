"""The trust service's audit log: every decision as one JSON line, never a secret."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from hfl_lab.events import LabEvent

_ALLOWED_TYPES = (str, int, float, bool, type(None))


def _plain(value: Any, where: str) -> Any:
    """Only plain JSON scalars, lists and dicts go in: bytes (keys, secrets) are refused."""
    if isinstance(value, dict):
        return {str(k): _plain(v, f"{where}.{k}") for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v, where) for v in value]
    if isinstance(value, _ALLOWED_TYPES):
        return value
    raise TypeError(f"audit field {where} has type {type(value).__name__}; only summaries go in")


class AuditLog:
    """Appends decisions to ``path`` (JSON lines) and hands each one to ``on_event``."""

    def __init__(
        self,
        path: Path | None = None,
        on_event: Callable[[LabEvent], None] | None = None,
        source: str = "trust",
    ) -> None:
        self.path = path
        self.on_event = on_event
        self.source = source
        self.entries: list[dict[str, Any]] = []
        self._lock = threading.Lock()

    def record(
        self,
        action: str,
        *,
        subject: str,
        allowed: bool,
        reason: str = "",
        evidence: dict[str, Any] | None = None,
        **details: Any,
    ) -> dict[str, Any]:
        entry = _plain(
            {
                "time": time.time(),
                "action": action,
                "subject": subject,
                "allowed": allowed,
                "reason": reason,
                "evidence": evidence or {},
                **details,
            },
            "entry",
        )
        with self._lock:
            self.entries.append(entry)
            if self.path is not None:
                with open(self.path, "a") as f:
                    f.write(json.dumps(entry) + "\n")
        if self.on_event is not None:
            self.on_event(LabEvent("audit", self.source, entry, entry["time"]))
        return dict(entry)
