"""The lab owner's side of the local backend: the sealed model vault and the owner's credential.

With ``vault=True`` the backend acts as the lab owner. Once the trust service is up it creates
the LUKS volume ``<run_dir>/vault/model.luks`` and registers its random passphrase in the key
broker under a release policy naming ps0's measurements (:meth:`OwnerSide.volume_release_policy`),
so only ps0's TD obtains it, by attested key release. The owner's admin credential for the trust
service is derived from the session's owner secret and this run's public salt
(``<run_dir>/trust/owner.json``, see :mod:`hfl_lab.owner`). It reaches the trust service only
over its attested channel: at each start of the service, once it announces ``provisioning``, the
owner verifies its evidence and sends it there (:meth:`OwnerSide._provision_trust`); no pipe,
file or environment variable carries it. The trust service seals its state
(the passphrase included) under a key derived from that credential, so after the run the owner
opens the volume from the sealed state (:meth:`OwnerSide.owner_credential`,
:meth:`OwnerSide.model_store`). :class:`OwnerSide` is that part of
:class:`~hfl_lab.backends.local.LocalBackend`.

The owner also keeps its own copy of the trust service's sealed-state counter
(``<run_dir>/trust/state.sealed.counter``, see :class:`hfl_lab.vault.OwnerCounter`): checked and
advanced when the service starts or resumes (before anything is provisioned or ps0 starts), when
training ends (:meth:`OwnerSide.collect_sealed_model`) and whenever the owner opens the sealed
state. A ``state.sealed`` put back to an older copy is refused, naming both counters. On this one
machine the copy sits in the run folder: it stops a storage admin of the trust service's state,
not a user who rolls back the whole run folder (a real TD would use a vTPM NV counter or the KBS).
"""

from __future__ import annotations

import contextlib
import logging
import shutil
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

from hfl_lab import owner
from hfl_lab._exceptions import BackendError, HflLabError
from hfl_lab.backends.base import ProgressCallback, refused_by_owner
from hfl_lab.backends.local.processes import ParticipantProcess
from hfl_lab.config import LabConfig
from hfl_lab.events import LabEvent
from hfl_lab.tee.policy import AttestationPolicy
from hfl_lab.tee.sim.measure import TdMeasurements
from hfl_lab.tee.sim.platform import SimulatedPlatform
from hfl_lab.trust.client import TrustClient
from hfl_lab.vault.checkpoints import CheckpointStore
from hfl_lab.vault.directory_store import DirectoryCheckpointStore
from hfl_lab.vault.keyrelease import (
    SealedBrokerState,
    VaultInfo,
    open_as_owner,
    provision_vault,
    volume_release_policy,
)
from hfl_lab.vault.rollback import OwnerCounter, observe_trust_state, owner_counter_path

log = logging.getLogger(__name__)


