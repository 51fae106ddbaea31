"""An ext4 image held in memory (a memfd), built with mke2fs and read or changed with debugfs.

The image is the decrypted data segment of the volume, so it must never reach a disk: the
e2fsprogs tools get it as ``/proc/self/fd/N`` of an inherited memfd, and file contents travel
through memfds or are read straight out of the mapped image using the extents debugfs reports.
"""

from __future__ import annotations

import contextlib
import hashlib
import mmap
import os
import re
import shutil
import struct
import subprocess
import threading
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt

from hfl_lab._exceptions import VaultError

# ext4 superblock (Documentation/filesystems/ext4/super.rst): at byte 1024 of the image.
_SUPERBLOCK = 1024
_MAGIC = 0xEF53
_EXTENT_ROW = re.compile(
    r"^\s*\d+/\s*\d+\s+\d+/\s*\d+\s+(\d+)\s*-\s*(\d+)\s+(\d+)\s*-\s*(\d+)\s+(\d+)\s*(\w*)"
)
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+-]*$")
_JOURNAL_MIN_SIZE = 64 * 1024 * 1024
_INLINE_DATA_FLAG = 0x10000000  # EXT4_INLINE_DATA_FL
_BANNER = re.compile(r"^debugfs \d")
_NOT_FOUND = "File not found by ext2_lookup"


@dataclass(frozen=True)
class Extent:
    """``length`` file blocks from ``logical`` stored at image block ``physical``."""

    logical: int
    physical: int
    length: int
    uninit: bool  # allocated but never written: reads as zeros


@dataclass(frozen=True)
class FileLayout:
    size: int
    extents: tuple[Extent, ...]


def e2fs_tool(name: str) -> str:
    """Path of an e2fsprogs tool, or a ``VaultError`` naming the package."""
    found = shutil.which(name) or next(
        (p for p in (f"/usr/sbin/{name}", f"/sbin/{name}") if Path(p).exists()), None
    )
    if found is None:
        raise VaultError(
            f"{name} is not installed.", fix="install e2fsprogs (apt-get install e2fsprogs)."
        )
    return found


def check_path(path: str) -> str:
    """Reject paths debugfs would misparse: only simple names joined by '/'."""
    if path and not path.strip("/"):
        return "/"
    parts = path.strip("/").split("/")
    if not path or not all(_NAME.match(part) for part in parts):
        raise VaultError(
            f"invalid path inside the volume: {path!r}.",
            fix="use names made of letters, digits, '.', '_', '+' and '-', joined by '/'.",
        )
    return "/" + "/".join(parts)


@contextmanager
def memfd_with(data: bytes | bytearray | memoryview, name: str = "hfl-vault-src") -> Iterator[int]:
    """A memfd holding ``data``, so a child process can read it as /proc/self/fd/N."""
    fd = os.memfd_create(name, os.MFD_CLOEXEC)
    try:
        view = memoryview(data)
        written = 0
        while written < len(view):
            written += os.write(fd, view[written:])
        yield fd
    finally:
        os.close(fd)


