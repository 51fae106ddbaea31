"""Big files the user-space vault allocates itself: stock tools read the volume as usual."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from hfl_lab.vault import ModelVault, image_changes, journal, new_passphrase
from hfl_lab.vault.ext4_bitmap import used_blocks
from hfl_lab.vault.ext4_image import memfd_with
from hfl_lab.vault.extents import leaf_extents
from hfl_lab.vault.userspace import UserspaceVolume
from hfl_lab.vault.xts import SECTOR_SIZE, TWEAK_WINDOW_SECTORS, XtsCipher
from tests.vault_support import FAST_KDF, make_vault, needs_cryptsetup, weights

EX_ONE_EXTENT = """Level Entries       Logical      Physical Length Flags
 0/ 0   1/  1     0 - 24414  4140 - 28554  24415 Uninit
"""
EX_TWO_EXTENTS = """Level Entries       Logical      Physical Length Flags
 0/ 0   1/  2     0 -     9  5000 -  5009     10 Uninit
 0/ 0   2/  2    10 -    19  7000 -  7009     10 Uninit
"""
EX_DEEP_TREE = """Level Entries       Logical      Physical Length Flags
 0/ 1   1/  1     0 -    19  6000             20
 1/ 1   1/  2     0 -     9  5000 -  5009     10 Uninit
 1/ 1   2/  2    10 -    19  7000 -  7009     10 Uninit
