"""Big files placed by the vault itself: blocks allocated once, data copied straight into them.

debugfs ``write`` copies a file's contents through a pipe of memfds into the image, about as
slowly as the cipher runs. For a big file the vault instead has debugfs only *allocate* it
(``fallocate``: metadata, no data), marks the extents it got as initialized (ext4 allocates them
uninitialized, which would read back as zeros), and copies the data into those blocks of the
mapped image itself; the sectors are then encrypted and written in a few long runs. The file
system stays one that e2fsck and the kernel read as usual: ``sif`` rewrites the inode's
``i_block`` words and its checksum the way any inode field change does.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from hfl_lab.vault.ext4_image import Extent

# One row of debugfs `ex` output: level/depth, entry/entries, logical range, physical range,
# length, flags.
_ROW = re.compile(
    r"^\s*(\d+)/\s*(\d+)\s+(\d+)/\s*(\d+)\s+(\d+)\s*-\s*(\d+)\s+(\d+)\s*-\s*(\d+)\s+(\d+)\s*(\w*)"
)
# ext4 extent tree (Documentation/filesystems/ext4/dynamic.rst, "Extent Tree"): i_block holds a
# 12-byte header and up to four 12-byte leaf entries (ee_block, ee_len | ee_start_hi << 16,
# ee_start_lo), i.e. 32-bit words 3k+3 .. 3k+5 for entry k. ee_len above 32768 marks an
# uninitialized extent of ee_len - 32768 blocks.
_IN_INODE_ENTRIES = 4
# debugfs names the 15 words of i_block as for block maps: 12 direct, then the indirect ones.
_WORD_NAMES = {12: "IND", 13: "DIND", 14: "TIND"}


@dataclass(frozen=True)
class Allocation:
    """The commands that make ``path`` a file of ``size`` bytes with blocks but no data yet."""

    path: str
    size: int
    blocks: int

    def commands(self, empty_source: str) -> list[str]:
        # The last command reports where the blocks went; it is parsed by ``leaf_extents``.
        return [
            f"write {empty_source} {self.path}",
            f"fallocate {self.path} 0 {self.blocks - 1}",
            f"sif {self.path} size {self.size}",
            f"sif {self.path} mode 0100600",
            f"ex {self.path}",
        ]


def allocation(path: str, size: int, block_size: int) -> Allocation:
    return Allocation(path, size, -(-size // block_size))


def leaf_extents(table: str, blocks: int) -> list[tuple[int, Extent]] | None:
    """(entry index, extent) of every extent in a debugfs ``ex`` table, when they all sit in the
    inode itself and cover blocks 0..``blocks``-1 in order; None otherwise (a deeper tree, or an
    allocation that is not what was asked for), and the caller falls back to debugfs ``write``."""
    found: list[tuple[int, Extent]] = []
    for line in table.splitlines():
        row = _ROW.match(line)
        if row is None:
            continue
        level, depth, entry, _, first, _, physical, _, length, flags = row.groups()
        if int(level) or int(depth):
            return None
        extent = Extent(int(first), int(physical), int(length), flags == "Uninit")
        found.append((int(entry) - 1, extent))
    covered = 0
    for index, (entry, extent) in enumerate(found):
        if entry != index or index >= _IN_INODE_ENTRIES or extent.logical != covered:
            return None
        covered += extent.length
    return found if found and covered == blocks else None


def initialize_commands(path: str, extents: Sequence[tuple[int, Extent]]) -> list[str]:
    """``sif`` commands that turn the uninitialized extents of ``path`` into initialized ones."""
    commands = []
    for entry, extent in extents:
        if extent.uninit:
            word = extent.length | (extent.physical >> 32) << 16
            index = 3 * entry + 4
            commands.append(f"sif {path} block[{_WORD_NAMES.get(index, index)}] {word}")
    return commands


def place(
    image: npt.NDArray[np.uint8],
    block_size: int,
    extents: Sequence[Extent],
    data: bytes | bytearray | memoryview,
) -> None:
    """Copy ``data`` into its blocks in the image; the rest of the last block becomes zeros, as
    ext4 expects past the end of a file."""
    source = np.frombuffer(data, dtype=np.uint8)
    for extent in extents:
        start = extent.logical * block_size
        stop = min(source.size, start + extent.length * block_size)
        target = extent.physical * block_size
        image[target : target + stop - start] = source[start:stop]
        image[target + stop - start : target + extent.length * block_size] = 0
