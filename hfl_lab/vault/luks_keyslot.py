"""Turn a passphrase into the LUKS volume key in memory: PBKDF2, key-material decryption, AF-merge.

LUKS1 spec §2.4 (master key recovery) and §2.5 (AF-splitter, ``diffuse``); LUKS2 keeps the same
scheme for pbkdf2 key slots with ``af.type == "luks1"``. Doing this in Python means no secret ever
crosses a process boundary or touches disk.
"""

from __future__ import annotations

import hashlib
import hmac
import struct
from typing import BinaryIO

from hfl_lab._exceptions import VaultError
from hfl_lab.vault.luks_header import KeySlot, LuksHeader
from hfl_lab.vault.xts import SECTOR_SIZE, XtsCipher

SUPPORTED_CIPHER = "aes-xts-plain64"


def unlock_volume_key(header: LuksHeader, stream: BinaryIO, passphrase: bytes) -> bytearray:
    """Return the volume key that ``passphrase`` opens, or raise ``VaultError``."""
    _require_cipher(header.cipher)
    unsupported = [slot for slot in header.slots if slot.kdf != "pbkdf2"]
    for slot in header.slots:
        if slot.kdf != "pbkdf2":
            continue
        candidate = _open_slot(slot, stream, passphrase, header.key_bytes)
        if check_volume_key(header, candidate):
            return candidate
    if unsupported and len(unsupported) == len(header.slots):
        raise VaultError(
            f"the key slots use {unsupported[0].kdf}, which the user-space path does not support.",
            fix="create the volume with ModelVault.create (pbkdf2) or open it on the kernel path.",
        )
    raise VaultError(
        "the passphrase does not open any key slot of this volume.",
        fix="use the passphrase the key broker released for this volume.",
    )


def check_volume_key(header: LuksHeader, key: bytes | bytearray) -> bool:
    """True when ``key`` matches the header's volume key digest (spec §2.4, mk-digest)."""
    digest = hashlib.pbkdf2_hmac(
        header.digest_hash,
        bytes(key),
        header.digest_salt,
        header.digest_iterations,
        len(header.digest),
    )
    return hmac.compare_digest(digest, header.digest)


def _require_cipher(cipher: str) -> None:
    if cipher != SUPPORTED_CIPHER:
        raise VaultError(
            f"the volume uses cipher {cipher}; the user-space path reads {SUPPORTED_CIPHER} only.",
            fix="open this volume on the kernel data path (cryptsetup open).",
        )


def _open_slot(slot: KeySlot, stream: BinaryIO, passphrase: bytes, key_bytes: int) -> bytearray:
    _require_cipher(slot.cipher)
    slot_key = hashlib.pbkdf2_hmac(
        slot.kdf_hash, passphrase, slot.salt, slot.iterations, slot.key_bytes
    )
    length = key_bytes * slot.stripes
    padded = -(-length // SECTOR_SIZE) * SECTOR_SIZE
    stream.seek(slot.material_offset)
    material = stream.read(padded)
    if len(material) != padded:
        raise VaultError(
            f"the volume file is truncated inside key slot {slot.index}.",
            fix="copy the complete volume file again (compare its size with the original).",
        )
    # Key material sectors are numbered from 0 at the start of the slot's area.
    split = XtsCipher(slot_key).decrypt(material, 0)
    return af_merge(memoryview(split)[:length], key_bytes, slot.stripes, slot.af_hash)


def af_merge(split: memoryview | bytes, key_bytes: int, stripes: int, hash_name: str) -> bytearray:
    """LUKS AF-merge (spec §2.5): d = H(d ⊕ s_i) over stripes 0..n-2, key = d ⊕ s_{n-1}."""
    if len(split) != key_bytes * stripes:
        raise VaultError("key material has the wrong size.", fix="use an intact LUKS volume.")
    block = bytearray(key_bytes)
    for stripe in range(stripes - 1):
        chunk = split[stripe * key_bytes : (stripe + 1) * key_bytes]
        mixed = (int.from_bytes(block) ^ int.from_bytes(chunk)).to_bytes(key_bytes)
        block = _diffuse(mixed, hash_name)
    last = split[(stripes - 1) * key_bytes :]
    return bytearray((int.from_bytes(block) ^ int.from_bytes(last)).to_bytes(key_bytes))


def _diffuse(block: bytes, hash_name: str) -> bytearray:
    """Spec §2.5 ``diffuse``: hash each digest-sized piece with its big-endian index first."""
    size = hashlib.new(hash_name).digest_size
    out = bytearray()
    for index, start in enumerate(range(0, len(block), size)):
        piece = block[start : start + size]
        out += hashlib.new(hash_name, struct.pack(">I", index) + piece).digest()[: len(piece)]
    return out