"""


def fsck(volume: UserspaceVolume) -> subprocess.CompletedProcess[str]:
    """e2fsck -fn on the decrypted image, which never leaves memory."""
    with memfd_with(bytes(volume.image.bytes)) as fd:
        return subprocess.run(
            ["e2fsck", "-fn", f"/proc/self/fd/{fd}"],
            pass_fds=[fd], capture_output=True, text=True, check=False,
        )


def extent_table(volume: UserspaceVolume, path: str) -> str:
    with memfd_with(bytes(volume.image.bytes)) as fd:
        return subprocess.run(
            ["debugfs", "-R", f"ex {path}", f"/proc/self/fd/{fd}"],
            pass_fds=[fd], capture_output=True, text=True, check=True,
        ).stdout


def test_cached_tweaks_encrypt_like_the_reference_across_windows() -> None:
    # Arrange: a run that starts just before a window boundary and spans three windows
    key = os.urandom(64)
    first = 3 * TWEAK_WINDOW_SECTORS - 100
    count = TWEAK_WINDOW_SECTORS + 300
    data = os.urandom(count * SECTOR_SIZE)
    cached = XtsCipher(key, tweak_cache_bytes=2 * TWEAK_WINDOW_SECTORS * SECTOR_SIZE)
    out, again = bytearray(len(data)), bytearray(len(data))

    # Act: the second call finds one window evicted (budget of two) and two cached
    cached.encrypt_run(data, out, first)
    cached.encrypt_run(data, again, first)

    # Assert
    assert out == XtsCipher(key).encrypt(data, first) == again
    for index in (0, 99, 100, count - 1):
        tweak = (first + index).to_bytes(16, "little")
        reference = Cipher(algorithms.AES(key), modes.XTS(tweak)).encryptor()
        sector = slice(index * SECTOR_SIZE, (index + 1) * SECTOR_SIZE)
        assert bytes(out[sector]) == reference.update(data[sector]), index
    back = bytearray(len(data))
    sectors = np.arange(first, first + count, dtype=np.uint64)
    XtsCipher(key).decrypt_into(out, back, sectors)
    assert back == data


def test_the_extent_table_is_read_only_when_the_extents_sit_in_the_inode() -> None:
    one = leaf_extents(EX_ONE_EXTENT, 24415)
    two = leaf_extents(EX_TWO_EXTENTS, 20)

    assert one is not None and [(e, x.physical, x.length, x.uninit) for e, x in one] == [
        (0, 4140, 24415, True)
    ]
    assert two is not None and [e for e, _ in two] == [0, 1]
    assert leaf_extents(EX_DEEP_TREE, 20) is None  # extents in a tree block: not in i_block
    assert leaf_extents(EX_TWO_EXTENTS, 21) is None  # not the blocks that were asked for
    assert leaf_extents("", 1) is None


@needs_cryptsetup
def test_many_big_writes_leave_a_volume_cryptsetup_and_e2fsck_accept(tmp_path: Path) -> None:
    # Arrange / Act: checkpoints taking turns in the same blocks (keep_last=1), then reopen
    path, passphrase = tmp_path / "v.luks", new_passphrase()
    payloads = {step: weights(step, 1_000_000 + 4096 * step + step) for step in range(1, 9)}
    with make_vault(path, passphrase, keep_last=1) as vault:
        for step, payload in payloads.items():
            vault.write_checkpoint(step, payload, {"step": step})
    with ModelVault.open(path, passphrase, path_kind="userspace", read_only=True) as vault:
        files = vault.files
        assert isinstance(files, UserspaceVolume)
        check = fsck(files)
        table = extent_table(files, "/checkpoints/step-000000000008.bin")
        steps = [info.step for info in vault.list_checkpoints()]
        latest = vault.latest_checkpoint()

    # Assert: stock tools accept the volume, the file's extents read as data, the data is right
    assert check.returncode == 0, check.stdout + check.stderr
    blocks = -(-len(payloads[8]) // 4096)
    assert "Uninit" not in table and leaf_extents(table, blocks) is not None, table
    assert steps == [8] and latest.payload == payloads[8]
    dump = subprocess.run(["cryptsetup", "luksDump", str(path)], capture_output=True, check=True)
    assert b"aes" in dump.stdout
    opened = subprocess.run(
        ["cryptsetup", "open", "--test-passphrase", "--key-file", "-", str(path)],
        input=passphrase, capture_output=True, check=False,
    )
    assert opened.returncode == 0, opened.stderr


@needs_cryptsetup
def test_writes_of_other_sizes_read_back_after_reopening(tmp_path: Path) -> None:
    # Arrange: big, smaller (not a whole number of blocks), bigger again, and a small file
    path, passphrase = tmp_path / "v.luks", new_passphrase()
    sizes = {1: 2_000_000, 2: 300_001, 3: 3_000_000, 4: 1000}
    payloads = {step: weights(step, size) for step, size in sizes.items()}

    # Act
    with make_vault(path, passphrase, keep_last=2) as vault:
        for step, payload in payloads.items():
            vault.write_checkpoint(step, payload, {"step": step})
            vault.write_file("state.bin", payload[::-1])
    with ModelVault.open(path, passphrase, path_kind="userspace") as vault:
        read = {step: vault.checkpoint(step).payload for step in (3, 4)}
        state = vault.read_file("state.bin")
        files = vault.files
        assert isinstance(files, UserspaceVolume)
        check = fsck(files)

    # Assert
    assert read == {3: payloads[3], 4: payloads[4]} and state == payloads[4][::-1]
    assert check.returncode == 0, check.stdout + check.stderr


@needs_cryptsetup
def test_an_allocation_too_fragmented_for_the_inode_is_written_by_debugfs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Arrange: every allocation reads as one that needs an extent tree block
    monkeypatch.setattr(image_changes, "leaf_extents", lambda table, blocks: None)
    path, passphrase = tmp_path / "v.luks", new_passphrase()
    payload, blob, old_state = weights(1, 1_500_000), os.urandom(800_000), os.urandom(700_000)
    journaled: list[int] = []
    real_commit = journal.commit

    def spy(*args: Any, **kwargs: Any) -> None:
        journaled.append(sum(len(run.data) for run in args[3]))
        real_commit(*args, **kwargs)

    # Act: a checkpoint; then a fresh big file in the commit that replaces another one
    with make_vault(path, passphrase) as vault:
        vault.write_checkpoint(1, payload, {})
        vault.files.commit([("files/state.bin", old_state)])
        monkeypatch.setattr(journal, "commit", spy)
        vault.files.commit([("files/state.bin", os.urandom(700_000)), ("files/blob.bin", blob)])
    with ModelVault.open(path, passphrase, path_kind="userspace", read_only=True) as vault:
        latest = vault.latest_checkpoint()
        read = vault.read_file("blob.bin")
        files = vault.files
        assert isinstance(files, UserspaceVolume)
        check = fsck(files)

    # Assert: the data debugfs rewrote after the replaced file's removal, which may sit in
    # blocks that file still had on disk, went through the journal, not straight to them
    assert latest.payload == payload and read == blob
    assert journaled and journaled[0] >= len(blob)
    assert check.returncode == 0, check.stdout + check.stderr


@needs_cryptsetup
def test_a_big_file_replaced_in_place_keeps_the_volume_consistent(tmp_path: Path) -> None:
    # Arrange: the same big file written again (rm + allocate), as write_file does
    path, passphrase = tmp_path / "v.luks", new_passphrase()
    first, second = os.urandom(700_000), os.urandom(900_000)

    # Act
    with ModelVault.create(path, passphrase, 12, path_kind="userspace",
                           kdf_iterations=FAST_KDF) as vault:
        vault.write_file("blob.bin", first)
        vault.write_file("blob.bin", second)
    with ModelVault.open(path, passphrase, path_kind="userspace", read_only=True) as vault:
        blob = vault.read_file("blob.bin")
        files = vault.files
        assert isinstance(files, UserspaceVolume)
        check = fsck(files)

    # Assert
    assert blob == second
    assert check.returncode == 0, check.stdout + check.stderr


@needs_cryptsetup
@pytest.mark.parametrize("size_mb", [12, 300])  # one block group; several, and an ext4 journal
def test_the_block_bitmaps_read_as_debugfs_reads_them(tmp_path: Path, size_mb: int) -> None:
    # Arrange: a volume with files written and deleted, so used and free blocks interleave
    with ModelVault.create(tmp_path / "v.luks", new_passphrase(), size_mb, path_kind="userspace",
                           kdf_iterations=FAST_KDF, keep_last=1) as vault:
        for step in range(1, 4):
            vault.write_checkpoint(step, weights(step, 400_000), {})
        files = vault.files
        assert isinstance(files, UserspaceVolume)
        image = bytes(files.image.bytes)

    # Act
    used = used_blocks(np.frombuffer(image, dtype=np.uint8))

    # Assert: debugfs's testb agrees on every block
    assert used is not None
    with memfd_with(image) as fd:
        found = subprocess.run(
            ["debugfs", "-R", f"testb 1 {used.size - 1}", f"/proc/self/fd/{fd}"],
            pass_fds=[fd], capture_output=True, text=True, check=True,
        ).stdout
    in_use = {int(line.split()[1]) for line in found.splitlines() if "marked in use" in line}
    assert set(np.flatnonzero(used[1:]) + 1) == in_use  # testb refuses block 0
    assert 0 < len(in_use) < used.size


@needs_cryptsetup
def test_blocks_a_deleted_big_file_freed_serve_small_files_later(tmp_path: Path) -> None:
    # Arrange: a big file, deleted, then small files that take the blocks it had
    path, passphrase = tmp_path / "v.luks", new_passphrase()
    small = {f"s{index}.bin": os.urandom(30_000) + bytes([index]) for index in range(60)}
    with ModelVault.create(path, passphrase, 12, path_kind="userspace",
                           kdf_iterations=FAST_KDF) as vault:
        vault.files.commit([("big/blob.bin", os.urandom(6_000_000))])
        vault.files.commit([], ["big/blob.bin"])

        # Act
        for name, data in small.items():
            vault.write_file(name, data)

    # Assert: after reopening (decrypting what reached the disk) every small file is intact
    with ModelVault.open(path, passphrase, path_kind="userspace", read_only=True) as vault:
        read = {name: vault.read_file(name) for name in small}
        files = vault.files
        assert isinstance(files, UserspaceVolume)
        check = fsck(files)
    assert read == small
    assert check.returncode == 0, check.stdout + check.stderr
