"""Read LUKS1 and LUKS2 on-disk headers into one description of key slots and data segment.

LUKS1: "LUKS1 On-Disk Format Specification" v1.2.3 §2.4 (phdr) and §2.5 (key slots).
LUKS2: "LUKS2 On-Disk Format Specification" v1.1.1 §2 (binary header) and §3 (JSON metadata).
"""

from __future__ import annotations

import base64
import hashlib
import json
import struct
from dataclasses import dataclass
from typing import Any, BinaryIO

from hfl_lab._exceptions import VaultError

LUKS_MAGIC = b"LUKS\xba\xbe"
LUKS1_HEADER_SIZE = 592
LUKS2_BINARY_HEADER_SIZE = 4096
_LUKS1_SLOT_ACTIVE = 0x00AC71F3
_LUKS1_SLOTS = 8
_SECTOR = 512


@dataclass(frozen=True)
class KeySlot:
    """One active key slot: how to turn a passphrase into the key that opens its material."""

    index: int
    kdf: str  # "pbkdf2" or an unsupported name such as "argon2id"
    kdf_hash: str
    iterations: int
    salt: bytes
    material_offset: int  # bytes from the start of the file
    stripes: int
    af_hash: str
    cipher: str  # e.g. "aes-xts-plain64"
    key_bytes: int  # size of the key that encrypts the material


@dataclass(frozen=True)
class LuksHeader:
    """What user-space code needs to unlock a volume and read its data segment."""

    version: int
    uuid: str
    cipher: str  # data segment cipher, e.g. "aes-xts-plain64"
    key_bytes: int  # volume key size
    data_offset: int  # bytes
    data_size: int | None  # bytes; None = to the end of the file
    sector_size: int
    iv_tweak: int  # added to the sector number for the IV (LUKS2 segments)
    digest_hash: str
    digest_iterations: int
    digest_salt: bytes
    digest: bytes
    slots: tuple[KeySlot, ...]


def read_header(stream: BinaryIO, file_size: int) -> LuksHeader:
    """Parse the header at the start of ``stream`` (a LUKS volume file of ``file_size`` bytes)."""
    stream.seek(0)
    start = stream.read(len(LUKS_MAGIC) + 2)
    if len(start) < 8 or not start.startswith(LUKS_MAGIC):
        raise VaultError(
            "the file is not a LUKS volume (no LUKS magic at offset 0).",
            fix="pass the volume file written by ModelVault.create or cryptsetup luksFormat.",
        )
    version = struct.unpack(">H", start[6:8])[0]
    if version == 1:
        return _read_luks1(stream, file_size)
    if version == 2:
        return _read_luks2(stream, file_size)
    raise VaultError(f"unsupported LUKS version {version}.", fix="use a LUKS1 or LUKS2 volume.")


def _text(raw: bytes) -> str:
    return raw.split(b"\0", 1)[0].decode("ascii", "replace")


def _truncated(what: str, need: int, have: int) -> VaultError:
    return VaultError(
        f"the volume file is truncated: {what} needs {need} bytes, the file has {have}.",
        fix="copy the complete volume file again (compare its size with the original).",
    )


def _read_luks1(stream: BinaryIO, file_size: int) -> LuksHeader:
    stream.seek(0)
    raw = stream.read(LUKS1_HEADER_SIZE)
    if len(raw) < LUKS1_HEADER_SIZE:
        raise _truncated("the LUKS1 header", LUKS1_HEADER_SIZE, file_size)
    # §2.4: magic[6] version[2] cipher-name[32] cipher-mode[32] hash-spec[32] payload-offset
    # key-bytes mk-digest[20] mk-digest-salt[32] mk-digest-iter uuid[40], then 8 key slots.
    (
        cipher_name,
        cipher_mode,
        hash_spec,
        payload_offset,
        key_bytes,
        digest,
        digest_salt,
        digest_iter,
        uuid,
    ) = struct.unpack(">32s32s32sII20s32sI40s", raw[8:208])
    cipher = f"{_text(cipher_name)}-{_text(cipher_mode)}"
    slots = []
    for index in range(_LUKS1_SLOTS):
        # §2.5: active, iterations, salt[32], key-material-offset (sectors), stripes
        active, iterations, salt, offset, stripes = struct.unpack(
            ">II32sII", raw[208 + 48 * index : 208 + 48 * (index + 1)]
        )
        if active != _LUKS1_SLOT_ACTIVE:
            continue
        slots.append(
            KeySlot(
                index,
                "pbkdf2",
                _text(hash_spec),
                iterations,
                salt,
                offset * _SECTOR,
                stripes,
                _text(hash_spec),
                cipher,
                key_bytes,
            )
        )
    data_offset = payload_offset * _SECTOR
    if file_size < data_offset:
        raise _truncated("the LUKS1 header and key slots", data_offset, file_size)
    return LuksHeader(
        version=1,
        uuid=_text(uuid),
        cipher=cipher,
        key_bytes=key_bytes,
        data_offset=data_offset,
        data_size=None,
        sector_size=_SECTOR,
        iv_tweak=0,
        digest_hash=_text(hash_spec),
        digest_iterations=digest_iter,
        digest_salt=digest_salt,
        digest=digest,
        slots=tuple(slots),
    )


