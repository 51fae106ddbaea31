"""The vectorized aes-xts-plain64 matches the cryptography package's XTS, sector by sector."""

from __future__ import annotations

import os

import numpy as np
import pytest
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from hfl_lab._exceptions import VaultError
from hfl_lab.vault.xts import SECTOR_SIZE, XtsCipher


def reference(key: bytes, data: bytes, sectors: list[int], encrypt: bool) -> bytes:
    out = []
    for index, sector in enumerate(sectors):
        cipher = Cipher(algorithms.AES(key), modes.XTS(sector.to_bytes(16, "little")))
        ctx = cipher.encryptor() if encrypt else cipher.decryptor()
        out.append(ctx.update(data[index * SECTOR_SIZE : (index + 1) * SECTOR_SIZE]))
    return b"".join(out)


@pytest.mark.parametrize("key_size", [32, 64])
def test_consecutive_sectors_match_reference(key_size: int) -> None:
    # Arrange: more sectors than one internal slice, starting at a 64-bit sector number
    key = os.urandom(key_size)
    data = os.urandom(SECTOR_SIZE * 5000)
    first = 2**40 + 7

    # Act
    encrypted = XtsCipher(key).encrypt(data, first)

    # Assert
    assert bytes(encrypted) == reference(key, data, list(range(first, first + 5000)), True)
    assert bytes(XtsCipher(key).decrypt(encrypted, first)) == data


def test_scattered_sectors_match_reference() -> None:
    key = os.urandom(64)
    numbers = [0, 1, 9, 4095, 4096, 123456789, 2**63 + 5]
    data = os.urandom(SECTOR_SIZE * len(numbers))
    out = bytearray(len(data))

    XtsCipher(key).decrypt_into(data, out, np.array(numbers, dtype=np.uint64))

    assert bytes(out) == reference(key, data, numbers, False)


def test_partial_sector_is_refused() -> None:
    with pytest.raises(VaultError, match="whole sectors"):
        XtsCipher(os.urandom(64)).encrypt(b"x" * 700, 0)


def test_wrong_key_size_is_refused() -> None:
    with pytest.raises(VaultError, match="32- or 64-byte key"):
        XtsCipher(os.urandom(48))
