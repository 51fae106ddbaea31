"""Who may call the parameter server: one live session per worker role.

A registered worker's session is its mesh certificate on its connection. The lease rule, in one
place (:meth:`Session.claim`): a certificate attested later takes the role over at once (a
restarted worker re-attests; a renewal), an older one never does, and the same certificate on
another connection (a second process holding the role's credentials) only once the session has
lapsed: it stays live while its connection has a call in flight or made one less than
``lease_s`` seconds ago (longer than one step's compute).
"""

from __future__ import annotations

import contextlib
import hashlib
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

import grpc

from hfl_lab._x509 import peer_certificate
from hfl_lab.trust.mesh import role_of
from trainer.aggregation import Outcome, Status

__all__ = [
    "SESSION_LEASE_S",
    "Caller",
    "Claim",
    "Refusal",
    "Session",
    "SessionTable",
    "WorkerRecord",
    "caller_identity",
    "caller_role",
    "refusal_for",
]

#: seconds a quiet connection keeps its role's session (see the module doc)
SESSION_LEASE_S = 30.0


@dataclass(frozen=True)
class Caller:
    """Who is calling: the role and certificate the interceptor verified, and the connection."""

    role: str
    fingerprint: str  # SHA-256 of the mesh certificate
    attested_at: float  # the certificate's notBefore: when the trust service attested it
    peer: str  # the connection (address and port) the call came on


@dataclass(frozen=True)
class Refusal:
    """Why a call or a registration is refused: the gRPC status and the sentence."""

    code: grpc.StatusCode
    message: str


class Claim(StrEnum):
    """How a caller stands to the session that holds its role (the lease rule's verdict)."""

    HOLDER = "holder"  # the same certificate on the session's own connection
    LAPSED = "lapsed"  # the same certificate on another connection; the session has lapsed
    HELD = "held"  # the same certificate on another connection; the session is live
    NEWER = "newer"  # a certificate attested later than the session's
    OLDER = "older"  # another certificate, attested as recently or earlier


@dataclass
class Session:
    """A registered worker's hold on its role: one certificate on one connection."""

    caller: Caller
    in_flight: int = 0
    last_active: float = field(default_factory=time.monotonic)

    def live(self, lease_s: float) -> bool:
        return self.in_flight > 0 or time.monotonic() - self.last_active < lease_s

    def claim(self, caller: Caller, lease_s: float) -> Claim:
        """The lease rule: how ``caller`` stands to this session."""
        held = self.caller
        if held.fingerprint != caller.fingerprint:
            return Claim.NEWER if caller.attested_at > held.attested_at else Claim.OLDER
        if held.peer == caller.peer:
            return Claim.HOLDER
        return Claim.HELD if self.live(lease_s) else Claim.LAPSED


@dataclass
class WorkerRecord:
    worker_id: str
    index: int
    session: Session
    updates: int = 0
    last_version: int = 0
    last_seen: float = field(default_factory=time.time)
    released: bool = False  # was told that training finished
    left: bool = False  # said it leaves (Leave): no longer counts as live


def caller_identity(context: grpc.ServicerContext) -> Caller:
    """The caller's verified mesh identity (the interceptor has checked it already)."""
    pems: Any = context.auth_context().get("x509_pem_cert") or []
    if not pems:
        context.abort(grpc.StatusCode.UNAUTHENTICATED, "no client certificate on this call")
    pem = bytes(pems[0])
    cert = peer_certificate(pem)
    return Caller(role_of(cert), hashlib.sha256(pem).hexdigest(),
                  cert.not_valid_before_utc.timestamp(), context.peer())


def caller_role(context: grpc.ServicerContext) -> str:
    """The role in the caller's mesh certificate (the interceptor has verified it already)."""
    return caller_identity(context).role


