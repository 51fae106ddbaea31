"""The LUKS model vault: checkpoints at rest in a LUKS volume, with MACs and signed provenance."""

from hfl_lab.vault.checkpoints import Checkpoint, CheckpointInfo, CheckpointStore
from hfl_lab.vault.directory_store import DirectoryCheckpointStore
from hfl_lab.vault.kernel import kernel_path_status
from hfl_lab.vault.model_vault import ModelVault, PathKind, choose_data_path, new_passphrase
from hfl_lab.vault.provenance import ProvenanceEntry, ProvenanceReport, TrustedKey
from hfl_lab.vault.retrieval import RetrievedModel, retrieve_model

__all__ = [
    "Checkpoint",
    "CheckpointInfo",
    "CheckpointStore",
    "DirectoryCheckpointStore",
    "ModelVault",
    "PathKind",
    "ProvenanceEntry",
    "ProvenanceReport",
    "RetrievedModel",
    "TrustedKey",
    "choose_data_path",
    "kernel_path_status",
    "new_passphrase",
    "retrieve_model",
]
