"""Checkpoints in a plain directory, for runs where no vault is configured."""

from __future__ import annotations

import json
import secrets
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from hfl_lab._exceptions import VaultError
from hfl_lab.vault.archive import CheckpointArchive
from hfl_lab.vault.checkpoints import Checkpoint, CheckpointInfo
from hfl_lab.vault.files import DirectoryFiles
from hfl_lab.vault.provenance import ProvenanceEntry, genesis_hash


class DirectoryCheckpointStore:
    """Checkpoints in a directory: atomic (temp file, fsync, rename), hash-checked, not secret.

    Without a volume key there is no MAC, so the hashes catch corruption but not deliberate
    edits; signed provenance still works when the PS passes a ``ProvenanceEntry``.
    """

    def __init__(self, root: Path, *, keep_last: int | None = None, durable: bool = True) -> None:
        root.mkdir(parents=True, exist_ok=True)
        files = DirectoryFiles(root, durable=durable)
        files.remove_leftovers()
        marker = root / "store.json"
        if not marker.exists():
            files.commit([("store.json", json.dumps({"store_id": secrets.token_hex(16)}).encode())])
        try:
            store_id = str(json.loads(marker.read_bytes())["store_id"])
        except (ValueError, KeyError) as error:
            raise VaultError(f"{marker} is damaged.", fix="restore it or delete it.") from error
        self.root = root
        self.archive = CheckpointArchive(
            files,
            mac_key=None,
            genesis=genesis_hash(store_id),
            data_path="directory",
            keep_last=keep_last,
        )
        self.archive.recover()

    def save(
        self,
        step: int,
        payload: bytes,
        metadata: Mapping[str, Any],
        provenance: ProvenanceEntry | None = None,
    ) -> CheckpointInfo:
        return self.archive.write(step, payload, metadata, provenance)

    def load_latest(self) -> Checkpoint | None:
        return self.archive.latest(skip_corrupt=True)
