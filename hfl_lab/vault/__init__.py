"""The LUKS model vault: checkpoints at rest in a LUKS volume, with MACs and signed provenance."""

from hfl_lab.vault.attested_signers import AttestedSigners
from hfl_lab.vault.checkpoints import Checkpoint, CheckpointInfo, CheckpointStore
from hfl_lab.vault.directory_store import DirectoryCheckpointStore
from hfl_lab.vault.kernel import kernel_path_status
from hfl_lab.vault.keyrelease import (
    VOLUME_SECRET_NAME,
    SealedBrokerState,
    VaultInfo,
    check_release_policy,
    inspect_volume,
    open_as_owner,
    open_vault_for_ps,
    provision_vault,
    release_policy_from,
    retrieve_as_owner,
    volume_release_policy,
)
from hfl_lab.vault.model_vault import ModelVault, PathKind, choose_data_path, new_passphrase
from hfl_lab.vault.owner_open import RetrievedModel, retrieve_model
from hfl_lab.vault.provenance import ProvenanceEntry, ProvenanceReport, TrustedKey
from hfl_lab.vault.rollback import (
    HeadWitness,
    OwnerCounter,
    check_not_rolled_back,
    observe_trust_state,
    owner_counter_path,
    resume_checkpoint,
)

__all__ = [
    "VOLUME_SECRET_NAME",
    "AttestedSigners",
    "Checkpoint",
    "CheckpointInfo",
    "CheckpointStore",
    "DirectoryCheckpointStore",
    "HeadWitness",
    "ModelVault",
    "OwnerCounter",
    "PathKind",
    "ProvenanceEntry",
    "ProvenanceReport",
    "RetrievedModel",
    "SealedBrokerState",
    "TrustedKey",
    "VaultInfo",
    "check_not_rolled_back",
    "check_release_policy",
    "choose_data_path",
    "inspect_volume",
    "kernel_path_status",
    "new_passphrase",
    "observe_trust_state",
    "open_as_owner",
    "open_vault_for_ps",
    "owner_counter_path",
    "provision_vault",
    "release_policy_from",
    "resume_checkpoint",
    "retrieve_as_owner",
    "retrieve_model",
    "volume_release_policy",
]