class SessionTable:
    """The registered workers and their sessions, under one lock."""

    def __init__(self, lease_s: float = SESSION_LEASE_S) -> None:
        self.lease_s = lease_s
        self._workers: dict[str, WorkerRecord] = {}
        self._lock = threading.Lock()

    def register(
        self, name: str, index: int, caller: Caller
    ) -> tuple[WorkerRecord | None, Refusal | None]:
        """Give ``caller`` the role ``name`` unless the lease rule forbids it; returns the
        record it replaced (None for a first registration) and the refusal, if any."""
        with self._lock:
            previous = self._workers.get(name)
            refusal = self._register_refusal(previous, caller)
            if refusal is None:
                self._workers[name] = WorkerRecord(name, index, Session(caller))
        return previous, refusal

    def _register_refusal(self, record: WorkerRecord | None, caller: Caller) -> Refusal | None:
        if record is None:
            return None
        who = caller.role
        claim = record.session.claim(caller, self.lease_s)
        if claim is Claim.OLDER:
            return Refusal(grpc.StatusCode.PERMISSION_DENIED,
                           f"{who} is held by a certificate attested as recently or later than "
                           f"this one; refused. Fix: run each role once; a restarted {who} "
                           "re-attests and its new certificate takes over at once")
        if claim is Claim.HELD:
            return Refusal(grpc.StatusCode.ALREADY_EXISTS,
                           f"{who} already has a live session on another connection with this "
                           "same certificate (a second process using its credentials?); "
                           "refused. Fix: run each role once; the session lapses "
                           f"{self.lease_s:.0f} s after its connection's last call")
        return None  # its own connection, a lapsed one, or a fresher attestation of the role

    def _call_refusal(self, record: WorkerRecord | None, caller: Caller) -> Refusal | None:
        who = caller.role
        if record is None:
            return Refusal(grpc.StatusCode.FAILED_PRECONDITION,
                           f"{who} has not registered; call Register first")
        claim = record.session.claim(caller, self.lease_s)
        if claim is Claim.NEWER:
            return Refusal(grpc.StatusCode.FAILED_PRECONDITION,
                           f"{who} has a newer mesh certificate than its session; call "
                           "Register first")
        if claim is Claim.OLDER:
            return Refusal(grpc.StatusCode.PERMISSION_DENIED,
                           f"this {who} session was superseded: another certificate for {who}, "
                           "attested later, holds the role now. Fix: run each role once; this "
                           "process should stop")
        if claim is Claim.HELD:
            return Refusal(grpc.StatusCode.FAILED_PRECONDITION,
                           f"{who}'s session is held by another live connection with this same "
                           "certificate (a second process using its credentials?); call "
                           "Register on this connection once that one is gone")
        return None

    @contextlib.contextmanager
    def call(self, caller: Caller) -> Iterator[Refusal | None]:
        """A call of a registered worker: yields None while it holds its session (the session
        moves to this connection if the holder's went quiet past the lease), or the refusal."""
        with self._lock:
            record = self._workers.get(caller.role)
            refusal = self._call_refusal(record, caller)
            if record is not None and refusal is None:
                session = record.session
                if session.caller.peer != caller.peer:
                    session.caller = caller  # the holder's connection lapsed: it is gone
                session.in_flight += 1
                session.last_active = time.monotonic()
                record.last_seen = time.time()
        if refusal is not None:
            yield refusal
            return
        try:
            yield None
        finally:
            with self._lock:
                session.in_flight -= 1
                session.last_active = time.monotonic()

    def record_update(self, who: str, *, accepted: bool, version: int) -> None:
        with self._lock:
            record = self._workers[who]
            if accepted:
                record.updates += 1
            record.last_version = version

    def index_of(self, who: str) -> int | None:
        """The partition index ``who`` registered with (Register checked it is its role's)."""
        with self._lock:
            record = self._workers.get(who)
            return record.index if record is not None else None

    def release(self, who: str) -> None:
        """Note that ``who`` was told training finished."""
        with self._lock:
            record = self._workers.get(who)
            if record is not None:
                record.released = True

    def wait_all_released(self, timeout_s: float) -> bool:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.all_released():
                return True
            time.sleep(0.1)
        return False

    def all_released(self) -> bool:
        with self._lock:
            return all(r.released for r in self._workers.values())

    def live_count(self) -> int:
        """Registered workers that are still here: not told the run finished, not left, and
        calling (a call in flight, or one within the lease)."""
        with self._lock:
            return sum(1 for r in self._workers.values()
                       if not r.released and not r.left and r.session.live(self.lease_s))

    def leave(self, who: str) -> None:
        """``who`` left the run: it stops counting as live now (a rejoin registers anew)."""
        with self._lock:
            record = self._workers.get(who)
            if record is not None:
                record.left = True

    def records(self) -> list[WorkerRecord]:
        """A snapshot of the registered workers (for the Status RPC)."""
        with self._lock:
            return [
                WorkerRecord(r.worker_id, r.index, r.session, r.updates, r.last_version,
                             r.last_seen, r.released)
                for r in self._workers.values()
            ]


def refusal_for(outcome: Outcome, who: str) -> Refusal | None:
    """The refusal the aggregator's verdict on ``who``'s update calls for, if any."""
    if outcome.status is Status.REJECTED:
        reason = outcome.reason
        if "already contributed" in reason:
            code = grpc.StatusCode.ALREADY_EXISTS
        elif "ahead of" in reason:
            code = grpc.StatusCode.FAILED_PRECONDITION
        elif "closed" in reason:
            code = grpc.StatusCode.OUT_OF_RANGE
        else:
            code = grpc.StatusCode.INVALID_ARGUMENT
        return Refusal(code, f"update from {who} refused: {reason}")
    if outcome.status is Status.STALE_REFUSED:
        return Refusal(grpc.StatusCode.FAILED_PRECONDITION,
                       f"update from {who} refused: {outcome.reason}; pull and recompute")
    return None