class OwnerSide:
    """What the lab owner does on a local run: provision the vault, reach the sealed model."""

    # set by LocalBackend
    config: LabConfig
    run_dir: Path
    checkpoint_dir: Path
    connect_timeout_s: float
    platform: SimulatedPlatform | None
    admin_token: bytes
    policy: AttestationPolicy | None
    measurements: dict[str, TdMeasurements]
    trust_address: str
    vault_path: Path | None
    trust_state_path: Path
    owner_salt_path: Path
    vault_info: VaultInfo
    # provided by ParticipantProcesses
    _put: Callable[[LabEvent], None]
    _torn_down: bool
    _wait_roles: Callable[[Sequence[str], float, ProgressCallback | None], None]

    def volume_release_policy(self) -> AttestationPolicy:
        """Who may receive the volume passphrase by attested release: ps0's TD (this code, its
        configuration), nobody else. The owner's node uses the sealed state instead."""
        assert self.policy is not None
        return volume_release_policy(self.measurements["ps0"], base=self.policy)

    def _provision_vault(self, path: Path) -> None:
        """As the owner: create the volume and register its passphrase (or keep the volume a
        resumed run made: the restarted trust service unsealed its passphrase)."""
        self._wait_roles(["trust"], self.connect_timeout_s, None)
        path.parent.mkdir(parents=True, exist_ok=True)
        with self.trust_client() as client:
            # a service that resumed from an older state.sealed is refused before it is used
            observe_trust_state(client, self.owner_counter(), _STATE)
            self.vault_info = provision_vault(
                client, self.admin_token, path, size_mb=self.config.vault_size_mb,
                release_policy=self.volume_release_policy(), reuse=path.exists(),
                kdf_iterations=self.config.vault_kdf_iterations,
            )
            observe_trust_state(client, self.owner_counter(), _STATE)
        info = self.vault_info
        self._put(LabEvent("log", "owner", {
            "level": "info",
            "message": f"model volume {path.name}: LUKS{info.luks_version}, {info.size_mb} MB, "
            f"{info.data_path_kind} data path, "
            + ("created; its passphrase is registered in the key broker for ps0 only"
               if info.created else "kept from the earlier start of this run"),
        }))

    def _provision_trust(self, p: ParticipantProcess) -> None:
        """Verify the trust service that just started (its RA-TLS evidence against the owner's
        policy, its certificate pinned) and hand it the owner's credential over that channel.
        A service that fails the check gets nothing, and the run stops with the reason."""
        try:
            with self.trust_client() as client:
                detail = client.provision(self.admin_token)
        except HflLabError as error:
            if p.returncode is not None or self._torn_down:
                return  # it is gone: its watcher reports how it ended
            p.problem = refused_by_owner(error)
            self._put(LabEvent("log", "owner", {"level": "error", "message": str(error)}))
            return
        self._put(LabEvent("log", "owner", {
            "level": "info",
            "message": f"trust service attested; owner's credential sent over its attested "
            f"channel ({detail})",
        }))

    def trust_client(self) -> TrustClient:
        """A client of this run's trust service, after its attestation was verified."""
        if self.policy is None or self.platform is None:
            raise BackendError("the run is not started.", fix="call start() first.")
        return TrustClient.connect(self.trust_address, self.policy,
                                   lab_root_der=self.platform.root_der, role="trust",
                                   verifier_name="owner")

    def owner_credential(self) -> SealedBrokerState:
        """The owner's authorized way to the volume passphrase after the run (sealed state),
        checked against the owner's copy of the state's counter."""
        return SealedBrokerState(self.trust_state_path, owner.sealing_key(self.admin_token),
                                 owner_counter_path(self.trust_state_path))

    def owner_counter(self) -> OwnerCounter:
        """The owner's copy of the trust service's sealed-state counter."""
        return OwnerCounter(owner_counter_path(self.trust_state_path),
                            owner.sealing_key(self.admin_token))

    def collect_sealed_model(self) -> None:
        """When training has ended, while the trust service still runs: keep the owner's copy
        of its state counter current (the volume and the state are on this machine already).
        A service the owner cannot reach leaves the copy as it was; a rolled-back one raises."""
        if self.vault_path is None:
            return
        try:
            client = self.trust_client()
        except HflLabError as error:
            log.warning("the owner's copy of the trust service's state counter was not "
                        "refreshed at the end of training: %s", error)
            return
        with client:
            observe_trust_state(client, self.owner_counter(), _STATE)

    @contextlib.contextmanager
    def model_store(self) -> Iterator[CheckpointStore]:
        """The run's checkpoints, read-only, as the owner sees them: the volume opened with the
        owner's credential, or the plain checkpoint folder of a run without the vault. Both
        have ``load_latest()``; the volume also ``list_checkpoints()`` and
        ``verify_provenance(...)``. Nothing is written."""
        if self.vault_path is None:
            yield DirectoryCheckpointStore(self.checkpoint_dir, durable=False)
            return
        with open_as_owner(self.owner_credential(), self.vault_path) as vault:
            yield vault

    def fetch_vault(self, dest: Path) -> Path:
        """Copy the run's model store out of ps0's reach to ``dest``."""
        source = self.vault_path or self.run_dir / "vault" / "model.luks"
        if not source.exists():
            raise BackendError(
                f"this run has no model volume at {source}; its checkpoints are in "
                f"{self.checkpoint_dir}.",
                fix="run with vault=True so ps0 writes into the LUKS volume.",
            )
        dest = Path(dest)
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source, dest)
        return dest


_STATE = "the trust service's sealed state (state.sealed)"
