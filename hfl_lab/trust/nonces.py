"""Single-use, short-lived attestation challenges, and how fast one address may ask for them."""

from __future__ import annotations

import collections
import os
import threading
import time
from collections.abc import Callable

from hfl_lab._exceptions import AttestationError, TooManyChallenges

#: open challenges at most: 32-byte nonces and their issue times, a few MB in all
MAX_OPEN_CHALLENGES = 65_536
#: per address: the bucket's size (a lab starting all its participants at once fits) and
#: its refill (renewals and restarts; a flood is refused long before the cap above)
CHALLENGE_BURST = 256
CHALLENGES_PER_S = 64.0
#: addresses whose buckets are remembered (the least recently seen are forgotten first)
_MAX_ADDRESSES = 4096


class NonceStore:
    """Issues 32-byte nonces; each can be consumed once, within ``ttl_s`` of its issue.

    Expiry costs constant work per call: nonces are queued in the order they were issued, so
    each call looks only at the front of the queue, and each nonce is looked at once when it
    expires (``examined`` counts those looks).
    """

    def __init__(
        self, ttl_s: float = 60.0, clock: Callable[[], float] = time.time,
        capacity: int = MAX_OPEN_CHALLENGES,
    ) -> None:
        self.ttl_s = ttl_s
        self.clock = clock
        self.capacity = capacity
        self._issued: dict[bytes, float] = {}
        self._order: collections.deque[tuple[float, bytes]] = collections.deque()
        self._lock = threading.Lock()
        #: queue entries looked at by expiry, since the start
        self.examined = 0

    def issue(self) -> tuple[bytes, float]:
        nonce = os.urandom(32)
        now = self.clock()
        with self._lock:
            self._prune(now)
            if len(self._issued) >= self.capacity:
                raise TooManyChallenges(
                    f"the trust service holds {len(self._issued)} open challenges, its limit; "
                    "no new one is issued until some expire",
                    check="nonce",
                    fix=f"retry in {self.ttl_s:.0f} s; ask for a challenge only right before "
                    "answering it",
                )
            self._issued[nonce] = now
            self._order.append((now, nonce))
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
        # "expired" rather than "unknown". A consumed nonce's queue entry goes when it
        # reaches the front; an entry out of order (a clock set back) waits behind the
        # ones before it, still counted against the capacity, so nothing grows unbounded.
        order = self._order
        while order:
            self.examined += 1
            issued, nonce = order[0]
            if now - issued <= 2 * self.ttl_s:
                return
            order.popleft()
            if self._issued.get(nonce) == issued:
                del self._issued[nonce]

    def __len__(self) -> int:
        return len(self._issued)


class ChallengeRate:
    """A token bucket per caller address: ``burst`` challenges at once, ``per_s`` after that."""

    def __init__(
        self, per_s: float = CHALLENGES_PER_S, burst: int = CHALLENGE_BURST,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.per_s = per_s
        self.burst = burst
        self.clock = clock
        self._buckets: collections.OrderedDict[str, tuple[float, float]] = (
            collections.OrderedDict()
        )
        self._lock = threading.Lock()

    def take(self, address: str) -> None:
        """One challenge for ``address``; ``TooManyChallenges`` when its bucket is empty."""
        now = self.clock()
        with self._lock:
            tokens, then = self._buckets.pop(address, (float(self.burst), now))
            tokens = min(float(self.burst), tokens + (now - then) * self.per_s)
            if tokens < 1.0:
                self._remember(address, tokens, now)
                wait = (1.0 - tokens) / self.per_s if self.per_s > 0 else float("inf")
                raise TooManyChallenges(
                    f"too many challenges asked for from {address}: {self.burst} at once, "
                    f"then {self.per_s:g} per second",
                    check="challenge_rate",
                    fix=f"retry in {min(wait, 3600.0):.1f} s; a participant needs one challenge "
                    "per attestation or key release",
                )
            self._remember(address, tokens - 1.0, now)

    def _remember(self, address: str, tokens: float, now: float) -> None:
        self._buckets[address] = (tokens, now)
        while len(self._buckets) > _MAX_ADDRESSES:
            self._buckets.popitem(last=False)  # a forgotten address starts with a full bucket


def address_of(peer: str) -> str:
    """The host of a gRPC peer string (``ipv4:10.0.0.5:41234`` → ``ipv4:10.0.0.5``): new
    connections from one host share its bucket."""
    host, sep, port = peer.rpartition(":")
    return host if sep and port.isdigit() else peer
