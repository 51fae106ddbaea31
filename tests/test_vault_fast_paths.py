"""The fast paths of the user-space vault give the same bytes as the plain ones."""

from __future__ import annotations

import hashlib
import os
import subprocess
from pathlib import Path

import numpy as np
import pytest
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from hfl_lab._exceptions import VaultError
from hfl_lab.vault import DirectoryCheckpointStore, ModelVault, new_passphrase
from hfl_lab.vault.ext4_image import memfd_with
from hfl_lab.vault.files import DirectoryFiles
from hfl_lab.vault.userspace import UserspaceVolume
from hfl_lab.vault.xts import PARALLEL_MIN_SECTORS, SECTOR_SIZE, XtsCipher
from tests.vault_support import make_vault, needs_cryptsetup, weights


def test_threaded_xts_matches_the_reference_in_place_too() -> None:
    # Arrange: enough sectors for the threaded path, numbered across a 2^32 boundary
    key = os.urandom(64)
    count = PARALLEL_MIN_SECTORS + 1001
    first = 2**32 - 3000
    data = os.urandom(SECTOR_SIZE * count)
    sample = [0, 1, 2999, 3000, count // 2, count - 1]

    # Act
    encrypted = XtsCipher(key).encrypt(data, first)
    buffer = bytearray(encrypted)
    sectors = np.arange(first, first + count, dtype=np.uint64)
    XtsCipher(key).decrypt_into(buffer, buffer, sectors)  # in place, as the open path does

    # Assert
    for index in sample:
        tweak = (first + index).to_bytes(16, "little")
        reference = Cipher(algorithms.AES(key), modes.XTS(tweak)).encryptor()
        chunk = slice(index * SECTOR_SIZE, (index + 1) * SECTOR_SIZE)
        assert bytes(encrypted[chunk]) == reference.update(data[chunk]), index
    assert bytes(buffer) == data


@needs_cryptsetup
def test_reading_a_file_with_holes_gives_its_bytes_and_hash(tmp_path: Path) -> None:
    # debugfs leaves all-zero blocks of a written file unallocated (holes)
    payload = os.urandom(10_000) + bytes(64 * 1024) + os.urandom(5000) + bytes(9000)
    with make_vault(tmp_path / "v.luks") as vault:
        vault.write_checkpoint(1, payload, {})
        files = vault.files
        assert isinstance(files, UserspaceVolume)

        data, digest = files.read_hashed("checkpoints/step-000000000001.bin")

        assert data == payload and digest == hashlib.sha256(payload).hexdigest()
        assert vault.latest_checkpoint().payload == payload


@needs_cryptsetup
def test_failing_deferred_contents_leave_the_volume_as_it_was(tmp_path: Path) -> None:
    path, passphrase = tmp_path / "v.luks", new_passphrase()

    def broken() -> bytes:
        raise VaultError("metadata could not be made.")

    with make_vault(path, passphrase) as vault:
        vault.write_checkpoint(1, weights(1), {})
        with pytest.raises(VaultError, match="could not be made"):
            vault.files.commit(
                [("files/big.bin", weights(2)), ("files/meta.json", broken)],
                ["checkpoints/step-000000000001.json"],
            )
        assert vault.files.list_dir("files") == {}  # no answer about the rolled-back image
        vault.files.commit([("files/late.json", lambda: b"{}")])

    with ModelVault.open(path, passphrase, path_kind="userspace") as vault:
        assert vault.files.list_dir("files") == {"late.json": 2}
        assert vault.latest_checkpoint().step == 1


def test_directory_files_make_deferred_contents_in_order(tmp_path: Path) -> None:
    files = DirectoryFiles(tmp_path)
    seen: list[str] = []

    def second() -> bytes:
        seen.append(sorted(os.listdir(tmp_path / "a"))[0])
        return b"2"

    files.commit([("a/one", b"1"), ("a/two", second)])

    assert seen == ["one"] and files.read("a/two") == b"2"
    store = DirectoryCheckpointStore(tmp_path / "store")
    store.save(4, b"weights", {"metrics": {"loss": 1.0}})
    latest = store.load_latest()
    assert latest is not None and latest.payload_sha256 == hashlib.sha256(b"weights").hexdigest()


@needs_cryptsetup
def test_many_commits_keep_the_file_system_consistent(tmp_path: Path) -> None:
    # Arrange / Act: fresh, replaced and expired files, big and small, across many commits
    path, passphrase = tmp_path / "v.luks", new_passphrase()
    payloads = {step: weights(step, 700_000) for step in range(1, 7)}
    with make_vault(path, passphrase, keep_last=2) as vault:
        for step, payload in payloads.items():
            vault.write_checkpoint(step, payload, {"step": step})
            vault.write_file("state.json", str(step).encode() * 1000)
    with ModelVault.open(path, passphrase, path_kind="userspace", read_only=True) as vault:
        files = vault.files
        assert isinstance(files, UserspaceVolume)
        image = bytes(files.image.bytes)
        steps = [info.step for info in vault.list_checkpoints()]
        latest = vault.latest_checkpoint()

    # Assert: e2fsck (an independent reader) finds nothing wrong, and the data is right
    with memfd_with(image) as fd:
        check = subprocess.run(
            ["e2fsck", "-fn", f"/proc/self/fd/{fd}"],
            pass_fds=[fd], capture_output=True, text=True, check=False,
        )
    assert check.returncode == 0, check.stdout + check.stderr
    assert steps == [5, 6] and latest.payload == payloads[6]
