"""Hosting a cross-silo run (issue 23): the trust service and ps0 on a reachable address, one
join link per worker slot, and the participants as they join, attest, train and leave.

``hfl-lab host`` and a workshop notebook call :class:`HostedRun`. It reuses the local backend
(:class:`~hfl_lab.backends.local.LocalBackend` with ``remote_workers``): the same launch, policy
and vault code, but the worker slots are measured into the policy and left for joiners. The
quorum rule is the host's: ``quorum`` (``sync_quorum``, K; default all slots) contributions per
step from the workers live now (``quorum_rule: live``): a worker that joins late counts from its
registration, and one that leaves stops holding the step once its session lease lapses, so it
never stalls the run.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from hfl_lab._exceptions import ConfigError
from hfl_lab.backends.base import ProgressCallback
from hfl_lab.backends.local import LocalBackend
from hfl_lab.config import LabConfig
from hfl_lab.config.join_link import DEFAULT_TTL_S, JoinLink, enrollment_key
from hfl_lab.dashboard.state import check_difference
from hfl_lab.events import LabEvent
from hfl_lab.lab.notebook import Table

__all__ = ["SLOT_STATES", "HostedRun", "SlotBoard", "SlotState"]


#: the states a slot goes through, in the order a room sees them
SLOT_STATES = ("waiting", "attested", "refused", "joined", "training", "left", "done")
#: row colours of the participants table (HTML form)
_STATE_COLORS = {"refused": "#ffebe9", "training": "#dafbe1", "done": "#dafbe1",
                 "left": "#eaeef2", "attested": "#fff8c5", "joined": "#fff8c5"}


@dataclass
class SlotState:
    """What the host knows of one worker slot: its state and the last thing that happened."""

    slot: str
    state: str = "waiting"  # one of SLOT_STATES
    step: int | None = None
    detail: str = ""
    #: whether a participant ever showed up in this slot (the table lists only those)
    appeared: bool = False
    #: the trust service's latest verdict on this slot's evidence: "", "pass" or "FAIL"
    verdict: str = ""


def _refusal(data: dict[str, Any]) -> str:
    """A refusal, short: the differing measurement, expected vs got, else the reason."""
    checks = [c for c in data.get("checks") or () if isinstance(c, dict)]
    return check_difference(checks) or str(data.get("reason", "")) or "refused"


@dataclass
class SlotBoard:
    """The participants of a hosted run, updated from the backend's events."""

    slots: dict[str, SlotState] = field(default_factory=dict)
    #: refusals of subjects that are no slot of this run (a wrong role, modified code)
    refusals: list[str] = field(default_factory=list)

    @classmethod
    def for_slots(cls, count: int) -> SlotBoard:
        return cls({f"worker{i}": SlotState(f"worker{i}") for i in range(count)})

    def update(self, event: LabEvent) -> str | None:
        """Apply one event; return the line to show when a participant changed state."""
        data = event.data
        if event.kind == "attestation" and event.source == "trust":
            subject, accepted = str(data.get("subject", "")), bool(data.get("accepted"))
            slot = self.slots.get(subject)
            if slot is None:
                if accepted:
                    return None  # ps0, or the owner's own checks
                refusal = f"{subject or '(unknown)'}: {_refusal(data)}"
                self.refusals.append(refusal)
                return f"refused {refusal}"
            slot.appeared = True
            slot.verdict = "pass" if accepted else "FAIL"
            if accepted and slot.state in ("waiting", "left", "refused", "done"):
                return self._set(slot, "attested", "evidence accepted")
            if not accepted:
                return self._set(slot, "refused", _refusal(data))
            return None
        if event.kind == "log" and event.source == "host":
            return str(data.get("message", ""))  # a crashed trust service or ps0 brought back
        if event.kind == "log" and event.source == "ps0":
            peer = str(data.get("peer", ""))
            message = str(data.get("message", ""))
            slot = self.slots.get(peer)
            if slot is not None and "registered" in message:
                slot.appeared = True
                return self._set(slot, "joined", message)
            if slot is not None and " left at step " in message:
                return self._set(slot, "left", message.split(" ", 1)[1])
            if message.startswith("quorum K="):
                return message  # who counts changed: a worker joined or its lease lapsed
            return None
        if event.kind == "progress" and event.source == "ps0":
            return self._contributed(data.get("contributors"), int(data.get("done", 0) or 0))
        if event.kind == "lifecycle" and event.source == "ps0" and data.get("state") == "done":
            ended = [s for s in self.slots.values() if s.state == "training"]
            for slot in ended:
                self._set(slot, "done", f"trained until step {slot.step}")
            return (f"the run is done: {', '.join(s.slot for s in ended)} trained until the end"
                    if ended else None)
        if event.kind == "metrics":
            role = str(data.get("role", event.source))
            slot = self.slots.get(role)
            if slot is None:
                return None
            slot.step = int(data.get("step", 0))
            if slot.state != "training":
                slot.appeared = True
                return self._set(slot, "training", f"step {slot.step}")
        return None

    def _contributed(self, contributors: object, step: int) -> str | None:
        """ps0's step and who contributed to it: those slots are training."""
        if not isinstance(contributors, list):
            return None
        lines = []
        for name in contributors:
            slot = self.slots.get(str(name))
            if slot is None:
                continue
            slot.step, slot.appeared = step, True
            if slot.state != "training":
                lines.append(self._set(slot, "training", f"first update in step {step}"))
        return "; ".join(lines) or None

    def _set(self, slot: SlotState, state: str, detail: str) -> str:
        slot.state, slot.detail = state, detail
        return f"{slot.slot}: {state} ({detail})"

    def rows(self) -> list[dict[str, Any]]:
        return [{"slot": s.slot, "state": s.state, "step": s.step, "detail": s.detail}
                for s in self.slots.values()]

    def table(self) -> Table:
        """A row per participant that appeared (and per refused stranger), as a room reads it."""
        appeared = [s for s in self.slots.values() if s.appeared]
        table = Table(("participant", "state", "step", "attestation", "detail"),
                      title=f"participants: {len(appeared)} of {len(self.slots)} slots taken")
        for s in appeared:
            table.add(s.slot, s.state, "" if s.step is None else s.step, s.verdict, s.detail,
                      color=_STATE_COLORS.get(s.state, ""))
        for refusal in self.refusals:
            subject, _, detail = refusal.partition(": ")
            table.add(subject, "refused", "", "FAIL", detail, color=_STATE_COLORS["refused"])
        if not appeared and not self.refusals:
            table.note = "nobody has joined yet: hand out the join links"
        return table


