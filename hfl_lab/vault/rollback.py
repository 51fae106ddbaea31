"""Rollback protection: the volume against the head the trust service recorded, and the owner's
copy of the trust service's sealed-state counter.

A volume's own checks (MACs, the signed hash chain) cannot see a rollback: an older copy of the
volume file is a valid chain, only shorter. What can is a record kept outside the volume's
storage. After every checkpoint ps0 reports the volume's head (step, provenance record index and
hash) to the trust service, attested (:class:`HeadWitness`); the service keeps it in its sealed
state. ps0's resume (:func:`resume_checkpoint`) and the owner's retrieval compare the volume with
it (:func:`check_not_rolled_back`) and refuse an older or a different volume, naming the step the
volume went back to and the record hash expected.

The sealed state can be rolled back the same way, so its counter is also kept by the owner
(:class:`OwnerCounter`). On the ``local`` backend that copy lives in the run's ``trust/`` folder,
MAC'd with the owner key: it stops a storage admin who puts back an older ``state.sealed``, not
someone who rolls back the owner's folder too. A real TD would keep the counter in a TPM/vTPM NV
counter or at the KBS (see :mod:`hfl_lab.trust.sealed`).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
from pathlib import Path
from typing import TYPE_CHECKING

from hfl_lab._exceptions import HflLabError, VaultError
from hfl_lab.trust.sealed import CheckpointHead
from hfl_lab.vault.checkpoints import Checkpoint, CheckpointInfo
from hfl_lab.vault.model_vault import ModelVault

if TYPE_CHECKING:
    from hfl_lab.tee.evidence import EvidenceProvider
    from hfl_lab.trust.client import TrustClient

__all__ = [
    "HeadWitness",
    "OwnerCounter",
    "check_not_rolled_back",
    "observe_trust_state",
    "owner_counter_path",
    "resume_checkpoint",
]

log = logging.getLogger(__name__)

_COUNTER_DOMAIN = b"hfl-lab/owner/state-counter/v1\0"


class HeadWitness:
    """The trust service as the witness of ps0's newest checkpoint: ps0 reports each head
    (attested as ``role``, fresh evidence from ``provider``) and reads it back on resume."""

    def __init__(self, client: TrustClient, role: str, provider: EvidenceProvider) -> None:
        self.client = client
        self.role = role
        self.provider = provider

    def __repr__(self) -> str:
        return f"HeadWitness({self.client.address}, {self.role})"

    def record(self, volume_uuid: str, info: CheckpointInfo) -> CheckpointHead | None:
        """Report the checkpoint just written as the volume's head (None: it is unsigned, so it
        is no head). Raises ``HflLabError`` when the service did not record it."""
        if info.provenance_index is None or info.provenance_sha256 is None:
            return None
        head = CheckpointHead(volume_uuid, info.step, info.provenance_index,
                              info.provenance_sha256)
        self.client.report_checkpoint_head(head, self.role, self.provider)
        return head

    def recorded(self, volume_uuid: str) -> CheckpointHead | None:
        head, _ = self.client.checkpoint_head(volume_uuid)
        return head


def check_not_rolled_back(
    vault: ModelVault, recorded: CheckpointHead | None, step: int | None, *, who: str
) -> None:
    """Refuse the volume when it is older than, or different from, the ``recorded`` head;
    ``step`` is the checkpoint about to be used (None: there is none)."""
    if recorded is None:
        return
    name = vault.path.name
    expected = recorded.describe()
    fix = (f"do not use this copy: restore the newest {name} (its provenance record "
           f"{recorded.index} hashes to {recorded.record_sha256}) from the parameter server's "
           "storage or a backup; an older copy is refused by design.")
    found = vault.provenance_head()
    if found is None or found.index < recorded.index:
        have = ("holds no provenance record" if found is None
                else f"has its newest signed record at {found.describe()}")
        lost = recorded.step - (found.step if found is not None else 0)
        raise VaultError(
            f"{name} was rolled back: it {have}, but the trust service recorded {expected} as "
            f"its newest checkpoint; {who} refuses the older copy ({_steps(lost)} would be "
            "lost).",
            fix=fix,
        )
    actual = vault.record_sha256(recorded.index)
    if actual != recorded.record_sha256:
        raise VaultError(
            f"{name} was replaced: its provenance record {recorded.index} has sha256 "
            f"{(actual or 'unreadable')[:16]}…, but the trust service recorded {expected}: it "
            f"is another run's volume or a forked copy; {who} refuses it.",
            fix=fix,
        )
    if step is None or step < recorded.step:
        have = "no usable checkpoint" if step is None else f"step {step} as its newest checkpoint"
        raise VaultError(
            f"{name} was rolled back: it has {have}, but the trust service recorded {expected}; "
            f"the newer checkpoints were removed, and {who} refuses the older one.",
            fix=fix,
        )


def resume_checkpoint(vault: ModelVault, recorded: CheckpointHead | None) -> Checkpoint | None:
    """The checkpoint ps0 resumes from: the newest one, intact, signed, and not older than the
    head the trust service recorded. Never an older one in silence: a damaged, unsigned or
    rolled-back newest checkpoint raises ``VaultError`` naming it."""
    infos = vault.list_checkpoints()
    if not infos:
        check_not_rolled_back(vault, recorded, None, who="ps0")
        return None
    newest = infos[-1]
    older = [info.step for info in infos[:-1]]
    fallback = (f"; resuming from step {older[-1]} instead would silently drop "
                f"{_steps(newest.step - older[-1])}" if older else "")
    where = (f"; the trust service recorded {recorded.describe()} as its newest checkpoint"
             if recorded is not None else "")
    try:
        checkpoint = vault.checkpoint(newest.step)
    except VaultError as error:
        raise VaultError(
            f"ps0 will not resume: the newest checkpoint in {vault.path.name}, step "
            f"{newest.step}, is damaged ({error.message.rstrip('.')}){fallback}.",
            fix=f"restore {vault.path.name} from a good copy{where}. Or start the run again in "
            "a new run folder: ps0 never falls back to an older checkpoint by itself.",
        ) from None
    if newest.provenance_index is None:
        raise VaultError(
            f"ps0 will not resume: the newest checkpoint in {vault.path.name}, step "
            f"{newest.step}, has no provenance record, and ps0 signs every checkpoint it "
            f"writes: a holder of the volume key put it there{fallback}.",
            fix=f"restore {vault.path.name} from a good copy{where}. Never resume from "
            "weights nobody signed.",
        )
    check_not_rolled_back(vault, recorded, checkpoint.step, who="ps0")
    return checkpoint


def _steps(count: int) -> str:
    return f"{count} step" if count == 1 else f"{count} steps"


# -- the owner's copy of the sealed-state counter -------------------------------------------------


def owner_counter_path(state_path: Path) -> Path:
    """Where the owner keeps its copy of the counter of the sealed state at ``state_path``."""
    return state_path.with_name(state_path.name + ".counter")


class OwnerCounter:
    """The newest sealed-state counter the owner has seen, in a file MAC'd with the owner key.

    It only grows; a state with a lower counter is refused (:meth:`check`). A missing file
    means the owner has seen nothing yet: the first state is taken as it is.
    """

    def __init__(self, path: Path, owner_key: bytes) -> None:
        self.path = Path(path)
        self._mac_key = hashlib.sha256(_COUNTER_DOMAIN + owner_key).digest()

    def __repr__(self) -> str:
        return f"OwnerCounter({str(self.path)!r})"

    @property
    def value(self) -> int | None:
        """The counter kept, None when none is; ``VaultError`` when the file was altered."""
        try:
            raw = json.loads(self.path.read_text())
            counter, tag = raw["counter"], raw["mac"]
        except FileNotFoundError:
            return None
        except (OSError, ValueError, KeyError, TypeError):
            counter, tag = None, ""
        if not isinstance(counter, int) or not hmac.compare_digest(str(tag), self._tag(counter)):
            raise VaultError(
                f"the owner's copy of the trust service's state counter, {self.path}, was "
                "altered (its MAC does not verify with the owner key).",
                fix="restore it from a backup, or remove it to trust the current sealed state "
                "as it is (the rollback check starts again from there).",
            )
        return counter

    def check(self, counter: int, what: str) -> None:
        """Refuse a state whose counter is lower than the one kept; ``what`` names it."""
        kept = self.value
        if kept is not None and counter < kept:
            raise VaultError(
                f"{what} was rolled back: it is sealed state number {counter}, but the owner "
                f"already saw number {kept}; an older copy (older policy, secrets and "
                "checkpoint heads) was put back.",
                fix=f"restore the newest state (number {kept} or later) from the trust "
                "service's storage or a backup; never resume from an older one.",
            )

    def advance(self, counter: int, what: str) -> None:
        """:meth:`check`, then keep ``counter`` if it is newer."""
        self.check(counter, what)
        kept = self.value
        if kept is not None and counter <= kept:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text(json.dumps({"counter": counter, "mac": self._tag(counter)}) + "\n")
        tmp.replace(self.path)

    def _tag(self, counter: int) -> str:
        return hmac.new(self._mac_key, str(counter).encode(), hashlib.sha256).hexdigest()


def observe_trust_state(client: TrustClient, counter: OwnerCounter, what: str) -> int:
    """As the owner: compare the running trust service's state counter with the owner's copy
    (refusing a service that resumed from an older state) and keep it. Returns it."""
    try:
        _, found = client.checkpoint_head()
    except HflLabError as error:
        raise VaultError(
            f"cannot read {what}'s state counter: {error.message}",
            fix="check that the trust service runs; the owner checks its sealed state before "
            "anything is released from it.",
        ) from None
    counter.advance(found, what)
    return found
