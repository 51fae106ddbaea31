"""The trust service's enrollment desk: what a joiner with a valid join link receives.

A hosted run (``hfl-lab host``) opens enrollment with its key (``OpenEnrollment``, owner only).
A joiner that verified this service against its link then presents the link (``Enroll``) and
receives what it needs to start its worker TD: the run's config document and the owner-signed
policy, byte for byte (both public; the worker's MR_CONFIG_ID measures the document, and it
takes the policy only with the owner's signature), and in a simulated run a bootstrap of its own:
a PCK key and attestation key made for this enrollment, certified by the lab's PCK CA with a
certificate that names the link's slot (:meth:`SimulatedPlatform.for_slot`). Every verifier
accepts evidence under that certificate for that slot alone (``Verifier._check_slot``): a joiner
cannot sign the trust service's, ps0's or another worker's evidence, and never sees the lab's CA
or collateral keys.

The link limits who may try, nothing more: the worker is still attested, against the policy,
before it gets a mesh certificate. A joiner that holds its slot's simulated keys can still sign
its *own* slot's evidence with any measurements it likes: a simulated run proves the workload of
an honest joiner, never the hardware, and says so everywhere (see DESIGN.md, "Two backends").
"""

from __future__ import annotations

import dataclasses
import json
import threading
import time
from dataclasses import dataclass

from hfl_lab._exceptions import ConfigError, HflLabError, PolicyViolation
from hfl_lab.config.join_link import JoinLink
from hfl_lab.tee.sim.platform import SimulatedPlatform

__all__ = ["EnrollmentDesk", "RunDocuments", "bootstrap_document", "bootstrap_platform"]

#: an enrollment key is 32 random bytes (hfl_lab.config.join_link.enrollment_key)
MIN_KEY_BYTES = 16
MAX_KEY_BYTES = 64


@dataclass(frozen=True)
class RunDocuments:
    """What a joiner receives: the run's public documents and, simulated, its bootstrap (its
    slot's platform, one JSON line as a local participant reads it on stdin)."""

    config_yaml: str
    policy_yaml: str
    policy_signature: str
    bootstrap: bytes = b""

    def __repr__(self) -> str:
        return f"RunDocuments(config {len(self.config_yaml)} chars, <bootstrap in memory>)"


def bootstrap_document(platform: SimulatedPlatform | None) -> str:
    """A participant's bootstrap, the one JSON object every launcher hands over (a joiner's
    :class:`RunDocuments`, a local participant's stdin line, a pod's Secret, the descriptor an
    image-booted workload reads): the simulated platform's keys, or ``{}`` for None (a TDX
    guest: its evidence comes from the TDX module). It holds keys: keep it in memory only."""
    return json.dumps({"platform": platform.export_secret().hex()} if platform is not None
                      else {})


def bootstrap_platform(bootstrap: bytes) -> SimulatedPlatform | None:
    """The slot's simulated platform in a :class:`RunDocuments` bootstrap, as
    :meth:`EnrollmentDesk.enroll` writes it; None for an empty bootstrap (a hardware run: the
    joiner brings its own TDX evidence). The error never quotes the bootstrap (it holds keys)."""
    if not bootstrap:
        return None
    try:
        return SimulatedPlatform.from_secret(bytes.fromhex(json.loads(bootstrap)["platform"]))
    except (ValueError, KeyError, TypeError, HflLabError):
        raise ConfigError("the host sent a bootstrap this joiner cannot read.",
                          fix="the host and this joiner must run the same hfl-lab version.") \
            from None


class EnrollmentDesk:
    """Honours the join links MAC'd with the host's key, once it opened enrollment."""

    def __init__(self, documents: RunDocuments, platform: SimulatedPlatform | None = None
                 ) -> None:
        """``platform``: the simulated lab platform whose PCK CA certifies each joiner's own
        keys (None: a hardware run, joiners bring their own TDX evidence)."""
        self._documents = documents
        self._platform = platform
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
        if self._platform is None:
            return link, self._documents
        bootstrap = bootstrap_document(self._platform.for_slot(link.slot)).encode()
        return link, dataclasses.replace(self._documents, bootstrap=bootstrap)
