"""The trust service's state at rest, sealed (AES-256-GCM) under a key the lab owner holds.

The sealed state also carries what makes a rollback visible: a version ``counter`` that grows
with every seal, and the checkpoint head (step and provenance record hash) that ps0 reported for
each model volume. AES-GCM proves a state file is genuine, not that it is the newest: whoever
controls the storage can put back an older genuine file (older policy, older secrets, older
head). So the newest counter must also live where that attacker cannot write:

- on the ``local`` backend, the owner's side keeps a copy (``hfl_lab.vault.OwnerCounter``, in
  the run's ``trust/`` folder, MAC'd with the owner key) and refuses a state whose counter is
  lower, when the service resumes and whenever the owner opens the state. On one machine a user
  who can write the run folder can roll that copy back too: it protects against a storage
  admin of the trust service's volume, not against the owner's own machine;
- in a real TD the counter would be a TPM/vTPM NV counter (``TPM2_NV_Increment``, monotonic in
  hardware, read back and compared at unseal) or a counter held by the KBS/attestation service,
  which releases the sealing key only together with the counter value it expects.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from hfl_lab._exceptions import AttestationError, ConfigError

_MAGIC = b"HFLSEAL1"
#: the state's version: one more at every seal, so a copy put back has a lower number
COUNTER = "counter"
#: the checkpoint head of each model volume, by volume UUID
HEADS = "checkpoint_heads"
_HEAD_DOMAIN = b"hfl-lab/checkpoint-head/v1\0"
_UUID = re.compile(r"^[0-9A-Za-z-]{1,64}$")
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_MAX_INDEX = 2**62


def _key(owner_key: bytes) -> bytes:
    if len(owner_key) < 32:
        raise ConfigError("the owner's sealing key must be at least 32 bytes")
    return HKDF(
        algorithm=hashes.SHA256(), length=32, salt=_MAGIC, info=b"hfl-lab/trust-state"
    ).derive(owner_key)


def seal_state(path: Path, state: dict[str, Any], owner_key: bytes) -> None:
    """Write ``state`` encrypted and authenticated; atomic (temp file + rename)."""
    nonce = os.urandom(12)
    body = AESGCM(_key(owner_key)).encrypt(nonce, json.dumps(state).encode(), _MAGIC)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(_MAGIC + nonce + body)
        f.flush()
        os.fsync(f.fileno())
    tmp.replace(path)


def unseal_state(path: Path, owner_key: bytes) -> dict[str, Any]:
    data = path.read_bytes()
    if not data.startswith(_MAGIC) or len(data) < len(_MAGIC) + 12 + 16:
        raise AttestationError(f"{path} is not a sealed trust-service state file", check="state")
    try:
        plain = AESGCM(_key(owner_key)).decrypt(data[8:20], data[20:], _MAGIC)
    except InvalidTag:
        raise AttestationError(
            f"cannot unseal {path}: wrong owner key or the file was modified",
            check="state",
            fix="start the service with the owner key it was sealed under",
        ) from None
    state: dict[str, Any] = json.loads(plain)
    return state


def state_counter(state: Mapping[str, Any]) -> int:
    """The version counter of an unsealed state (0 for a state sealed before counters)."""
    value = state.get(COUNTER, 0)
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else 0


def check_not_rolled_back(
    path: Path, state: Mapping[str, Any] | None, min_counter: int | None
) -> None:
    """Refuse a genuine but older sealed state (``None``: the file is missing): its counter is
    below ``min_counter``, the newest counter the owner has seen (``None``: nothing to compare
    with)."""
    if min_counter is not None and min_counter > 0 and state is None:
        raise AttestationError(
            f"{path} is missing, but sealed state number {min_counter} was written there: it "
            "was removed, and starting without it would forget the policy, the secrets and the "
            "checkpoint heads.",
            check="state_rollback",
            expected=f">= {min_counter}",
            actual="missing",
            fix=f"restore {path.name} from the trust service's storage or a backup.",
        )
    found = state_counter(state or {})
    if min_counter is not None and found < min_counter:
        raise AttestationError(
            f"{path.name} was rolled back: it is sealed state number {found}, but number "
            f"{min_counter} was already written; an older copy (older policy, secrets and "
            "checkpoint heads) was put back.",
            check="state_rollback",
            expected=f">= {min_counter}",
            actual=found,
            fix=f"do not resume from it: restore the newest {path.name} (number {min_counter} "
            "or later) from the trust service's storage or a backup.",
        )


@dataclass(frozen=True)
class CheckpointHead:
    """The newest checkpoint of one model volume as ps0 reported it: its step and the index and
    hash of its signed provenance record, which chains every record before it."""

    volume_uuid: str
    step: int
    index: int
    record_sha256: str

    def __post_init__(self) -> None:
        problems = [
            name for name, ok in (
                ("volume_uuid", isinstance(self.volume_uuid, str)
                 and bool(_UUID.match(self.volume_uuid))),
                ("step", _count(self.step)),
                ("index", _count(self.index)),
                ("record_sha256", isinstance(self.record_sha256, str)
                 and bool(_SHA256.match(self.record_sha256))),
            ) if not ok
        ]
        if problems:
            raise ValueError(f"invalid checkpoint head: bad {', '.join(problems)}")

    def describe(self) -> str:
        return (f"step {self.step} (provenance record {self.index}, sha256 "
                f"{self.record_sha256[:16]}…)")

    def signed_message(self, nonce: bytes) -> bytes:
        """What the reporting PS signs: the head and the service's fresh nonce."""
        body = {**self.to_dict(), "nonce": nonce.hex()}
        return _HEAD_DOMAIN + json.dumps(body, sort_keys=True, separators=(",", ":")).encode()

    def to_dict(self) -> dict[str, Any]:
        return {"volume_uuid": self.volume_uuid, "step": self.step, "index": self.index,
                "record_sha256": self.record_sha256}

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any]) -> CheckpointHead:
        return cls(raw["volume_uuid"], raw["step"], raw["index"], raw["record_sha256"])


def _count(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value < _MAX_INDEX


class CheckpointHeads:
    """The recorded head of each volume. It only moves forward: a report of an older record,
    or of another record at the same index (a forked volume), is refused."""

    def __init__(self) -> None:
        self._heads: dict[str, CheckpointHead] = {}

    def get(self, volume_uuid: str) -> CheckpointHead | None:
        return self._heads.get(volume_uuid)

    def advance(self, head: CheckpointHead) -> bool:
        """Record ``head``; False when it is the one recorded already. ``ValueError`` (its text
        names both heads) when it would move the head back or sideways."""
        current = self._heads.get(head.volume_uuid)
        if current is not None:
            if head.index == current.index and head.record_sha256 == current.record_sha256:
                return False
            if head.index < current.index or head.step < current.step:
                raise ValueError(
                    f"the reported head {head.describe()} is older than the recorded "
                    f"{current.describe()}: a stale or replayed report, or a rolled-back volume"
                )
            if head.index == current.index:
                raise ValueError(
                    f"the reported head {head.describe()} differs from the recorded "
                    f"{current.describe()} at the same record: the volume was forked"
                )
        self._heads[head.volume_uuid] = head
        return True

    def export_state(self) -> dict[str, dict[str, Any]]:
        return {uuid: head.to_dict() for uuid, head in sorted(self._heads.items())}

    def import_state(self, raw: Mapping[str, Any]) -> None:
        self._heads = {uuid: CheckpointHead.from_dict(head) for uuid, head in raw.items()}
