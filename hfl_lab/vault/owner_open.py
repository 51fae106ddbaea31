"""Retrieval on the owner's trusted node: open the volume, verify provenance, take the model."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hfl_lab.trust.sealed import CheckpointHead
from hfl_lab.vault.checkpoints import Checkpoint
from hfl_lab.vault.model_vault import ModelVault, PathKind
from hfl_lab.vault.provenance import ProvenanceReport, Signers, unsigned_problem
from hfl_lab.vault.rollback import check_not_rolled_back

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RetrievedModel:
    """The newest signed checkpoint of a volume and what vouches for it; ``problems`` names what
    was found and not returned (an unsigned checkpoint newer than the signed one)."""

    checkpoint: Checkpoint
    provenance: ProvenanceReport
    data_path_kind: str
    problems: tuple[str, ...] = ()

    @property
    def step(self) -> int:
        return self.checkpoint.step

    @property
    def payload(self) -> bytes:
        return self.checkpoint.payload

    @property
    def metadata(self) -> Mapping[str, Any]:
        return self.checkpoint.metadata

    @property
    def written_by(self) -> str | None:
        return self.checkpoint.written_by


def retrieve_model(
    path: Path | str,
    passphrase: bytes,
    trusted_ps_keys: Signers,
    *,
    path_kind: PathKind = "auto",
    require_provenance: bool = True,
    recorded_head: CheckpointHead | None = None,
) -> RetrievedModel:
    """Open ``path`` read-only, verify the provenance chain offline, return the newest checkpoint
    a signed record covers.

    With ``require_provenance`` (the default) a broken chain, or a volume without any signed
    checkpoint, raises ``VaultError`` before any weights are returned; an unsigned checkpoint
    newer than the newest signed one is never returned and is named in ``problems`` (without
    ``require_provenance`` the newest checkpoint is returned, unverified). ``recorded_head`` is
    the head the trust service recorded for this volume: an older or different volume (a
    rollback) raises ``VaultError`` naming it.
    """
    with ModelVault.open(path, passphrase, path_kind, read_only=True) as vault:
        report = vault.verify_provenance(trusted_ps_keys)
        problems: tuple[str, ...] = ()
        if require_provenance:
            report.raise_unless_signed_model()
            newest = report.newest_signed_step
            assert newest is not None  # raise_unless_signed_model
            checkpoint = vault.checkpoint(newest)
            problems = tuple(unsigned_problem(step) for step in report.unsigned_newer_steps)
            for problem in problems:
                log.warning("not returned: %s", problem)
        else:
            if not report.ok:
                log.warning("%s", report.summary())
            checkpoint = vault.latest_checkpoint()
        check_not_rolled_back(vault, recorded_head, checkpoint.step, who="the owner")
        log.info(
            "retrieved step %d from %s (%s data path): %s",
            checkpoint.step,
            Path(path).name,
            vault.data_path_kind,
            report.summary(),
        )
        return RetrievedModel(checkpoint, report, vault.data_path_kind, problems)
