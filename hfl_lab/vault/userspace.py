"""The user-space data path: a LUKS volume file read and written without dm-crypt or root.

cryptsetup writes the LUKS header and key slots; this module unlocks the volume key in memory,
decrypts the data segment (aes-xts-plain64) into an in-memory ext4 image, changes that image with
debugfs, and writes back, re-encrypted, only the sectors that changed in blocks the file system
uses (``ext4_bitmap``), through the redo journal. Big files are allocated by debugfs and filled
in the mapped image (``image_changes``); the data of fresh ones goes to their free blocks in a few
long encrypted runs outside the journal, before the journal commits the metadata that refers to
it.
"""

from __future__ import annotations

import fcntl
import logging
import os
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor, wait
from pathlib import Path

import numpy as np
import numpy.typing as npt

from hfl_lab._exceptions import VaultError
from hfl_lab.vault import journal
from hfl_lab.vault.cryptsetup import create_volume_file
from hfl_lab.vault.ext4_bitmap import used_blocks
from hfl_lab.vault.ext4_image import Ext4Image, Extent, check_path
from hfl_lab.vault.files import Write, materialize
from hfl_lab.vault.image_changes import ImageChanges
from hfl_lab.vault.luks_header import LuksHeader, read_header
from hfl_lab.vault.luks_keyslot import unlock_volume_key
from hfl_lab.vault.xts import SECTOR_SIZE, TWEAK_WINDOW_BYTES, XtsCipher, worker_count

log = logging.getLogger(__name__)

_READ_CHUNK = 32 * 1024 * 1024
_DIFF_CHUNK = 2048  # sectors compared per numpy call (1 MiB)
# Fresh files at least this big have their data written in place rather than journaled.
_IN_PLACE_MIN = 64 * 1024
# Fresh data is encrypted and written in slices of this many sectors (8 MiB).
_WRITE_SLICE_SECTORS = 16384
_MIN_DATA = 4 * 1024 * 1024
# At most this much memory for the XTS tweaks of recently written sectors (see xts): with
# checkpoints taking turns in the same blocks, their tweaks are made once, not at every write.
_TWEAK_CACHE_MAX = 256 * 1024 * 1024
LABEL = "hfl-model"

Mask = npt.NDArray[np.bool_]


def _runs(sectors: npt.NDArray[np.int64]) -> list[tuple[int, int]]:
    """Split sorted sector numbers into [start, end) runs of consecutive sectors."""
    if sectors.size == 0:
        return []
    breaks = np.flatnonzero(np.diff(sectors) != 1) + 1
    starts = np.concatenate(([0], breaks))
    ends = np.concatenate((breaks, [sectors.size]))
    return [(int(sectors[a]), int(sectors[b - 1]) + 1) for a, b in zip(starts, ends, strict=True)]


