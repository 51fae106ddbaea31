"""Create → write checkpoints → close → reopen gives back byte-identical files (user-space path)."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from hfl_lab._exceptions import VaultError
from hfl_lab.vault import DirectoryCheckpointStore, ModelVault, new_passphrase
from tests.vault_support import FAST_KDF, make_vault, needs_cryptsetup, weights

pytestmark = needs_cryptsetup


@pytest.mark.parametrize("luks_version", [1, 2])
def test_checkpoints_survive_close_and_reopen(tmp_path: Path, luks_version: int) -> None:
    # Arrange
    volume, passphrase = tmp_path / "model.luks", new_passphrase()
    payloads = {step: weights(step) for step in (10, 20, 30)}
    with make_vault(volume, passphrase, luks_version=luks_version) as vault:
        for step, payload in payloads.items():
            vault.write_checkpoint(step, payload, {"metrics": {"loss": 1.0 / step}})
        vault.write_file("config.json", b'{"lr": 0.1}')
        assert vault.data_path_kind == "userspace"

    # Act
    with ModelVault.open(volume, passphrase, path_kind="userspace") as reopened:
        latest = reopened.latest_checkpoint()
        older = reopened.checkpoint(10)
        listed = reopened.list_checkpoints()
        config = reopened.read_file("config.json")

    # Assert
    assert latest.step == 30 and latest.payload == payloads[30]
    assert latest.metadata == {"metrics": {"loss": 1.0 / 30}}
    assert older.payload == payloads[10]
    assert [info.step for info in listed] == [10, 20, 30]
    assert all(info.problem is None for info in listed)
    assert config == b'{"lr": 0.1}'


def test_keep_last_drops_oldest_checkpoints(tmp_path: Path) -> None:
    with make_vault(tmp_path / "v.luks", keep_last=2) as vault:
        for step in range(1, 5):
            vault.write_checkpoint(step, weights(step, 50_000), {})

        steps = [info.step for info in vault.list_checkpoints()]

    assert steps == [3, 4]


def test_read_only_open_leaves_the_file_unchanged(tmp_path: Path) -> None:
    volume, passphrase = tmp_path / "v.luks", new_passphrase()
    with make_vault(volume, passphrase) as vault:
        vault.write_checkpoint(1, weights(1), {})
    before = hashlib.sha256(volume.read_bytes()).hexdigest()

    with ModelVault.open(volume, passphrase, path_kind="userspace", read_only=True) as vault:
        assert vault.latest_checkpoint().step == 1
        with pytest.raises(VaultError, match="read-only"):
            vault.write_checkpoint(2, b"x", {})

    assert hashlib.sha256(volume.read_bytes()).hexdigest() == before


def test_large_checkpoint_and_many_small_ones(tmp_path: Path) -> None:
    big = weights(0, 6 * 1024 * 1024)
    with make_vault(tmp_path / "v.luks") as vault:
        vault.write_checkpoint(0, big, {})
        for step in range(1, 6):
            vault.write_checkpoint(step, bytes([step]) * 1000, {"step": step})

        assert vault.checkpoint(0).payload == big
        assert vault.latest_checkpoint().payload == bytes([5]) * 1000


def test_refusals_are_clear(tmp_path: Path) -> None:
    volume = tmp_path / "v.luks"
    with pytest.raises(VaultError, match="at least 32 random bytes"):
        ModelVault.create(volume, b"short", 12, path_kind="userspace")
    with make_vault(volume) as vault:
        vault.write_checkpoint(1, b"a", {})
        with pytest.raises(VaultError, match="already holds a checkpoint for step 1"):
            vault.write_checkpoint(1, b"b", {})
        with pytest.raises(VaultError, match="not plain JSON"):
            vault.write_checkpoint(2, b"b", {"bad": object()})
        with pytest.raises(VaultError, match="invalid file name"):
            vault.write_file("../escape", b"x")
    with pytest.raises(VaultError, match="never overwritten"):
        ModelVault.create(
            volume, new_passphrase(), 12, path_kind="userspace", kdf_iterations=FAST_KDF
        )


def test_a_full_volume_refuses_the_write_and_keeps_what_it_had(tmp_path: Path) -> None:
    volume, passphrase = tmp_path / "v.luks", new_passphrase()
    with make_vault(volume, passphrase) as vault:
        vault.write_checkpoint(1, weights(1), {})

        with pytest.raises(VaultError, match="the volume is full"):
            vault.write_checkpoint(2, weights(2, 20 * 1024 * 1024), {})
        vault.write_checkpoint(3, b"small", {})

    with ModelVault.open(volume, passphrase, path_kind="userspace") as vault:
        assert [info.step for info in vault.list_checkpoints()] == [1, 3]
        assert vault.checkpoint(1).payload[-8:] == (1).to_bytes(8, "little")


def test_directory_store_round_trip_and_corruption(tmp_path: Path) -> None:
    store = DirectoryCheckpointStore(tmp_path / "ckpt")
    store.save(1, b"one" * 1000, {"metrics": {"loss": 2.0}})
    store.save(2, b"two" * 1000, {"metrics": {"loss": 1.0}})
    payload_file = tmp_path / "ckpt" / "checkpoints" / "step-000000000002.bin"
    payload_file.write_bytes(b"twO" + payload_file.read_bytes()[3:])

    latest = DirectoryCheckpointStore(tmp_path / "ckpt").load_latest()

    assert latest is not None and latest.step == 1 and latest.payload == b"one" * 1000
