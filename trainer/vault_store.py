"""ps0's checkpoints in the LUKS model vault, each with a provenance record signed by its
attested key.

ps0 obtains the volume passphrase by attested key release (``open_vault_for_ps``) and keeps the
volume open for the whole run: the volume key lives in this process's memory only. Every save
appends a provenance record signed with the key of ps0's *current* mesh certificate (renewals
change it), whose embedded evidence the owner's trusted node re-verifies offline
(``hfl_lab.vault.AttestedSigners``). The record names the evidence of ps0 and of the workers whose
attested certificates ps0 accepted (the latest per worker).

After every save ps0 reports the new head (step, record index and hash) to the trust service,
attested (``hfl_lab.vault.HeadWitness``), and on resume it compares the volume with the head the
service recorded (``hfl_lab.vault.resume_checkpoint``): a volume put back to an older copy, or a
damaged or unsigned newest checkpoint, stops ps0 with an error naming it, instead of resuming
from an older checkpoint in silence.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

from hfl_lab._exceptions import ConfigError, HflLabError
from hfl_lab.ratls.certificate import decode_certificate
from hfl_lab.tee.quote import parse_quote
from hfl_lab.tee.verdict import Verdict
from hfl_lab.vault.checkpoints import Checkpoint, CheckpointInfo
from hfl_lab.vault.keyrelease import open_vault_for_ps
from hfl_lab.vault.model_vault import ModelVault, PathKind
from hfl_lab.vault.provenance import ProvenanceEntry
from hfl_lab.vault.rollback import HeadWitness, resume_checkpoint

if TYPE_CHECKING:
    from hfl_lab.trust.client import MeshCredentials, TrustClient
    from trainer.participant import Participant

__all__ = ["Contributors", "VaultCheckpointStore", "evidence_digest", "open_vault_store"]

log = logging.getLogger(__name__)


def evidence_digest(certificate_pem: bytes) -> str:
    """The digest of the TD evidence a mesh certificate carries (what a verdict calls
    ``quote_digest``)."""
    return parse_quote(decode_certificate(certificate_pem).evidence.quote).digest()


class Contributors:
    """The latest accepted evidence digest of each worker, fed by ps0's verifier."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._digests: dict[str, str] = {}

    def observe(self, verdict: Verdict) -> None:
        if verdict.accepted and verdict.subject.startswith("worker") and verdict.quote_digest:
            with self._lock:
                self._digests[verdict.subject] = verdict.quote_digest

    def snapshot(self) -> dict[str, str]:
        with self._lock:
            return dict(self._digests)


class VaultCheckpointStore:
    """A ``CheckpointStore`` over an open :class:`ModelVault`, signing every checkpoint; with a
    ``witness`` each head is recorded at the trust service and checked on resume."""

    def __init__(
        self,
        vault: ModelVault,
        credentials: Callable[[], MeshCredentials],
        contributors: Contributors,
        ps_id: str = "ps0",
        *,
        witness: HeadWitness | None = None,
    ) -> None:
        self.vault = vault
        self._credentials = credentials
        self.contributors = contributors
        self.ps_id = ps_id
        self.witness = witness

    def __repr__(self) -> str:
        return f"VaultCheckpointStore({self.vault.path.name}, {self.vault.data_path_kind})"

    def save(
        self,
        step: int,
        payload: bytes,
        metadata: Mapping[str, Any],
        provenance: ProvenanceEntry | None = None,
    ) -> CheckpointInfo:
        if provenance is None:
            creds = self._credentials()
            provenance = ProvenanceEntry(
                signer=creds.identity.private_key,
                signer_pem=creds.certificate_pem,
                ps_evidence_digest=evidence_digest(creds.certificate_pem),
                worker_evidence_digests=self.contributors.snapshot(),
                ps_id=self.ps_id,
            )
        info = self.vault.save(step, payload, metadata, provenance)
        if self.witness is not None:
            self._report(self.witness, info)
        return info

    def _report(self, witness: HeadWitness, info: CheckpointInfo) -> None:
        # The checkpoint is committed whatever happens here; a head the service did not record
        # only narrows the protection (the next report covers it), so training goes on.
        try:
            witness.record(self.vault.volume_uuid, info)
        except HflLabError as error:
            log.warning(
                "checkpoint step %d is written, but the trust service did not record it as the "
                "volume's head (%s): until a later head is recorded, a rollback to the last "
                "recorded one would go unnoticed", info.step, error.message,
            )

    def load_latest(self) -> Checkpoint | None:
        """The checkpoint to resume from: the newest, intact, signed and not older than the
        head the trust service recorded; ``VaultError`` naming the problem otherwise."""
        recorded = (self.witness.recorded(self.vault.volume_uuid)
                    if self.witness is not None else None)
        return resume_checkpoint(self.vault, recorded)

    def close(self) -> None:
        self.vault.close()


def open_vault_store(
    participant: Participant,
    trust: TrustClient,
    credentials: Callable[[], MeshCredentials],
    path: str | Path,
    *,
    data_path: str = "auto",
    create_size_mb: int = 0,
) -> VaultCheckpointStore:
    """Open the run's volume by attested key release as ps0 and wrap it as ps0's store.

    Also hooks ps0's verifier so each record names the workers' accepted evidence. With
    ``create_size_mb`` a missing volume is created first (see ``Deployment.vault_size_mb``).
    """
    contributors = Contributors()
    verifier = participant.verifier
    report = verifier.on_verdict

    def observed(verdict: Verdict) -> None:
        contributors.observe(verdict)
        if report is not None:
            report(verdict)

    verifier.on_verdict = observed
    created = create_size_mb > 0 and not Path(path).exists()
    try:
        vault = open_vault_for_ps(trust, participant.role, participant.provider, path,
                                  data_path=_path_kind(data_path),
                                  create_size_mb=create_size_mb)
    except HflLabError:
        verifier.on_verdict = report
        raise
    participant.emit.log(
        f"{participant.role}: {'created and ' if created else ''}opened the model volume "
        f"{Path(path).name} with the attested key "
        f"release ({vault.data_path_kind} data path); checkpoints go there, signed"
    )
    witness = HeadWitness(trust, participant.role, participant.provider)
    return VaultCheckpointStore(vault, credentials, contributors, participant.role,
                                witness=witness)


def _path_kind(value: str) -> PathKind:
    kinds = ("auto", "kernel", "userspace")
    if value not in kinds:
        raise ConfigError(
            f"deployment.vault_data_path must be one of {', '.join(kinds)}, got {value!r}.",
            fix="use 'auto' (kernel dm-crypt where available, else user space).",
        )
    return cast(PathKind, value)
