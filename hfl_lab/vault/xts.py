"""AES-XTS with plain64 sector IVs (dm-crypt's ``aes-xts-plain64``), vectorized over many sectors.

One ``Cipher`` per 512-byte sector is far too slow in Python, so the tweaks of all sectors are
made with one AES-ECB call, multiplied by α^j in GF(2^128) with numpy (IEEE 1619 little-endian
convention), and the data goes through one more AES-ECB call between two XORs.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from hfl_lab._exceptions import VaultError

SECTOR_SIZE = 512
_BLOCK = 16
# Sectors per slice: big enough to amortize the Python overhead, small enough that the
# tweak and scratch buffers stay in cache.
_CHUNK_SECTORS = 4096

U64Array = npt.NDArray[np.uint64]
Buffer = bytes | bytearray | memoryview


class XtsCipher:
    """aes-xts-plain64 over whole sectors; ``key`` is K1‖K2 (32 or 64 bytes)."""

    def __init__(self, key: Buffer, sector_size: int = SECTOR_SIZE) -> None:
        if len(key) not in (32, 64):
            raise VaultError(
                f"aes-xts needs a 32- or 64-byte key, got {len(key)} bytes.",
                fix="use a LUKS volume formatted with cipher aes-xts-plain64.",
            )
        if sector_size % _BLOCK or sector_size < _BLOCK:
            raise VaultError(f"unsupported sector size {sector_size}.", fix="use 512-byte sectors.")
        half = len(key) // 2
        self._data_key = algorithms.AES(bytes(key[:half]))
        self._tweak_key = algorithms.AES(bytes(key[half:]))
        self.sector_size = sector_size
        self._blocks = sector_size // _BLOCK
        shifts = np.arange(self._blocks, dtype=np.uint64)
        self._shift_left = shifts[None, 1:]
        self._shift_right = (np.uint64(64) - shifts)[None, 1:]

    def encrypt(self, data: Buffer, first_sector: int) -> bytearray:
        """Encrypt consecutive sectors starting at sector number ``first_sector``."""
        out = bytearray(len(data))
        self.encrypt_into(data, out, self._consecutive(data, first_sector))
        return out

    def decrypt(self, data: Buffer, first_sector: int) -> bytearray:
        """Decrypt consecutive sectors starting at sector number ``first_sector``."""
        out = bytearray(len(data))
        self.decrypt_into(data, out, self._consecutive(data, first_sector))
        return out

    def encrypt_into(self, data: Buffer, out: Buffer, sectors: U64Array) -> None:
        """Encrypt sectors laid end to end in ``data`` (numbers ``sectors``) into ``out``."""
        self._run(data, out, sectors, encrypt=True)

    def decrypt_into(self, data: Buffer, out: Buffer, sectors: U64Array) -> None:
        """Decrypt sectors laid end to end in ``data`` (numbers ``sectors``) into ``out``."""
        self._run(data, out, sectors, encrypt=False)

    def _consecutive(self, data: Buffer, first: int) -> U64Array:
        return np.arange(first, first + len(data) // self.sector_size, dtype=np.uint64)

    def _run(self, data: Buffer, out: Buffer, sectors: U64Array, *, encrypt: bool) -> None:
        size = memoryview(data).nbytes
        if size != len(sectors) * self.sector_size or memoryview(out).nbytes != size:
            raise VaultError(
                f"XTS input of {size} bytes is not {len(sectors)} whole sectors.",
                fix="pass data and output buffers in multiples of the sector size.",
            )
        src = np.frombuffer(data, dtype="<u8")
        dst = np.frombuffer(out, dtype="<u8")
        words_per_sector = self.sector_size // 8
        ecb = Cipher(self._data_key, modes.ECB())  # noqa: S305 - the core step of XTS
        ctx = ecb.encryptor() if encrypt else ecb.decryptor()
        scratch = np.empty(_CHUNK_SECTORS * words_per_sector, dtype="<u8")
        # update_into wants one spare block of room beyond the input.
        middle = bytearray(_CHUNK_SECTORS * self.sector_size + _BLOCK)
        middle_words = np.frombuffer(middle, dtype="<u8")
        for first in range(0, len(sectors), _CHUNK_SECTORS):
            numbers = sectors[first : first + _CHUNK_SECTORS]
            lo, hi = first * words_per_sector, (first + len(numbers)) * words_per_sector
            tweaks = self._tweaks(numbers)
            mixed = scratch[: hi - lo]
            np.bitwise_xor(src[lo:hi], tweaks, out=mixed)
            done = ctx.update_into(mixed.data.cast("B"), middle)
            np.bitwise_xor(middle_words[: done // 8], tweaks, out=dst[lo:hi])
        ctx.finalize()

    def _tweaks(self, sectors: U64Array) -> U64Array:
        """Tweak T_j = AES_K2(plain64 IV) · α^j for every 16-byte block j of every sector."""
        count = len(sectors)
        ivs = np.zeros((count, 2), dtype="<u8")
        ivs[:, 0] = sectors  # plain64: the sector number as a 64-bit LE integer, zero-padded
        ecb = Cipher(self._tweak_key, modes.ECB()).encryptor()  # noqa: S305 - XTS tweak step
        first = np.frombuffer(ecb.update(ivs.tobytes()) + ecb.finalize(), dtype="<u8")
        lo = first[0::2, None]
        hi = first[1::2, None]
        tweaks = np.empty((count, self._blocks, 2), dtype="<u8")
        tweaks[:, 0, 0] = lo[:, 0]
        tweaks[:, 0, 1] = hi[:, 0]
        # IEEE 1619 §5.2: T·α^j is T shifted left by j bits with the j bits shifted out folded
        # back by x^128 = x^7 + x^2 + x + 1 (0x87); for j < 57 the fold stays in the low word.
        carry = hi >> self._shift_right
        fold = carry ^ (carry << np.uint64(1)) ^ (carry << np.uint64(2)) ^ (carry << np.uint64(7))
        tweaks[:, 1:, 0] = (lo << self._shift_left) ^ fold
        tweaks[:, 1:, 1] = (hi << self._shift_left) | (lo >> self._shift_right)
        return tweaks.reshape(-1)