def _read_luks2(stream: BinaryIO, file_size: int) -> LuksHeader:
    stream.seek(0)
    binary = stream.read(LUKS2_BINARY_HEADER_SIZE)
    if len(binary) < LUKS2_BINARY_HEADER_SIZE:
        raise _truncated("the LUKS2 binary header", LUKS2_BINARY_HEADER_SIZE, file_size)
    # §2.1: magic[6] version[2] hdr_size[8] seqid[8] label[48] csum_alg[32] salt[64] uuid[40]
    # subsystem[48] hdr_offset[8] padding[184] csum[64] at 448.
    hdr_size = struct.unpack(">Q", binary[8:16])[0]
    csum_alg = _text(binary[72:104])
    uuid = _text(binary[168:208])
    if hdr_size < LUKS2_BINARY_HEADER_SIZE or hdr_size > file_size:
        raise _truncated("the LUKS2 header", hdr_size, file_size)
    stream.seek(0)
    whole = bytearray(stream.read(hdr_size))
    expected = bytes(whole[448:512])
    whole[448:512] = bytes(64)
    if csum_alg != "sha256" or hashlib.sha256(whole).digest() != expected[:32]:
        raise VaultError(
            "the LUKS2 header checksum does not match: the header is damaged or was edited.",
            fix="restore the volume from a good copy (cryptsetup luksHeaderRestore).",
        )
    text = bytes(whole[LUKS2_BINARY_HEADER_SIZE:]).split(b"\0", 1)[0]
    meta: dict[str, Any] = json.loads(text)
    return _luks2_from_json(meta, uuid, file_size)


def _luks2_from_json(meta: dict[str, Any], uuid: str, file_size: int) -> LuksHeader:
    segments = meta.get("segments", {})
    if list(segments) != ["0"] or segments["0"].get("type") != "crypt":
        raise VaultError(
            "the LUKS2 volume does not have exactly one crypt segment (reencryption in progress?).",
            fix="finish the reencryption with cryptsetup, or use the kernel data path.",
        )
    segment = segments["0"]
    digests = list(meta.get("digests", {}).values())
    if len(digests) != 1 or digests[0].get("type") != "pbkdf2":
        raise VaultError(
            "the LUKS2 volume key digest is not a single pbkdf2 digest.",
            fix="use a volume created by ModelVault.create.",
        )
    digest = digests[0]
    slots = []
    for name, slot in sorted(meta.get("keyslots", {}).items(), key=lambda item: int(item[0])):
        if slot.get("type") != "luks2":
            continue
        kdf, af, area = slot["kdf"], slot["af"], slot["area"]
        slots.append(
            KeySlot(
                index=int(name),
                kdf=kdf["type"],
                kdf_hash=kdf.get("hash", ""),
                iterations=int(kdf.get("iterations", 0)),
                salt=base64.b64decode(kdf["salt"]),
                material_offset=int(area["offset"]),
                stripes=int(af["stripes"]),
                af_hash=af["hash"],
                cipher=area["encryption"],
                key_bytes=int(area["key_size"]),
            )
        )
    data_offset = int(segment["offset"])
    data_size = None if segment["size"] == "dynamic" else int(segment["size"])
    if file_size < data_offset + (data_size or 0):
        raise _truncated("the LUKS2 data segment", data_offset + (data_size or 0), file_size)
    return LuksHeader(
        version=2,
        uuid=uuid,
        cipher=segment["encryption"],
        key_bytes=int(slot_key_bytes(meta)),
        data_offset=data_offset,
        data_size=data_size,
        sector_size=int(segment.get("sector_size", _SECTOR)),
        iv_tweak=int(segment["iv_tweak"]),
        digest_hash=digest["hash"],
        digest_iterations=int(digest["iterations"]),
        digest_salt=base64.b64decode(digest["salt"]),
        digest=base64.b64decode(digest["digest"]),
        slots=tuple(slots),
    )


def slot_key_bytes(meta: dict[str, Any]) -> int:
    """Volume key size of a LUKS2 volume: every key slot stores the whole volume key."""
    sizes = {int(slot["key_size"]) for slot in meta.get("keyslots", {}).values()}
    if len(sizes) != 1:
        raise VaultError(
            "the LUKS2 key slots disagree on the volume key size.",
            fix="use a volume created by ModelVault.create.",
        )
    return sizes.pop()
