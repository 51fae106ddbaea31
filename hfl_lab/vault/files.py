"""The file-system view every data path offers, and its plain-directory implementation.

``VolumeFiles`` is all the checkpoint and provenance logic needs: read a file, list a directory,
and commit a batch of writes and deletes. ``DirectoryFiles`` backs both the kernel data path (a
mounted dm-crypt volume) and the vault-less ``DirectoryCheckpointStore``.
"""

from __future__ import annotations

import hashlib
import os
import secrets
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Protocol, runtime_checkable

from hfl_lab._exceptions import VaultError
from hfl_lab.vault.ext4_image import check_path
from hfl_lab.vault.journal import fsync_dir

Data = bytes | bytearray | memoryview
#: a file's contents, or a function that makes them: it is called only after the writes before
#: it in the same commit are under way, so slow work (hashing a checkpoint) overlaps with them
Contents = Data | Callable[[], Data]
Write = tuple[str, Contents]


def materialize(contents: Contents) -> Data:
    return contents() if callable(contents) else contents


class VolumeFiles(Protocol):
    """Files inside a volume, addressed by '/'-separated paths relative to its root."""

    def read(self, path: str) -> bytes:
        """Contents of a file; ``VaultError`` when it is missing."""
        ...

    def list_dir(self, path: str) -> dict[str, int]:
        """Regular files in a directory with their sizes; {} when the directory is missing."""
        ...

    def commit(self, writes: Sequence[Write], deletes: Sequence[str] = ()) -> None:
        """Write files (in order, creating directories) and then delete files.

        Contents given as a function are made when their turn comes (see ``Contents``).

        Implementations make a crash leave either the old or the new version of each file; the
        caller writes the file that makes a group of files count (a checkpoint's metadata) last.
        """
        ...


@runtime_checkable
class HashingReader(Protocol):
    """A ``VolumeFiles`` that hashes a file while it reads it (faster than one after the other)."""

    def read_hashed(self, path: str) -> tuple[bytes, str]:
        """Contents of a file and their SHA-256 as hex."""
        ...


def read_hashed(files: VolumeFiles, path: str) -> tuple[bytes, str]:
    """Contents of a file and their SHA-256 (hex), overlapped where ``files`` can do that."""
    if isinstance(files, HashingReader):
        return files.read_hashed(path)
    data = files.read(path)
    return data, hashlib.sha256(data).hexdigest()


class DirectoryFiles:
    """``VolumeFiles`` over a directory: each file is written to a temporary name, fsynced and
    renamed into place, so a crash leaves either the old or the new file."""

    def __init__(self, root: Path, *, durable: bool = True) -> None:
        self.root = root
        self.durable = durable

    def _resolve(self, path: str) -> Path:
        return self.root / check_path(path).lstrip("/")

    def read(self, path: str) -> bytes:
        try:
            return self._resolve(path).read_bytes()
        except FileNotFoundError:
            raise VaultError(
                f"{path} is missing from the volume.",
                fix="check the name, or that the volume is the right one.",
            ) from None

    def list_dir(self, path: str) -> dict[str, int]:
        folder = self._resolve(path)
        if not folder.is_dir():
            return {}
        return {
            entry.name: entry.stat().st_size
            for entry in folder.iterdir()
            if entry.is_file() and not entry.name.startswith(".")
        }

    def commit(self, writes: Sequence[Write], deletes: Sequence[str] = ()) -> None:
        for path, contents in writes:
            data = materialize(contents)
            target = self._resolve(path)
            target.parent.mkdir(parents=True, exist_ok=True)
            temp = target.with_name(f".{target.name}.{secrets.token_hex(4)}.tmp")
            fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
            try:
                view = memoryview(data)
                done = 0
                while done < len(view):
                    done += os.write(fd, view[done:])
                if self.durable:
                    os.fsync(fd)
            except BaseException:
                temp.unlink(missing_ok=True)
                raise
            finally:
                os.close(fd)
            temp.replace(target)
            if self.durable:
                fsync_dir(target.parent)
        for path in deletes:
            self._resolve(path).unlink(missing_ok=True)
        if deletes and self.durable:
            fsync_dir(self.root)

    def remove_leftovers(self) -> None:
        """Delete temporary files a crash left behind (they never became part of the volume)."""
        for temp in self.root.rglob(".*.tmp"):
            temp.unlink(missing_ok=True)
