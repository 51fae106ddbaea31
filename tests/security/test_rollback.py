"""R8 (issue 18, item 8): rollback by a storage admin is refused, naming what was rolled back.

Three attacks on what ps0 and the owner keep in storage they do not control:
(a) an older copy of the model volume is put back: its chain is shorter but intact;
(b) the newest checkpoint is damaged: ps0 must not resume from an older one in silence;
(c) an older ``state.sealed`` of the trust service is put back (older policy, secrets, heads).
The defence: ps0 reports each checkpoint's head to the trust service (attested), which keeps it
in its sealed state together with a counter, and the owner keeps its own copy of that counter.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from hfl_lab import AttestationError, HflLabError, PolicyViolation, VaultError
from hfl_lab.trust.client import MeshCredentials, TrustClient
from hfl_lab.trust.sealed import CheckpointHead
from hfl_lab.trust.service import TrustService
from hfl_lab.vault import (
    HeadWitness,
    OwnerCounter,
    SealedBrokerState,
    observe_trust_state,
    open_vault_for_ps,
    owner_counter_path,
    provision_vault,
    retrieve_as_owner,
)
from tests.reliability_report import record
from tests.td_support import PLATFORM, lab_policy, provider
from tests.trust_support import Running, connect, start
from tests.vault_support import FAST_KDF, OWNER, needs_cryptsetup, release_policy, weights
from trainer.vault_store import Contributors, VaultCheckpointStore

pytestmark = needs_cryptsetup

SIZE = 50_000  # bytes per checkpoint payload: small, the attacks do not depend on it


@pytest.fixture()
def trust(tmp_path: Path) -> Iterator[tuple[Running, bytes]]:
    owner_key = os.urandom(32)
    running = start(tmp_path, owner_key=owner_key)
    yield running, owner_key
    running.server.stop(0)


def provision(running: Running, path: Path) -> None:
    with connect(running) as client:
        provision_vault(client, running.admin, path, size_mb=12, release_policy=release_policy(),
                        data_path="userspace", kdf_iterations=FAST_KDF)


def ps0_store(client: TrustClient, path: Path, creds: MeshCredentials) -> VaultCheckpointStore:
    """ps0's store as ``open_vault_store`` makes it: key released to ps0, heads witnessed."""
    vault = open_vault_for_ps(client, "ps0", provider("ps0"), path, data_path="userspace")
    return VaultCheckpointStore(vault, lambda: creds, Contributors(), "ps0",
                                witness=HeadWitness(client, "ps0", provider("ps0")))


def train(client: TrustClient, path: Path, creds: MeshCredentials, steps: range) -> None:
    store = ps0_store(client, path, creds)
    try:
        for step in steps:
            store.save(step, weights(step, SIZE), {"metrics": {"loss": 1.0 / step}})
    finally:
        store.close()


def resume(client: TrustClient, path: Path, creds: MeshCredentials) -> int | None:
    store = ps0_store(client, path, creds)
    try:
        latest = store.load_latest()
    finally:
        store.close()
    return latest.step if latest is not None else None


def test_a_restored_older_volume_is_refused_by_ps0_and_the_owner(
    trust: tuple[Running, bytes], tmp_path: Path
) -> None:
    # Arrange: ps0 checkpoints steps 1-2; the storage admin copies the volume; ps0 goes on to
    # step 4; the admin puts the step-2 copy back
    running, owner_key = trust
    path, copy = tmp_path / "model.luks", tmp_path / "model-at-step-2.luks"
    provision(running, path)
    with connect(running) as client:
        creds = client.attest("ps0", provider("ps0"))
        train(client, path, creds, range(1, 3))
        shutil.copyfile(path, copy)
        train(client, path, creds, range(3, 5))
        head, _ = client.checkpoint_head(_uuid(client, path, creds))
        shutil.copyfile(copy, path)

        # Act: ps0 restarts and resumes; the owner retrieves, attested and from the sealed state
        refusals = [_refusal(lambda: resume(client, path, creds))]
        refusals.append(_refusal(lambda: retrieve_as_owner(
            client, provider("owner", OWNER), path, [creds.certificate_pem],
            data_path="userspace")))
    refusals.append(_refusal(lambda: retrieve_as_owner(
        None, SealedBrokerState(state_of(running), owner_key), path,
        [creds.certificate_pem], data_path="userspace")))

    # Assert: each refusal names the rollback, the step it went back to and the hash expected
    assert head is not None and head.step == 4
    named = [isinstance(e, VaultError) and "rolled back" in e.message and "step 2" in e.message
             and head.describe() in e.message and head.record_sha256 in str(e.fix)
             for e in refusals]
    record("R8", "restored_older_volume_refused", tried=3, held=sum(named),
           lost=2 * (3 - sum(named)), attacker="storage admin (an older copy of model.luks)",
           refused_by=["ps0 resume", "owner (attested)", "owner (sealed state)"],
           errors=[str(e) for e in refusals])
    assert all(named), refusals


