"""A redo journal beside the volume file that makes a multi-sector update all-or-nothing.

The encrypted sectors of one transaction are written to ``<volume>.journal`` with a SHA-256
trailer, fsynced, then copied into the volume and the journal removed. A crash before the
trailer is durable leaves the volume untouched (the journal is discarded on the next open); a
crash after it is repaired by replaying the journal. Only ciphertext ever goes into the journal.
"""

from __future__ import annotations

import hashlib
import os
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from hfl_lab._exceptions import VaultError

_MAGIC = b"HFLVJRN1"
_HEAD = struct.Struct(">8s40sI")  # magic, volume uuid, number of runs
_RUN = struct.Struct(">QI")  # byte offset in the volume file, length


@dataclass(frozen=True)
class SectorRun:
    """``data`` (ciphertext) belongs at byte ``offset`` of the volume file."""

    offset: int
    data: bytes | bytearray | memoryview


def journal_path(volume: Path) -> Path:
    return volume.with_name(volume.name + ".journal")


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_sectors(fd: int, runs: Sequence[SectorRun]) -> None:
    for run in runs:
        view = memoryview(run.data)
        done = 0
        while done < len(view):
            done += os.pwrite(fd, view[done:], run.offset + done)


def commit(
    volume: Path, volume_fd: int, uuid: str, runs: Sequence[SectorRun], *, durable: bool
) -> None:
    """Apply ``runs`` to the volume atomically: journal, commit point, copy, remove journal."""
    path = journal_path(volume)
    parts: list[bytes | bytearray | memoryview] = [
        _HEAD.pack(_MAGIC, uuid.encode().ljust(40, b"\0"), len(runs))
    ]
    for run in runs:
        parts += [_RUN.pack(run.offset, len(run.data)), run.data]
    digest = hashlib.sha256()
    for part in parts:
        digest.update(part)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    try:
        for part in [*parts, digest.digest()]:
            view = memoryview(part)
            done = 0
            while done < len(view):
                done += os.write(fd, view[done:])
        if durable:
            os.fsync(fd)  # the commit point: from here on the transaction will happen
    finally:
        os.close(fd)
    if durable:
        fsync_dir(path.parent)
    write_sectors(volume_fd, runs)
    if durable:
        os.fsync(volume_fd)
    path.unlink()


def pending_runs(volume: Path, uuid: str) -> list[SectorRun] | None:
    """The runs of a committed journal left by a crash; None when there is none or it is torn."""
    path = journal_path(volume)
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return None
    body, trailer = raw[:-32], raw[-32:]
    if len(raw) < _HEAD.size + 32 or hashlib.sha256(body).digest() != trailer:
        return None  # torn before the commit point: the volume itself was never touched
    magic, journal_uuid, count = _HEAD.unpack_from(body)
    if magic != _MAGIC or journal_uuid.rstrip(b"\0").decode() != uuid:
        raise VaultError(
            f"{path.name} belongs to another volume.",
            fix="move the stray journal file away from the volume file and open it again.",
        )
    runs, at = [], _HEAD.size
    for _ in range(count):
        offset, length = _RUN.unpack_from(body, at)
        at += _RUN.size
        runs.append(SectorRun(offset, body[at : at + length]))
        at += length
    return runs


def recover(volume: Path, volume_fd: int | None, uuid: str) -> list[SectorRun]:
    """Finish or discard an interrupted transaction; returns the runs the volume must show.

    With a writable ``volume_fd`` the runs are applied to the file and the journal removed;
    read-only callers get the runs to overlay in memory, and the file stays as it is.
    """
    runs = pending_runs(volume, uuid)
    path = journal_path(volume)
    if volume_fd is None:
        return runs or []
    if runs:
        write_sectors(volume_fd, runs)
        os.fsync(volume_fd)
    if path.exists():
        path.unlink()
        fsync_dir(path.parent)
    return []
