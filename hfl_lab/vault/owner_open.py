"""Retrieval on the owner's trusted node: open the volume, verify provenance, take the model."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hfl_lab.vault.checkpoints import Checkpoint
from hfl_lab.vault.model_vault import ModelVault, PathKind
from hfl_lab.vault.provenance import ProvenanceReport, Signers

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RetrievedModel:
    """The newest checkpoint of a volume and what vouches for it."""

    checkpoint: Checkpoint
    provenance: ProvenanceReport
    data_path_kind: str

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
) -> RetrievedModel:
    """Open ``path`` read-only, verify the provenance chain offline, return the newest checkpoint.

    With ``require_provenance`` (the default) a broken or empty chain raises ``VaultError``
    before any weights are returned.
    """
    with ModelVault.open(path, passphrase, path_kind, read_only=True) as vault:
        report = vault.verify_provenance(trusted_ps_keys)
        if require_provenance:
            report.raise_if_broken()
        elif not report.ok:
            log.warning("%s", report.summary())
        checkpoint = vault.latest_checkpoint()
        log.info(
            "retrieved step %d from %s (%s data path): %s",
            checkpoint.step,
            Path(path).name,
            vault.data_path_kind,
            report.summary(),
        )
        return RetrievedModel(checkpoint, report, vault.data_path_kind)
