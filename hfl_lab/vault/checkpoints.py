"""What a checkpoint is, and the store interface the parameter server saves through."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from hfl_lab.vault.provenance import ProvenanceEntry


@dataclass(frozen=True)
class CheckpointInfo:
    """A checkpoint's metadata without its payload; ``problem`` says why it is unusable."""

    step: int
    name: str
    size: int
    payload_sha256: str
    metadata: Mapping[str, Any]
    written_at: str
    written_by: str | None  # the PS id from the provenance entry, when signed
    provenance_index: int | None
    provenance_sha256: str | None
    problem: str | None = None


@dataclass(frozen=True)
class Checkpoint:
    """A checkpoint read back and verified: the payload is exactly what was written."""

    step: int
    payload: bytes
    metadata: Mapping[str, Any]
    payload_sha256: str
    written_at: str
    written_by: str | None
    provenance_index: int | None


class CheckpointStore(Protocol):
    """Where the parameter server keeps its checkpoints; every save is atomic."""

    def save(
        self,
        step: int,
        payload: bytes,
        metadata: Mapping[str, Any],
        provenance: ProvenanceEntry | None = None,
    ) -> CheckpointInfo: ...

    def load_latest(self) -> Checkpoint | None:
        """The newest intact checkpoint, or None when there is none."""
        ...