class Ext4Image:
    """An ext4 file system in the memfd ``fd`` (``size`` bytes), mapped into this process."""

    def __init__(self, fd: int, size: int) -> None:
        self.fd = fd
        self.size = size
        self._map = mmap.mmap(fd, size)
        self.bytes: npt.NDArray[np.uint8] = np.frombuffer(self._map, dtype=np.uint8)
        # Answers of read-only debugfs commands, valid until the image changes: run(write=True)
        # empties it, and whoever changes ``bytes`` directly must call forget().
        self._answers: dict[tuple[str, ...], list[str] | None] = {}

    @staticmethod
    def format(fd: int, size: int, label: str) -> None:
        """Make an ext4 file system in the memfd ``fd``.

        Volumes of 64 MiB and more get an ext4 journal, which protects kernel-path mounts; the
        smallest journal (4 MiB) would eat too much of a small volume, whose writes go through
        the user-space path's own journal anyway.
        """
        features = [] if size >= _JOURNAL_MIN_SIZE else ["-O", "^has_journal"]
        result = subprocess.run(
            [
                e2fs_tool("mke2fs"),
                *features,
                "-t",
                "ext4",
                "-F",
                "-q",
                "-b",
                "4096",
                "-L",
                label,
                "-E",
                "nodiscard,lazy_itable_init=0,lazy_journal_init=0",
                "-m",
                "0",
                f"/proc/self/fd/{fd}",
            ],
            pass_fds=[fd],
            capture_output=True,
            check=False,
        )
        if result.returncode != 0:
            raise VaultError(
                f"mke2fs failed: {result.stderr.decode(errors='replace').strip()}.",
                fix="choose a larger volume (at least 8 MB).",
            )

    @property
    def block_size(self) -> int:
        log = struct.unpack_from("<I", self._map, _SUPERBLOCK + 24)[0]
        return int(1024 << log)

    def check_superblock(self) -> int:
        """Raise unless the image starts with an ext4 superblock; return the file system size."""
        magic = struct.unpack_from("<H", self._map, _SUPERBLOCK + 56)[0]
        if magic != _MAGIC:
            raise VaultError(
                "the decrypted volume does not contain an ext4 file system: it is damaged.",
                fix="restore the volume file from a good copy.",
            )
        blocks_lo = struct.unpack_from("<I", self._map, _SUPERBLOCK + 4)[0]
        incompat = struct.unpack_from("<I", self._map, _SUPERBLOCK + 96)[0]
        blocks_hi = struct.unpack_from("<I", self._map, _SUPERBLOCK + 0x150)[0]
        blocks = blocks_lo | ((blocks_hi << 32) if incompat & 0x80 else 0)  # 0x80: 64bit
        return int(blocks * self.block_size)

    def close(self) -> None:
        del self.bytes
        # A view may still be referenced (e.g. by a traceback being handled); the mapping is
        # then unmapped when that view goes away.
        with contextlib.suppress(BufferError):
            self._map.close()

    def run(
        self, commands: Sequence[str], *, write: bool, pass_fds: Sequence[int] = ()
    ) -> list[str]:
        """Run debugfs commands on the image; return each command's output, raise on any error."""
        if write:
            self.forget()
        sections, errors, status = self._debugfs(commands, write=write, pass_fds=pass_fds)
        if any("Could not allocate" in line for line in errors):
            raise VaultError(
                "the volume is full: the file system inside it has no room for this write.",
                fix="create a larger volume (size_mb) or keep fewer checkpoints (keep_last).",
            )
        if status != 0 or errors:
            detail = "; ".join(errors) or f"exit status {status}"
            raise VaultError(
                f"debugfs failed on the volume's file system: {detail}.",
                fix="check free space in the volume (create a larger one) and that it is intact.",
            )
        return sections

    def _debugfs(
        self, commands: Sequence[str], *, write: bool, pass_fds: Sequence[int] = ()
    ) -> tuple[list[str], list[str], int]:
        """debugfs's output per command, its error lines, and its exit status."""
        mode = ["-w"] if write else ["-c"]
        script = "".join(f"{command}\n" for command in commands)
        result = subprocess.run(
            [e2fs_tool("debugfs"), *mode, "-f", "-", f"/proc/self/fd/{self.fd}"],
            input=script.encode(),
            pass_fds=[self.fd, *pass_fds],
            capture_output=True,
            check=False,
        )
        errors = [
            line
            for line in result.stderr.decode(errors="replace").splitlines()
            if line.strip() and not _BANNER.match(line) and "catastrophic mode" not in line
        ]
        sections = result.stdout.decode(errors="replace").split("debugfs: ")[1:]
        outputs = [section.split("\n", 1)[1] if "\n" in section else "" for section in sections]
        return outputs, errors, result.returncode

    def forget(self) -> None:
        """Drop cached answers about the file system (the image was changed)."""
        self._answers.clear()

    def _read_only(self, commands: Sequence[str], path: str) -> list[str] | None:
        """Outputs of read-only commands about ``path``; None when ``path`` does not exist."""
        key = tuple(commands)
        if key in self._answers:
            cached = self._answers[key]
            return None if cached is None else list(cached)
        outputs, errors, status = self._debugfs(commands, write=False)
        if errors and all(_NOT_FOUND in line for line in errors):
            self._answers[key] = None
            return None
        if status != 0 or errors:
            detail = "; ".join(errors) or f"exit status {status}"
            raise VaultError(
                f"debugfs could not read {path} in the volume's file system: {detail}.",
                fix="check that the volume is intact (restore it from a good copy if not).",
            )
        self._answers[key] = list(outputs)
        return outputs

    def list_dir(self, path: str) -> dict[str, int]:
        """Regular files in the directory ``path`` and their sizes; {} when it does not exist."""
        return self.listing(path) or {}

    def listing(self, path: str) -> dict[str, int] | None:
        """Regular files in the directory ``path`` and their sizes; None when it does not exist."""
        found = self._read_only([self.listing_command(path)], path)
        if found is None:
            return None
        files: dict[str, int] = {}
        for line in found[0].splitlines():
            # ls -p: /inode/mode/uid/gid/name/size/
            fields = line.split("/")
            if len(fields) >= 7 and fields[2].startswith("10"):
                files[fields[5]] = int(fields[6])
        return files

    @staticmethod
    def listing_command(path: str) -> str:
        return f"ls -p {check_path(path)}"

    def remember_listing(self, path: str, output: str) -> None:
        """Keep what ``listing_command(path)`` printed as the last command of a write run, so
        the next ``listing(path)`` needs no debugfs run of its own."""
        self._answers[(self.listing_command(path),)] = [output]

    def exists(self, path: str) -> bool:
        parent, _, name = check_path(path).rpartition("/")
        if not name:  # the root directory
            return True
        try:
            found = self._read_only([f"ls -p {parent or '/'}"], parent or "/")
        except VaultError:  # e.g. the parent is a file
            return False
        if found is None:
            return False
        return any(line.split("/")[5:6] == [name] for line in found[0].splitlines())

    def layout(self, path: str) -> FileLayout:
        """Size and extents of a regular file (one debugfs call)."""
        found = self._read_only([f"stat {check_path(path)}", f"ex -l {check_path(path)}"], path)
        if found is None:
            raise VaultError(
                f"{path} is missing from the volume.",
                fix="check the name, or that the volume is the right one.",
            )
        stat, extents = found
        size_match = re.search(r"Size:\s+(\d+)", stat)
        if "Type: regular" not in stat or size_match is None:
            raise VaultError(
                f"{path} is not a regular file in the volume.", fix="check the checkpoint name."
            )
        flags = re.search(r"Flags:\s+0x([0-9a-fA-F]+)", stat)
        if flags and int(flags.group(1), 16) & _INLINE_DATA_FLAG:
            raise VaultError(
                f"{path} stores its data inline, which this reader does not support.",
                fix="create the file system without the inline_data feature.",
            )
        rows = []
        for line in extents.splitlines():
            row = _EXTENT_ROW.match(line)
            if row:
                logical, _, physical, _, length, kind = row.groups()
                rows.append(Extent(int(logical), int(physical), int(length), kind == "Uninit"))
        return FileLayout(int(size_match.group(1)), tuple(rows))

    def read_file(self, path: str) -> bytes:
        """Contents of a regular file, copied out of the mapped image by extent."""
        with self._pieces(path) as pieces:
            # join() over views of the mapping copies each byte once, straight into the result.
            return b"".join(pieces)

    def read_file_hashed(self, path: str) -> tuple[bytes, str]:
        """Contents and SHA-256 (hex) of a regular file, the copy and the hash side by side.

        A second thread hashes while this one copies. hashlib lets go of the GIL while it
        hashes, but the copy (one join) holds it throughout, and the hashing thread needs it
        between pieces; so the copy starts only once the hash has reached the largest piece.
        On two cores the read then costs about what the hash alone costs.
        """
        digest = hashlib.sha256()
        with self._pieces(path) as pieces, ThreadPoolExecutor(1) as pool:
            largest = max(range(len(pieces)), key=lambda index: len(pieces[index]))
            reached = threading.Event()

            def hash_all() -> None:
                try:
                    for index, piece in enumerate(pieces):
                        if index == largest:
                            reached.set()
                        digest.update(piece)
                finally:
                    reached.set()

            hashing = pool.submit(hash_all)
            reached.wait()
            data = b"".join(pieces)
            hashing.result()
        return data, digest.hexdigest()

    @contextmanager
    def _pieces(self, path: str) -> Iterator[list[bytes | memoryview]]:
        """The file's contents in order: views of the mapped image, and zeros for holes."""
        layout = self.layout(path)
        block = self.block_size
        runs: list[list[int]] = []  # [file offset, image offset, length], merged when adjacent
        for extent in layout.extents:
            start = extent.logical * block
            if extent.uninit or start >= layout.size:
                continue  # holes and uninitialized extents read as zeros
            length = min(extent.length * block, layout.size - start)
            source = extent.physical * block
            if source + length > self.size:
                raise VaultError(
                    f"{path} points past the end of the file system: the volume is damaged.",
                    fix="restore the volume file from a good copy.",
                )
            last = runs[-1] if runs else None
            if last and last[0] + last[2] == start and last[1] + last[2] == source:
                last[2] += length
            else:
                runs.append([start, source, length])
        image = memoryview(self._map)
        pieces: list[bytes | memoryview] = []
        try:
            at = 0
            for start, source, length in runs:
                pieces += [bytes(start - at), image[source : source + length]]
                at = start + length
            pieces.append(bytes(layout.size - at))
            yield pieces
        finally:
            pieces.clear()
            image.release()