class UserspaceVolume:
    """An open LUKS volume file whose file system lives decrypted in memory only."""

    kind = "userspace"

    def __init__(
        self,
        path: Path,
        fd: int,
        header: LuksHeader,
        key: bytearray,
        *,
        writable: bool,
        durable: bool,
    ) -> None:
        self.path = path
        self._fd = fd
        self.header = header
        self._key = key
        self.writable = writable
        self.durable = durable
        if header.sector_size != SECTOR_SIZE:
            raise VaultError(
                f"the volume uses {header.sector_size}-byte sectors; the user-space path reads "
                "512-byte sectors only.",
                fix="open it on the kernel data path, or create it with ModelVault.create.",
            )
        size = os.fstat(fd).st_size
        self.data_size = header.data_size or size - header.data_offset
        if self.data_size < _MIN_DATA or self.data_size % SECTOR_SIZE:
            raise VaultError(
                f"the volume file is truncated: its data segment is {self.data_size} bytes.",
                fix="copy the complete volume file again (compare its size with the original).",
            )
        self._xts = XtsCipher(key)
        self._largest_write = 0
        self._memfd = os.memfd_create("hfl-vault-image", os.MFD_CLOEXEC)
        os.ftruncate(self._memfd, self.data_size)
        self.image = Ext4Image(self._memfd, self.data_size)
        self._changes = ImageChanges(self.image)
        self._shadow: npt.NDArray[np.uint8] | None = None
        self._slice_buffers: tuple[npt.NDArray[np.uint8], npt.NDArray[np.uint8]] | None = None

    @property
    def uuid(self) -> str:
        return self.header.uuid

    @property
    def volume_key(self) -> bytes:
        """The volume key (memory only); used to derive the checkpoint MAC key."""
        return bytes(self._key)

    # -- opening -------------------------------------------------------------------------------

    @classmethod
    def create(
        cls,
        path: Path,
        passphrase: bytes,
        size_mb: int,
        *,
        luks_version: int = 1,
        kdf_iterations: int | None = None,
        iter_time_ms: int = 500,
        durable: bool = True,
    ) -> UserspaceVolume:
        """Format ``path`` (which must not exist) and put an empty ext4 file system in it."""
        fd = create_volume_file(path, passphrase, size_mb, luks_version=luks_version,
                                kdf_iterations=kdf_iterations, iter_time_ms=iter_time_ms)
        try:
            volume = cls._unlock(path, fd, passphrase, writable=True, durable=durable)
        except BaseException:
            os.close(fd)
            path.unlink(missing_ok=True)
            raise
        try:
            Ext4Image.format(volume._memfd, volume.data_size, LABEL)
            # Every sector is written once, so the whole data segment looks random from the
            # start and later writes reveal nothing about where data is.
            volume._encrypt_all()
            volume._shadow = volume.image.bytes.copy()
        except BaseException:
            volume.close()
            path.unlink(missing_ok=True)
            raise
        log.info(
            "created LUKS%d volume %s (%d MB, user-space data path)",
            luks_version,
            path.name,
            size_mb,
        )
        return volume

    @classmethod
    def open(
        cls, path: Path, passphrase: bytes, *, writable: bool = True, durable: bool = True
    ) -> UserspaceVolume:
        try:
            fd = os.open(path, (os.O_RDWR if writable else os.O_RDONLY) | os.O_CLOEXEC)
        except FileNotFoundError:
            raise VaultError(
                f"no volume file at {path}.", fix="check the path (the volume is a single file)."
            ) from None
        try:
            volume = cls._unlock(path, fd, passphrase, writable=writable, durable=durable)
        except BaseException:
            os.close(fd)
            raise
        try:
            runs = journal.recover(path, fd if writable else None, volume.uuid)
            volume._decrypt_all(runs)
            if writable:
                volume._shadow = volume.image.bytes.copy()
        except BaseException:
            volume.close()
            raise
        return volume

    @classmethod
    def _unlock(
        cls, path: Path, fd: int, passphrase: bytes, *, writable: bool, durable: bool
    ) -> UserspaceVolume:
        try:
            fcntl.flock(fd, (fcntl.LOCK_EX if writable else fcntl.LOCK_SH) | fcntl.LOCK_NB)
        except BlockingIOError:
            raise VaultError(
                f"{path.name} is open for writing by another process.",
                fix="close the other ModelVault first.",
            ) from None
        with os.fdopen(os.dup(fd), "rb") as stream:
            header = read_header(stream, os.fstat(fd).st_size)
            key = unlock_volume_key(header, stream, passphrase)
        return cls(path, fd, header, key, writable=writable, durable=durable)

    def _decrypt_all(self, overlay: Sequence[journal.SectorRun]) -> None:
        # Ciphertext is read straight into the mapped image and decrypted in place there:
        # XTS consumes each slice into scratch buffers before writing it back.
        image = self.image.bytes.data
        first_sector = self.header.iv_tweak
        for start in range(0, self.data_size, _READ_CHUNK):
            length = min(_READ_CHUNK, self.data_size - start)
            view = image[start : start + length]
            got = os.preadv(self._fd, [view], self.header.data_offset + start)
            if got != length:
                raise VaultError(
                    "the volume file is truncated inside its data segment.",
                    fix="copy the complete volume file again (compare its size with the original).",
                )
            sectors = np.arange(length // SECTOR_SIZE, dtype=np.uint64)
            sectors += np.uint64(first_sector + start // SECTOR_SIZE)
            self._xts.decrypt_into(view, view, sectors)
        for run in overlay:
            start = run.offset - self.header.data_offset
            first = first_sector + start // SECTOR_SIZE
            image[start : start + len(run.data)] = self._xts.decrypt(run.data, first)
        fs_size = self.image.check_superblock()
        if fs_size > self.data_size:
            raise VaultError(
                f"the volume file is truncated: its file system needs {fs_size} bytes, the data "
                f"segment holds {self.data_size}.",
                fix="copy the complete volume file again (compare its size with the original).",
            )

    def _encrypt_all(self) -> None:
        step = _READ_CHUNK
        image = self.image.bytes.data
        out = bytearray(min(step, self.data_size))
        for start in range(0, self.data_size, step):
            length = min(step, self.data_size - start)
            sectors = np.arange(length // SECTOR_SIZE, dtype=np.uint64)
            sectors += np.uint64(self.header.iv_tweak + start // SECTOR_SIZE)
            self._xts.encrypt_into(image[start : start + length], memoryview(out)[:length], sectors)
            journal.write_sectors(
                self._fd,
                [journal.SectorRun(self.header.data_offset + start, memoryview(out)[:length])],
            )
        if self.durable:
            os.fsync(self._fd)

    # -- VolumeFiles ---------------------------------------------------------------------------

    def read(self, path: str) -> bytes:
        return self.image.read_file(path)

    def read_hashed(self, path: str) -> tuple[bytes, str]:
        """Contents and SHA-256 of a file, hashed while it is copied out (see Ext4Image)."""
        return self.image.read_file_hashed(path)

    def list_dir(self, path: str) -> dict[str, int]:
        return self.image.list_dir(path)

    def locate(self, path: str) -> list[tuple[int, int]]:
        """Where a file's data lies in the volume file: (byte offset, length) per extent."""
        layout = self.image.layout(path)
        block = self.image.block_size
        return [
            (self.header.data_offset + extent.physical * block, extent.length * block)
            for extent in layout.extents
        ]

    def commit(self, writes: Sequence[Write], deletes: Sequence[str] = ()) -> None:
        if not self.writable or self._shadow is None:
            raise VaultError(
                "the volume was opened read-only.",
                fix="open it with ModelVault.open(...) for writing.",
            )
        paths = [check_path(path) for path, _ in writes]
        if len(set(paths)) != len(paths):
            raise VaultError("one commit writes the same file twice.", fix="write each file once.")
        # Contents given as functions (a checkpoint's metadata, which waits for the payload's
        # hash) are made while the others are stored: the data of fresh files even reaches the
        # disk meanwhile (see _write_in_place), but nothing refers to it before the one
        # transaction of _write_back commits.
        ready = [(path, data) for path, data in writes if not callable(data)]
        later = [(path, data) for path, data in writes if callable(data)]
        placed: dict[str, list[Extent]] = {}
        in_place = np.zeros(self.data_size // SECTOR_SIZE, dtype=bool)
        with (
            ThreadPoolExecutor(1, thread_name_prefix="hfl-fsync") as flusher,
            ThreadPoolExecutor(1, thread_name_prefix="hfl-shadow") as shadower,
        ):
            flushes: list[Future[None]] = []
            try:
                freed = False
                pending: list[str] = []  # metadata commands left for the next debugfs run
                for batch, batch_deletes in ((ready, ()), (later, deletes), ((), ())):
                    if not (batch or batch_deletes or pending):
                        continue
                    made = [(check_path(path), materialize(data)) for path, data in batch]
                    changes = self._changes.apply(made, batch_deletes, placed, pending)
                    fresh, replaced, pending = changes
                    # Fresh files go straight to their blocks only while those blocks are
                    # certainly free on disk: before this commit has removed anything.
                    if not freed:
                        sizes = {path: memoryview(data).nbytes for path, data in made}
                        big = [path for path in fresh if sizes[path] >= _IN_PLACE_MIN]
                        new = self._changes.sectors_of(big, placed) & ~in_place
                        flushes += self._write_in_place(new, flusher, shadower)
                        in_place |= new
                    freed = freed or bool(replaced) or bool(batch_deletes)
                changed = self._changed_sectors(in_place)
                for flush in flushes:
                    try:
                        flush.result()  # the data is durable before the commit refers to it
                    except OSError as error:
                        raise self._write_failed(error) from error
            except BaseException:
                wait(flushes)  # the shadow is complete before the image is rolled back to it
                self.image.bytes[:] = self._shadow  # roll the image back to what is on disk
                self.image.forget()
                raise
        self._write_back(changed)

    def _changed_sectors(self, known: Mask) -> npt.NDArray[np.int64]:
        """Sectors whose plaintext differs from what is on disk, but for the ``known`` ones
        (data of fresh files, already written to their free blocks) and those of blocks the
        file system does not use (whatever they hold, nothing refers to it; should a later
        change use them, they are compared then)."""
        assert self._shadow is not None
        words = SECTOR_SIZE // 8
        now = self.image.bytes.view(np.uint64)
        before = self._shadow.view(np.uint64)
        changed = np.zeros_like(known)
        relevant = ~known
        used = used_blocks(self.image.bytes)
        if used is not None:
            per_block = self.image.block_size // SECTOR_SIZE
            covered = min(relevant.size, used.size * per_block)
            relevant[:covered] &= np.repeat(used, per_block)[:covered]

        def compare(span: tuple[int, int]) -> None:
            # Most slices are unchanged: one flat comparison says so; only a changed slice is
            # looked at sector by sector.
            start, stop = span
            differs = now[start * words : stop * words] != before[start * words : stop * words]
            if differs.any():
                changed[start:stop] = differs.reshape(-1, words).any(axis=1)

        spans = [
            (at, min(end, at + _DIFF_CHUNK))
            for start, end in _runs(np.flatnonzero(relevant))
            for at in range(start, end, _DIFF_CHUNK)
        ]
        with ThreadPoolExecutor(worker_count(), thread_name_prefix="hfl-diff") as pool:
            for done in [pool.submit(compare, span) for span in spans]:
                done.result()
        return np.flatnonzero(changed)

    def _write_in_place(
        self, sectors: Mask, flusher: ThreadPoolExecutor, shadower: ThreadPoolExecutor
    ) -> list[Future[None]]:
        """Encrypt the data of fresh files straight into their blocks, which are free on disk,
        and start flushing it; returns what to wait for before the commit point."""
        runs = _runs(np.flatnonzero(sectors))
        if not runs:
            return []
        try:
            self._write_direct(runs)
        except OSError as error:
            raise self._write_failed(error) from error
        flushed = [flusher.submit(os.fsync, self._fd)] if self.durable else []
        # While the data is flushed and the metadata made, the shadow takes the data in: those
        # blocks are free in the state on disk, so the shadow stays a true copy of that state
        # whether or not the transaction commits, and no diff of this commit looks at them.
        return [*flushed, shadower.submit(self._update_shadow, runs)]

    def _write_back(self, changed: npt.NDArray[np.int64]) -> None:
        """Encrypt the changed sectors into the journal, whose commit is the transaction's
        commit point, and from there into the volume."""
        assert self._shadow is not None
        journaled_runs = _runs(changed)
        journaled = self._encrypt_runs(journaled_runs)
        try:
            journal.commit(self.path, self._fd, self.uuid, journaled, durable=self.durable)
        except OSError as error:
            self.image.bytes[:] = self._shadow
            self.image.forget()
            raise self._write_failed(error) from error
        self._update_shadow(journaled_runs)

    @staticmethod
    def _write_failed(error: OSError) -> VaultError:
        return VaultError(
            f"writing the volume failed ({error.strerror}); the previous state is kept.",
            fix="free disk space or check the disk, then retry the write.",
        )

    def _write_direct(self, runs: list[tuple[int, int]]) -> None:
        """Encrypt fresh data slice by slice and write each slice while the next is encrypted:
        two small reused buffers instead of one as big as the data (whose pages would all
        have to be faulted in first), and the copy to the kernel overlaps the cipher."""
        if not runs:
            return
        slices = [
            (at, min(end, at + _WRITE_SLICE_SECTORS))
            for start, end in runs
            for at in range(start, end, _WRITE_SLICE_SECTORS)
        ]
        total = sum(end - start for start, end in runs) * SECTOR_SIZE
        self._largest_write = max(self._largest_write, total)
        # Room for the tweaks of two such writes (the new checkpoint's blocks and those of the
        # one before, which the next takes over), and the windows their edges share.
        room = 2 * self._largest_write + 4 * TWEAK_WINDOW_BYTES
        self._xts.limit_tweak_cache(min(room, _TWEAK_CACHE_MAX, self.data_size))
        if self._slice_buffers is None:
            size = _WRITE_SLICE_SECTORS * SECTOR_SIZE
            self._slice_buffers = (np.empty(size, np.uint8), np.empty(size, np.uint8))
        image = self.image.bytes.data
        pending: list[Future[None] | None] = [None, None]
        with ThreadPoolExecutor(1, thread_name_prefix="hfl-pwrite") as writer:
            for index, (start, end) in enumerate(slices):
                turn = index % 2
                if (previous := pending[turn]) is not None:
                    previous.result()  # its buffer is about to be reused
                out = self._slice_buffers[turn].data[: (end - start) * SECTOR_SIZE]
                plain = image[start * SECTOR_SIZE : end * SECTOR_SIZE]
                self._xts.encrypt_run(plain, out, self.header.iv_tweak + start)
                run = journal.SectorRun(self.header.data_offset + start * SECTOR_SIZE, out)
                pending[turn] = writer.submit(journal.write_sectors, self._fd, [run])
            for done in pending:
                if done is not None:
                    done.result()

    def _update_shadow(self, runs: list[tuple[int, int]]) -> None:
        assert self._shadow is not None
        for start, end in runs:
            byte_range = slice(start * SECTOR_SIZE, end * SECTOR_SIZE)
            self._shadow[byte_range] = self.image.bytes[byte_range]

    def _encrypt_runs(self, runs: list[tuple[int, int]]) -> list[journal.SectorRun]:
        total = sum(end - start for start, end in runs) * SECTOR_SIZE
        out = np.empty(total, dtype=np.uint8).data  # every byte is written below
        image = self.image.bytes.data
        result, at = [], 0
        for start, end in runs:
            length = (end - start) * SECTOR_SIZE
            sectors = np.arange(start, end, dtype=np.uint64) + np.uint64(self.header.iv_tweak)
            self._xts.encrypt_into(
                image[start * SECTOR_SIZE : end * SECTOR_SIZE], out[at : at + length], sectors
            )
            result.append(
                journal.SectorRun(
                    self.header.data_offset + start * SECTOR_SIZE, out[at : at + length]
                )
            )
            at += length
        return result

    def close(self) -> None:
        """Forget the key and the decrypted image; release the file."""
        self._key[:] = bytes(len(self._key))
        self._xts.forget_tweaks()
        self._shadow = None
        self._slice_buffers = None
        if self._memfd >= 0:
            self.image.close()
            os.close(self._memfd)
            self._memfd = -1
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
