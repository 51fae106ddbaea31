"""Independent tools accept what the user-space path writes: cryptsetup and libluksde."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from hfl_lab.vault import new_passphrase
from hfl_lab.vault.cryptsetup import cryptsetup_binary, dump_volume_key, passphrase_opens
from hfl_lab.vault.ext4_image import memfd_with
from hfl_lab.vault.userspace import UserspaceVolume
from tests.vault_support import make_vault, needs_cryptsetup, weights

pytestmark = needs_cryptsetup


def written_volume(tmp_path: Path, luks_version: int) -> tuple[Path, bytes, bytes, bytes]:
    """A volume with one checkpoint; returns (path, passphrase, volume key, plaintext image)."""
    path, passphrase = tmp_path / f"v{luks_version}.luks", new_passphrase()
    with make_vault(path, passphrase, luks_version=luks_version) as vault:
        vault.write_checkpoint(7, weights(7), {"metrics": {"loss": 0.5}})
        volume = vault.files
        assert isinstance(volume, UserspaceVolume)
        image = bytes(volume.image.bytes)
        key = volume.volume_key
    return path, passphrase, key, image


@pytest.mark.parametrize("luks_version", [1, 2])
def test_cryptsetup_accepts_header_and_passphrase(tmp_path: Path, luks_version: int) -> None:
    path, passphrase, key, _ = written_volume(tmp_path, luks_version)

    dump = subprocess.run(
        [cryptsetup_binary(), "luksDump", str(path)], capture_output=True, text=True, check=False
    )

    assert dump.returncode == 0 and f"Version:       \t{luks_version}" in dump.stdout
    assert passphrase_opens(path, passphrase)
    assert not passphrase_opens(path, new_passphrase())
    # the key the Python code derived is the one cryptsetup derives
    assert bytes(dump_volume_key(path, passphrase)) == key


def test_libluksde_decrypts_the_luks1_data_segment_to_the_image(tmp_path: Path) -> None:
    pyluksde = pytest.importorskip("pyluksde")
    path, passphrase, _, image = written_volume(tmp_path, 1)

    volume = pyluksde.volume()
    volume.open(str(path))
    volume.set_password(passphrase.decode())
    unlocked = volume.unlock()
    decrypted = volume.read_buffer_at_offset(volume.get_size(), 0)
    volume.close()

    assert unlocked
    assert decrypted == image


def test_luks2_data_segment_matches_cryptography_xts(tmp_path: Path) -> None:
    # libluksde reads LUKS1 only, so LUKS2 is checked with cryptsetup's volume key and the
    # cryptography package's own XTS, sector by sector.
    path, passphrase, _, image = written_volume(tmp_path, 2)
    key = bytes(dump_volume_key(path, passphrase))
    dump = subprocess.run(
        [cryptsetup_binary(), "luksDump", str(path)], capture_output=True, text=True, check=True
    ).stdout
    offset = int(dump.split("offset: ")[1].split(" [bytes]")[0])
    data = path.read_bytes()[offset:]

    sectors = [0, 1, 2, 100, len(data) // 512 - 1, *range(2048, 2300)]
    for sector in sectors:
        tweak = sector.to_bytes(16, "little")
        plain = (
            Cipher(algorithms.AES(key), modes.XTS(tweak))
            .decryptor()
            .update(data[sector * 512 : (sector + 1) * 512])
        )
        assert plain == image[sector * 512 : (sector + 1) * 512], sector
    assert len(data) == len(image)


def test_ext4_inside_passes_e2fsck(tmp_path: Path) -> None:
    _, _, _, image = written_volume(tmp_path, 1)

    with memfd_with(image) as fd:
        result = subprocess.run(
            ["e2fsck", "-fn", f"/proc/self/fd/{fd}"],
            pass_fds=[fd],
            capture_output=True,
            text=True,
            check=False,
        )

    assert result.returncode == 0, result.stdout + result.stderr