def test_a_damaged_newest_checkpoint_stops_ps0_instead_of_resuming_older(
    trust: tuple[Running, bytes], tmp_path: Path
) -> None:
    # Arrange: three checkpoints; then the newest one's payload is damaged
    running, _ = trust
    path = tmp_path / "model.luks"
    provision(running, path)
    with connect(running) as client:
        creds = client.attest("ps0", provider("ps0"))
        train(client, path, creds, range(1, 4))
        store = ps0_store(client, path, creds)
        payload = bytearray(store.vault.files.read("checkpoints/step-000000000003.bin"))
        payload[100] ^= 0xFF
        store.vault.files.commit([("checkpoints/step-000000000003.bin", bytes(payload))])
        store.close()

        # Act
        refused = _refusal(lambda: resume(client, path, creds))

    # Assert: it names the damaged step, what falling back would cost, and the fix
    held = (isinstance(refused, VaultError) and "step 3, is damaged" in refused.message
            and "step 2" in refused.message and "restore model.luks" in str(refused.fix))
    record("R8", "damaged_newest_checkpoint_not_skipped", tried=1, held=int(held),
           lost=0 if held else 1, attacker="storage admin (damaged the newest checkpoint)",
           error=str(refused))
    assert held, refused


def test_an_unsigned_newest_checkpoint_is_not_resumed_from(
    trust: tuple[Running, bytes], tmp_path: Path
) -> None:
    # Arrange: a holder of the volume key adds a checkpoint with a MAC and no provenance record
    running, _ = trust
    path = tmp_path / "model.luks"
    provision(running, path)
    with connect(running) as client:
        creds = client.attest("ps0", provider("ps0"))
        train(client, path, creds, range(1, 3))
        store = ps0_store(client, path, creds)
        store.vault.save(3, weights(3, SIZE), {"metrics": {"loss": 0.0}})
        store.close()

        # Act
        refused = _refusal(lambda: resume(client, path, creds))

    # Assert
    held = isinstance(refused, VaultError) and "step 3, has no provenance record" in str(refused)
    record("R8", "unsigned_newest_checkpoint_not_resumed", tried=1, held=int(held), lost=0,
           attacker="storage admin holding the volume key", error=str(refused))
    assert held, refused


def test_an_older_sealed_state_is_refused_when_the_service_or_the_owner_resumes(
    trust: tuple[Running, bytes], tmp_path: Path
) -> None:
    # Arrange: the owner keeps its copy of the state counter (as the local backend does at
    # provisioning and when training ends); the storage admin copies state.sealed after the
    # provisioning, training writes newer states, the admin puts the old file back
    running, owner_key = trust
    state, path = state_of(running), tmp_path / "model.luks"
    counter = OwnerCounter(owner_counter_path(state), owner_key)
    provision(running, path)
    with connect(running) as client:
        observe_trust_state(client, counter, "the trust service's state")
        shutil.copyfile(state, tmp_path / "old-state.sealed")
        creds = client.attest("ps0", provider("ps0"))
        train(client, path, creds, range(1, 3))
        seen = observe_trust_state(client, counter, "the trust service's state")
    running.server.stop(0)
    shutil.copyfile(tmp_path / "old-state.sealed", state)

    # Act: (1) the service resumes with the owner's counter; (2) a service that resumed
    # without it (the local backend's trust process) meets the owner's check; (3) the owner
    # opens the state offline to retrieve the model
    refusals = [_refusal(lambda: TrustService(
        policy=lab_policy(), admin_token=running.admin, lab_root_der=PLATFORM.root_der,
        state_path=state, owner_key=owner_key, min_state_counter=counter.value))]
    restarted = start(tmp_path, owner_key=owner_key)
    try:
        with connect(restarted) as client:
            refusals.append(_refusal(lambda: observe_trust_state(client, counter,
                                                                 "the trust service's state")))
    finally:
        restarted.server.stop(0)
    refusals.append(_refusal(lambda: retrieve_as_owner(
        None, SealedBrokerState(state, owner_key, counter.path), path,
        [creds.certificate_pem], data_path="userspace")))

    # Assert: every refusal names the rollback and both counters
    assert seen > 1 and counter.value == seen
    assert isinstance(refusals[0], AttestationError) and refusals[0].check == "state_rollback"
    named = [isinstance(e, HflLabError) and "rolled back" in e.message
             and f"number {seen}" in e.message and "number 1," in e.message for e in refusals]
    record("R8", "restored_older_sealed_state_refused", tried=3, held=sum(named), lost=0,
           attacker="storage admin (an older state.sealed)",
           refused_by=["trust service resume", "owner's check of the service",
                       "owner (sealed state)"], errors=[str(e) for e in refusals])
    assert all(named), refusals


