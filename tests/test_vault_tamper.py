"""Wrong keys, flipped bytes and truncated files are refused with a clear VaultError."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from hfl_lab._exceptions import VaultError
from hfl_lab.vault import ModelVault, new_passphrase
from hfl_lab.vault.userspace import UserspaceVolume
from tests.vault_support import make_vault, needs_cryptsetup, weights

pytestmark = needs_cryptsetup

PAYLOAD = "checkpoints/step-000000000002.bin"


@pytest.fixture
def volume(tmp_path: Path) -> tuple[Path, bytes]:
    path, passphrase = tmp_path / "v.luks", new_passphrase()
    with make_vault(path, passphrase) as vault:
        vault.write_checkpoint(1, weights(1), {"metrics": {"loss": 2.0}})
        vault.write_checkpoint(2, weights(2), {"metrics": {"loss": 1.0}})
    return path, passphrase


def flip_byte(path: Path, offset: int) -> None:
    with path.open("r+b") as stream:
        stream.seek(offset)
        byte = stream.read(1)
        stream.seek(offset)
        stream.write(bytes([byte[0] ^ 0x01]))


def test_wrong_passphrase_is_a_clear_error(volume: tuple[Path, bytes]) -> None:
    path, _ = volume
    with pytest.raises(VaultError, match="passphrase does not open any key slot"):
        ModelVault.open(path, new_passphrase(), path_kind="userspace")


def test_flipped_ciphertext_byte_in_a_checkpoint_is_detected(volume: tuple[Path, bytes]) -> None:
    # Arrange: flip one bit in the encrypted sectors that hold step 2's weights
    path, passphrase = volume
    with ModelVault.open(path, passphrase, path_kind="userspace", read_only=True) as vault:
        assert isinstance(vault.files, UserspaceVolume)
        offset, length = vault.files.locate(PAYLOAD)[0]
    flip_byte(path, offset + length // 3)

    # Act / Assert: the strict read refuses, the fallback read skips to step 1 and says so
    with ModelVault.open(path, passphrase, path_kind="userspace") as vault:
        with pytest.raises(VaultError, match="step 2 is corrupt or was tampered with"):
            vault.latest_checkpoint()
        assert vault.latest_checkpoint(skip_corrupt=True).step == 1


def test_edited_payload_inside_the_volume_is_detected(volume: tuple[Path, bytes]) -> None:
    path, passphrase = volume
    with ModelVault.open(path, passphrase, path_kind="userspace") as vault:
        original = vault.files.read(PAYLOAD)
        vault.files.commit([(PAYLOAD, bytes([original[0] ^ 0x80]) + original[1:])])

        with pytest.raises(VaultError, match="payload does not match the hash"):
            vault.latest_checkpoint()


def test_edited_metadata_fails_its_mac(volume: tuple[Path, bytes]) -> None:
    path, passphrase = volume
    meta_path = PAYLOAD.replace(".bin", ".json")
    with ModelVault.open(path, passphrase, path_kind="userspace") as vault:
        meta = json.loads(vault.files.read(meta_path))
        meta["metadata"]["metrics"]["loss"] = 0.001
        vault.files.commit([(meta_path, json.dumps(meta).encode())])

        listed = {info.step: info.problem for info in vault.list_checkpoints()}
        with pytest.raises(VaultError, match="MAC does not verify"):
            vault.latest_checkpoint()

    assert listed[1] is None and listed[2] is not None


@pytest.mark.parametrize("cut", [1, 4096, 3 * 1024 * 1024, 11 * 1024 * 1024 + 100])
def test_truncated_volume_is_a_clear_error(volume: tuple[Path, bytes], cut: int) -> None:
    path, passphrase = volume
    os.truncate(path, path.stat().st_size - cut)

    with pytest.raises(VaultError, match="truncated"):
        ModelVault.open(path, passphrase, path_kind="userspace")


def test_not_a_luks_file_is_a_clear_error(tmp_path: Path) -> None:
    path = tmp_path / "random.bin"
    path.write_bytes(os.urandom(1 << 20))

    with pytest.raises(VaultError, match="not a LUKS volume"):
        ModelVault.open(path, new_passphrase(), path_kind="userspace")


def test_second_writer_is_refused(volume: tuple[Path, bytes]) -> None:
    path, passphrase = volume
    with (
        ModelVault.open(path, passphrase, path_kind="userspace"),
        pytest.raises(VaultError, match="open for writing by another"),
    ):
        ModelVault.open(path, passphrase, path_kind="userspace")
