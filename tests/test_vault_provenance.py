"""The signed, hash-chained provenance log verifies offline, and any break is reported."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest

from hfl_lab._exceptions import VaultError
from hfl_lab.vault import ModelVault, new_passphrase, retrieve_model
from tests.vault_support import entry, make_vault, needs_cryptsetup, ps_identity, weights

pytestmark = needs_cryptsetup

RECORD = "provenance/{:012d}.json"
Signed = tuple[Path, bytes, bytes, dict[int, bytes]]


@pytest.fixture
def signed_volume(tmp_path: Path) -> Signed:
    path, passphrase = tmp_path / "v.luks", new_passphrase()
    key, pem = ps_identity()
    payloads = {step: weights(step, 40_000) for step in (1, 2, 3)}
    with make_vault(path, passphrase) as vault:
        for step, payload in payloads.items():
            vault.write_checkpoint(step, payload, {"epoch": step}, entry(key, pem, 1.0 / step))
    return path, passphrase, pem, payloads


def test_intact_chain_verifies_and_retrieval_returns_the_model(signed_volume: Signed) -> None:
    path, passphrase, pem, payloads = signed_volume

    model = retrieve_model(path, passphrase, [pem], path_kind="userspace")

    assert model.provenance.ok, model.provenance.problems
    assert model.provenance.verified_steps == [1, 2, 3]
    assert model.step == 3 and model.payload == payloads[3]
    assert model.metadata == {"epoch": 3}
    assert model.written_by == "ps0"
    assert model.data_path_kind == "userspace"


Records = dict[int, bytes]
Change = Callable[[Records], tuple[list[tuple[str, bytes]], list[str]]]


def edit_records(path: Path, passphrase: bytes, change: Change) -> None:
    with ModelVault.open(path, passphrase, path_kind="userspace") as vault:
        records = {i: vault.files.read(RECORD.format(i)) for i in range(3)}
        writes, deletes = change(records)
        vault.files.commit(writes, deletes)


def problems(path: Path, passphrase: bytes, pem: bytes) -> list[str]:
    with ModelVault.open(path, passphrase, path_kind="userspace", read_only=True) as vault:
        report = vault.verify_provenance([pem])
    assert not report.ok
    return report.problems


def test_removed_record_breaks_the_chain(signed_volume: Signed) -> None:
    path, passphrase, pem, _ = signed_volume
    edit_records(path, passphrase, lambda r: ([], [RECORD.format(1)]))

    found = " ".join(problems(path, passphrase, pem))

    assert "removed or reordered" in found


def test_removed_last_record_breaks_the_chain(signed_volume: Signed) -> None:
    path, passphrase, pem, _ = signed_volume
    edit_records(path, passphrase, lambda r: ([], [RECORD.format(2)]))

    found = " ".join(problems(path, passphrase, pem))

    assert "step 3 refers to provenance record 2, which is missing" in found


def test_reordered_records_break_the_chain(signed_volume: Signed) -> None:
    path, passphrase, pem, _ = signed_volume
    edit_records(
        path, passphrase, lambda r: ([(RECORD.format(0), r[1]), (RECORD.format(1), r[0])], [])
    )

    found = " ".join(problems(path, passphrase, pem))

    assert "removed or reordered" in found


def test_edited_record_breaks_its_signature(signed_volume: Signed) -> None:
    path, passphrase, pem, _ = signed_volume

    def better_loss(records: dict[int, bytes]) -> tuple[list[tuple[str, bytes]], list[str]]:
        record = json.loads(records[1])
        record["metrics"]["loss"] = 0.0001
        return [(RECORD.format(1), json.dumps(record).encode())], []

    edit_records(path, passphrase, better_loss)

    found = " ".join(problems(path, passphrase, pem))

    assert "signature that does not verify" in found


def test_weights_from_another_run_are_detected(signed_volume: Signed, tmp_path: Path) -> None:
    # Arrange: a second run, signed by the same PS key, whose step-3 weights are swapped in
    path, passphrase, pem, _ = signed_volume
    other_path, other_pass = tmp_path / "other.luks", new_passphrase()
    key, other_pem = ps_identity()
    with make_vault(other_path, other_pass) as other:
        other.write_checkpoint(3, weights(3, 40_000), {}, entry(key, other_pem, 0.1))
        foreign = other.files.read("checkpoints/step-000000000003.bin")
    with ModelVault.open(path, passphrase, path_kind="userspace") as vault:
        vault.files.commit([("checkpoints/step-000000000003.bin", foreign)])

    # Act
    found = " ".join(problems(path, passphrase, pem))

    # Assert
    assert "weights were swapped" in found
    with pytest.raises(VaultError, match="provenance broken"):
        retrieve_model(path, passphrase, [pem], path_kind="userspace")


def test_untrusted_signer_is_reported(signed_volume: Signed) -> None:
    path, passphrase, _, _ = signed_volume
    _, stranger = ps_identity("ps-evil")

    found = " ".join(problems(path, passphrase, stranger))

    assert "not a trusted PS key" in found


def test_record_chain_of_another_volume_does_not_verify(
    signed_volume: Signed, tmp_path: Path
) -> None:
    # The genesis hash binds the chain to the volume UUID: a whole log copied over fails.
    path, passphrase, pem, _ = signed_volume
    key, other_pem = ps_identity()
    other_path, other_pass = tmp_path / "other.luks", new_passphrase()
    with make_vault(other_path, other_pass) as other:
        for step in (1, 2, 3):
            other.write_checkpoint(step, weights(step, 1000), {}, entry(key, other_pem, 1.0))
        copied = [(RECORD.format(i), other.files.read(RECORD.format(i))) for i in range(3)]
    with ModelVault.open(path, passphrase, path_kind="userspace") as vault:
        vault.files.commit(copied)

    with ModelVault.open(path, passphrase, path_kind="userspace", read_only=True) as vault:
        report = vault.verify_provenance([pem, other_pem])

    assert not report.ok
    assert "record 0" in report.problems[0] and "does not chain" in report.problems[0]


def test_mismatched_signer_pem_is_refused(tmp_path: Path) -> None:
    key, _ = ps_identity()
    _, other_pem = ps_identity()
    with make_vault(tmp_path / "v.luks") as vault, pytest.raises(VaultError, match="not match"):
        vault.write_checkpoint(1, b"w", {}, entry(key, other_pem, 1.0))