def test_a_removed_sealed_state_is_refused_too(tmp_path: Path) -> None:
    """Deleting state.sealed is the oldest rollback of all: a service started with the owner's
    counter refuses to start afresh without it."""
    admin, owner_key = os.urandom(32), os.urandom(32)
    state = tmp_path / "state.sealed"

    with pytest.raises(AttestationError, match="is missing") as refused:
        TrustService(policy=lab_policy(), admin_token=admin, lab_root_der=PLATFORM.root_der,
                     state_path=state, owner_key=owner_key, min_state_counter=3)

    assert refused.value.check == "state_rollback" and "number 3" in refused.value.message


def test_the_owners_counter_only_grows_and_cannot_be_edited_without_the_owner_key(
    tmp_path: Path,
) -> None:
    # Arrange: the owner saw state number 5
    counter = OwnerCounter(tmp_path / "state.sealed.counter", os.urandom(32))
    counter.advance(5, "the state")

    # Act / Assert: an older state is refused; an edited copy is refused as altered
    with pytest.raises(VaultError, match="rolled back"):
        counter.advance(3, "the state")
    counter.path.write_text(counter.path.read_text().replace('"counter": 5', '"counter": 1'))
    with pytest.raises(VaultError, match="was altered"):
        counter.check(3, "the state")


def test_without_an_attack_resume_and_retrieval_use_the_newest_checkpoint(
    trust: tuple[Running, bytes], tmp_path: Path
) -> None:
    """The checks cost nothing when nothing happened, and a volume ahead of the recorded head
    (ps0 crashed between writing a checkpoint and reporting it) is not a rollback."""
    running, owner_key = trust
    path = tmp_path / "model.luks"
    provision(running, path)
    with connect(running) as client:
        creds = client.attest("ps0", provider("ps0"))
        train(client, path, creds, range(1, 3))
        store = ps0_store(client, path, creds)
        store.witness = None  # step 3 is written, its report never arrives
        store.save(3, weights(3, SIZE), {"metrics": {"loss": 0.3}})
        store.close()
        head, _ = client.checkpoint_head(_uuid(client, path, creds))
        resumed = resume(client, path, creds)
    retrieved = retrieve_as_owner(None, SealedBrokerState(state_of(running), owner_key),
                                  path, [creds.certificate_pem], data_path="userspace")

    assert head is not None and head.step == 2
    assert resumed == 3 and retrieved.step == 3 and retrieved.provenance.ok


def test_only_an_attested_ps_moves_the_head_and_only_forward(
    trust: tuple[Running, bytes], tmp_path: Path
) -> None:
    running, _ = trust
    path = tmp_path / "model.luks"
    provision(running, path)
    with connect(running) as client:
        creds = client.attest("ps0", provider("ps0"))
        train(client, path, creds, range(1, 3))
        head, counter = client.checkpoint_head(_uuid(client, path, creds))
        assert head is not None
        older = CheckpointHead(head.volume_uuid, 1, head.index - 1, "0" * 64)
        forked = CheckpointHead(head.volume_uuid, head.step, head.index, "f" * 64)

        with pytest.raises(PolicyViolation, match="only the parameter server"):
            client.report_checkpoint_head(older, "worker0", provider("worker0"))
        with pytest.raises(PolicyViolation, match="mr_config_id"):  # a worker's TD claims ps0
            client.report_checkpoint_head(older, "ps0", provider("worker0"))
        with pytest.raises(AttestationError, match="older than the recorded"):
            client.report_checkpoint_head(older, "ps0", provider("ps0"))
        with pytest.raises(AttestationError, match="forked"):
            client.report_checkpoint_head(forked, "ps0", provider("ps0"))
        after, counter_after = client.checkpoint_head(head.volume_uuid)

    assert after == head and counter_after == counter
    refused = [e for e in running.service.audit.entries
               if e["action"] == "record_checkpoint_head" and not e["allowed"]]
    assert len(refused) == 4


def state_of(running: Running) -> Path:
    """The trust service's sealed state file."""
    assert running.service.state_path is not None
    return running.service.state_path


def _uuid(client: TrustClient, path: Path, creds: MeshCredentials) -> str:
    store = ps0_store(client, path, creds)
    try:
        return store.vault.volume_uuid
    finally:
        store.close()


def _refusal(action: object) -> HflLabError | None:
    """The ``HflLabError`` ``action()`` raised, or None when it went through."""
    assert callable(action)
    try:
        action()
    except HflLabError as error:
        return error
    return None
