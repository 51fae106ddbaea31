"""The trust service's audit log: every decision as one JSON line, never a secret.

It is bounded: each text in a record is cut to ``MAX_TEXT`` characters, memory keeps the newest
``keep`` records, and the file (when there is one) is rotated at ``max_file_bytes`` with
``generations`` older files kept, so no caller can make the log hold more than that.
"""

from __future__ import annotations

import collections
import json
import logging
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from hfl_lab.events import LabEvent

log = logging.getLogger(__name__)

_ALLOWED_TYPES = (str, int, float, bool, type(None))
#: characters of one text field in a record (a verdict's reasons fit; a hostile field does not)
MAX_TEXT = 1024
#: records kept in memory (what ReadAudit serves)
AUDIT_KEEP = 2000
#: bytes of the audit file before it is rotated, and how many rotated files are kept
AUDIT_FILE_BYTES = 16 << 20
AUDIT_GENERATIONS = 3


def _text(value: str) -> str:
    if len(value) <= MAX_TEXT:
        return value
    return f"{value[:MAX_TEXT - 64]}… ({len(value) - MAX_TEXT + 64} more characters)"


def _plain(value: Any, where: str) -> Any:
    """Only plain JSON scalars, lists and dicts go in: bytes (keys, secrets) are refused."""
    if isinstance(value, dict):
        return {_text(str(k)): _plain(v, f"{where}.{k}") for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v, where) for v in value]
    if isinstance(value, str):
        return _text(value)
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
        *,
        keep: int = AUDIT_KEEP,
        max_file_bytes: int = AUDIT_FILE_BYTES,
        generations: int = AUDIT_GENERATIONS,
    ) -> None:
        self.path = path
        self.on_event = on_event
        self.source = source
        self.max_file_bytes = max_file_bytes
        self.generations = generations
        self._entries: collections.deque[dict[str, Any]] = collections.deque(maxlen=keep)
        #: records made since the start (the index the next one gets)
        self.count = 0
        #: records that could not be written to ``path``
        self.write_failures = 0
        self._lock = threading.Lock()

    @property
    def entries(self) -> list[dict[str, Any]]:
        """The newest records still in memory, oldest first."""
        with self._lock:
            return list(self._entries)

    def since(self, index: int) -> list[tuple[int, dict[str, Any]]]:
        """``(index, record)`` from ``index`` on, or from the oldest still in memory."""
        with self._lock:
            first = self.count - len(self._entries)
            start = max(index, first)
            return [(i, self._entries[i - first]) for i in range(start, self.count)]

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
            self._entries.append(entry)
            self.count += 1
            if self.path is not None:
                self._append(json.dumps(entry) + "\n")
        if self.on_event is not None:
            self.on_event(LabEvent("audit", self.source, entry, entry["time"]))
        return dict(entry)

    def _append(self, line: str) -> None:
        assert self.path is not None
        try:
            size = self.path.stat().st_size if self.path.exists() else 0
            if size and size + len(line) > self.max_file_bytes:
                self._rotate()
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with open(self.path, "a") as f:
                f.write(line)
        except OSError as e:  # a full or read-only disk: memory still has the record
            self.write_failures += 1
            if self.write_failures == 1:
                log.warning("audit records are no longer written to %s: %s (the newest stay "
                            "in memory)", self.path, e.strerror or e)

    def _rotate(self) -> None:
        """audit.jsonl → audit.jsonl.1 → … → audit.jsonl.<generations>; the oldest goes."""
        assert self.path is not None
        if self.generations == 0:
            self.path.unlink(missing_ok=True)
        for n in range(self.generations, 0, -1):
            older = self.path.with_name(f"{self.path.name}.{n}")
            newer = self.path if n == 1 else self.path.with_name(f"{self.path.name}.{n - 1}")
            if newer.exists():
                newer.replace(older)