class HostedRun:
    """The trust service and ps0 of one run on ``address``, waiting for ``slots`` joiners."""

    def __init__(self, config: LabConfig, *, address: str, slots: int,
                 quorum: int | None = None, min_workers: int = 1,
                 link_ttl_s: float = DEFAULT_TTL_S) -> None:
        """``quorum``: K contributions per step from the workers live now (default: all of
        them); ``min_workers``: no step completes while fewer are live (the run waits for its
        attendees, and holds when too many left)."""
        if slots < 1:
            raise ConfigError(f"a hosted run needs at least one worker slot, got {slots}.",
                              fix="pass --slots N with N >= 1 (one per attendee).")
        if config.aggregation == "async" and quorum is not None:
            raise ConfigError(
                "the quorum is a rule of sync and fedavg aggregation; this run aggregates "
                "'async' (every update applies on its own).",
                fix="leave the quorum out, or host with -p aggregation=sync.")
        # joiners run the checkout they have; pulling the run's workload image from the
        # host's registry over the network is a later step
        changes: dict[str, Any] = {"workers": slots, "quorum_rule": "live",
                                   "workload_image": "off"}
        if quorum is not None:
            changes["sync_quorum"] = quorum
        if min_workers != 1:
            changes["min_live_workers"] = min_workers
        self.config = config.replace(**changes)
        self.link_ttl_s = link_ttl_s
        self.backend = LocalBackend(self.config, listen_host=address, remote_workers=True)
        self.board = SlotBoard.for_slots(slots)
        self.links: dict[str, JoinLink] = {}
        #: the host's enrollment key: memory only, a restarted host issues new links (a
        #: restarted trust service or ps0 keeps them: the backend brings them back, and the
        #: trust service's enrollment is reopened with this key)
        self._key = enrollment_key()
        self.backend.on_restarted = self._reopen_enrollment

    def __repr__(self) -> str:
        return f"HostedRun({self.backend.trust_address or '(not started)'}, <key in memory>)"

    def __enter__(self) -> HostedRun:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self, timeout_s: float = 300.0,
              progress: ProgressCallback | None = None) -> list[JoinLink]:
        """Start the trust service and ps0, wait until both serve, issue one link per slot."""
        self.backend.start()
        self.backend.wait_ready(timeout_s, progress)
        with self.backend.trust_client() as trust:
            trust.open_enrollment(self._key, self.backend.admin_token)
        for slot in self.board.slots:
            self.links[slot] = self.issue_link(slot)
        return list(self.links.values())

    def _reopen_enrollment(self, role: str) -> str | None:
        """After a trust service restart: honour this run's links again."""
        if role != "trust":
            return "joiners reconnect to it"
        with self.backend.trust_client() as trust:
            trust.open_enrollment(self._key, self.backend.admin_token)
        return "enrollment open again: the join links still work"

    def issue_link(self, slot: str, *, now: float | None = None) -> JoinLink:
        """A fresh join link for ``slot`` (e.g. after the first one expired)."""
        if slot not in self.board.slots:
            raise ConfigError(f"this run has no slot {slot!r}.",
                              fix=f"use one of {', '.join(self.board.slots)}.")
        policy = self.backend.policy_path.read_bytes()
        trust = self.backend.measurements["trust"]
        platform = self.backend.platform
        assert platform is not None  # prepared by start()
        return JoinLink.issue(
            self._key, trust_address=self.backend.trust_address,
            ps_address=self.backend.ps_address,
            trust_measurements={"mr_td": trust.mr_td.hex(),
                                "mr_config_id": trust.mr_config_id.hex()},
            policy_sha256=hashlib.sha256(policy).hexdigest(), slot=slot,
            lab_root_sha256=hashlib.sha256(platform.root_der).hexdigest(),
            ttl_s=self.link_ttl_s, now=now)

    def check_enrollment(self, text: str, *, now: float | None = None) -> JoinLink:
        """The host's check of a link a joiner presents: issued here, unedited, not expired."""
        link = JoinLink.parse(text, now=now if now is not None else time.time())
        link.check_enrollment(self._key, now=now)
        return link

    def events(self, idle_timeout_s: float | None = None) -> Iterator[tuple[LabEvent, str | None]]:
        """The backend's events, each with the participant line it produced (or None)."""
        for event in self.backend.events(idle_timeout_s=idle_timeout_s):
            yield event, self.board.update(event)

    def stop(self) -> None:
        self.backend.teardown()
