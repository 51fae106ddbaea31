"""R8 (issue 18, item 7): the model the owner retrieves is one that ps0 signed.

A checkpoint carries two protections: the volume-key MAC on its metadata, and a provenance record
signed by ps0's attested key. The MAC only says "someone holding the volume key wrote this": the
storage admin who obtained the key, or a PS code path that skipped signing. So with provenance
required, the owner gets the newest checkpoint a signed record covers; an unsigned checkpoint
newer than that is never returned, and it is named, in the result and in the error.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from hfl_lab import VaultError
from hfl_lab.trust.broker import DEFAULT_APP_ID
from hfl_lab.trust.sealed import seal_state
from hfl_lab.vault import (
    VOLUME_SECRET_NAME,
    ModelVault,
    SealedBrokerState,
    new_passphrase,
    retrieve_as_owner,
)
from tests.reliability_report import record
from tests.vault_support import entry, make_vault, needs_cryptsetup, ps_identity, weights

pytestmark = needs_cryptsetup

OWNER_KEY = bytes(range(32))


def owner_state(tmp_path: Path, passphrase: bytes) -> SealedBrokerState:
    """The trust service's sealed state as the owner holds it (only the volume's secret)."""
    state = tmp_path / "state.sealed"
    secret = {"secret": passphrase.hex(), "policy": {}}
    seal_state(state, {"broker": {f"{DEFAULT_APP_ID}\0{VOLUME_SECRET_NAME}": secret}},
               OWNER_KEY)
    return SealedBrokerState(state, OWNER_KEY)


def test_an_unsigned_newer_checkpoint_is_not_the_model_the_owner_gets(tmp_path: Path) -> None:
    # Arrange: ps0 signs steps 1 and 2; then a checkpoint with a valid MAC and no provenance
    # record lands on top: a storage admin holding the volume key wrote it (or a PS code path
    # that skips signing did)
    passphrase, (key, pem) = new_passphrase(), ps_identity()
    path = tmp_path / "model.luks"
    payloads = {step: weights(step) for step in (1, 2, 3)}
    with make_vault(path, passphrase) as vault:
        for step in (1, 2):
            vault.write_checkpoint(step, payloads[step], {"metrics": {"loss": 1.0 / step}},
                                   entry(key, pem, 1.0 / step))
        vault.write_checkpoint(3, payloads[3], {"metrics": {"loss": 0.01}})

    # Act
    retrieved = retrieve_as_owner(None, owner_state(tmp_path, passphrase), path, [pem],
                                  data_path="userspace")
    with ModelVault.open(path, passphrase, "userspace", read_only=True) as vault:
        report = vault.verify_provenance([pem])

    # Assert: the signed step 2 comes back; step 3 is named, never returned
    held = retrieved.step == 2 and retrieved.payload == payloads[2]
    named = any("step 3" in problem for problem in retrieved.problems)
    record("R8", "unsigned_newer_checkpoint_not_returned", tried=1, held=int(held and named),
           lost=0, attacker="storage admin holding the volume key", returned=retrieved.step,
           named=named)
    assert held, f"the owner got step {retrieved.step}, which ps0 never signed"
    assert named, retrieved.problems
    assert retrieved.provenance.unsigned_newer_steps == [3]
    assert not report.ok and "step 3" in report.summary()  # the check no longer says ok
    assert report.verified_steps == [1, 2] and report.newest_signed_step == 2


def test_with_no_signed_checkpoint_the_error_names_the_unsigned_one(tmp_path: Path) -> None:
    # Arrange: only unsigned checkpoints (MAC, no provenance record at all)
    passphrase, (_, pem) = new_passphrase(), ps_identity()
    path = tmp_path / "model.luks"
    with make_vault(path, passphrase) as vault:
        for step in (1, 2):
            vault.write_checkpoint(step, weights(step), {"metrics": {"loss": 1.0 / step}})

    # Act
    with pytest.raises(VaultError) as refused:
        retrieve_as_owner(None, owner_state(tmp_path, passphrase), path, [pem],
                          data_path="userspace")

    # Assert
    message = str(refused.value)
    held = "step 2" in message and "no provenance record" in message
    record("R8", "only_unsigned_checkpoints_refused", tried=1, held=int(held), lost=0,
           attacker="storage admin holding the volume key", error=refused.value.message)
    assert held, message
    assert "Fix:" in message


def test_an_unsigned_checkpoint_between_signed_ones_is_skipped_quietly(tmp_path: Path) -> None:
    """An unsigned checkpoint older than the newest signed one is no problem: it is not the
    model either way (the signed head is returned)."""
    passphrase, (key, pem) = new_passphrase(), ps_identity()
    path = tmp_path / "model.luks"
    with make_vault(path, passphrase) as vault:
        vault.write_checkpoint(1, weights(1), {}, entry(key, pem, 0.5))
        vault.write_checkpoint(2, weights(2), {})
        vault.write_checkpoint(3, weights(3), {}, entry(key, pem, 0.3))

    retrieved = retrieve_as_owner(None, owner_state(tmp_path, passphrase), path, [pem],
                                  data_path="userspace")

    assert retrieved.step == 3 and retrieved.provenance.ok and retrieved.problems == ()
    assert retrieved.provenance.unsigned_steps == [2]
