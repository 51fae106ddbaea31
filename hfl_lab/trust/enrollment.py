"""The trust service's enrollment desk: what a joiner with a valid join link receives.

A hosted run (``hfl-lab host``) opens enrollment with its key (``OpenEnrollment``, owner only).
A joiner that verified this service against its link then presents the link (``Enroll``) and
receives what it needs to start its worker TD: the run's config document and the owner-signed
policy, byte for byte (both public; the worker's MR_CONFIG_ID measures the document, and it
takes the policy only with the owner's signature), and in a simulated run the lab platform's
keys (the bootstrap a local participant receives on its stdin).

The link limits who may try, nothing more: the worker is still attested, against the policy,
before it gets a mesh certificate. With simulated TDs the platform keys let the holder of a
link sign any simulated evidence; a simulated run proves the workload of an honest joiner, never
the hardware, and says so everywhere (see DESIGN.md, "Two backends").
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass

from hfl_lab._exceptions import ConfigError, PolicyViolation
from hfl_lab.config.join_link import JoinLink

__all__ = ["EnrollmentDesk", "RunDocuments"]

#: an enrollment key is 32 random bytes (hfl_lab.config.join_link.enrollment_key)
MIN_KEY_BYTES = 16
MAX_KEY_BYTES = 64


@dataclass(frozen=True)
class RunDocuments:
    """What a joiner receives: the run's public documents and, simulated, the bootstrap."""

    config_yaml: str
    policy_yaml: str
    policy_signature: str
    bootstrap: bytes = b""

    def __repr__(self) -> str:
        return f"RunDocuments(config {len(self.config_yaml)} chars, <bootstrap in memory>)"


class EnrollmentDesk:
    """Honours the join links MAC'd with the host's key, once it opened enrollment."""

    def __init__(self, documents: RunDocuments) -> None:
        self._documents = documents
        self._key: bytes | None = None
        self._lock = threading.Lock()
        #: slot → how many times it enrolled (a rejoin enrolls again: a fresh TD, a fresh key)
        self.enrolled: dict[str, int] = {}

    def __repr__(self) -> str:
        return f"EnrollmentDesk({'open' if self.is_open else 'closed'}, <key in memory>)"

    @property
    def is_open(self) -> bool:
        return self._key is not None

    def open(self, key: bytes) -> None:
        if not MIN_KEY_BYTES <= len(key) <= MAX_KEY_BYTES:
            raise ConfigError(
                f"an enrollment key is {MIN_KEY_BYTES} to {MAX_KEY_BYTES} bytes, got {len(key)}.",
                fix="open enrollment with hfl_lab.config.join_link.enrollment_key().")
        with self._lock:
            self._key = bytes(key)

    def enroll(self, link_text: str, *, now: float | None = None) -> tuple[JoinLink, RunDocuments]:
        """The link, checked (shape, MAC, expiry), and what its holder receives."""
        with self._lock:
            key = self._key
        if key is None:
            raise PolicyViolation(
                "this trust service takes no joiners: its run is not hosted.",
                fix="ask the host to start the run with `hfl-lab host`, and use its link.")
        at = time.time() if now is None else now
        link = JoinLink.parse(link_text, now=at)
        link.check_enrollment(key, now=at)
        with self._lock:
            self.enrolled[link.slot] = self.enrolled.get(link.slot, 0) + 1
        return link, self._documents
