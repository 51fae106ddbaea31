"""Single-use, short-lived attestation challenges."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable

from hfl_lab._exceptions import AttestationError


class NonceStore:
    """Issues 32-byte nonces; each can be consumed once, within ``ttl_s`` of its issue."""

    def __init__(self, ttl_s: float = 60.0, clock: Callable[[], float] = time.time) -> None:
        self.ttl_s = ttl_s
        self.clock = clock
        self._issued: dict[bytes, float] = {}
        self._lock = threading.Lock()

    def issue(self) -> tuple[bytes, float]:
        nonce = os.urandom(32)
        now = self.clock()
        with self._lock:
            self._prune(now)
            self._issued[nonce] = now
        return nonce, now

    def consume(self, nonce: bytes) -> float:
        """The nonce's issue time; raises if it is unknown, already used, or expired."""
        now = self.clock()
        with self._lock:
            issued = self._issued.pop(nonce, None)
            self._prune(now)
        if issued is None:
            raise AttestationError(
                "unknown or already used challenge (a replayed nonce?)",
                check="nonce",
                fix="request a fresh challenge for every attestation",
            )
        if now - issued > self.ttl_s:
            raise AttestationError(
                f"challenge expired {now - issued - self.ttl_s:.1f} s ago",
                check="nonce",
                fix="answer the challenge within its lifetime",
            )
        return issued

    def _prune(self, now: float) -> None:
        # Expired nonces are kept for one extra lifetime so that a late answer gets
        # "expired" rather than "unknown".
        stale = [n for n, t in self._issued.items() if now - t > 2 * self.ttl_s]
        for n in stale:
            del self._issued[n]

    def __len__(self) -> int:
        return len(self._issued)
