"""Which blocks of an ext4 image are in use, read from its block bitmaps.

The user-space vault compares only these with what is on disk after a change: a block free in
the new state holds nothing the file system refers to, so whatever debugfs left in it need not
reach the disk (should it be used later, it is compared then). Offsets are those of
Documentation/filesystems/ext4/super.rst and group_descr.rst.
"""

from __future__ import annotations

import struct

import numpy as np
import numpy.typing as npt

_SUPERBLOCK = 1024
_INCOMPAT_64BIT = 0x80
_BG_BLOCK_UNINIT = 0x2  # the group's bitmap was never written: treat the group as used


def used_blocks(image: npt.NDArray[np.uint8]) -> npt.NDArray[np.bool_] | None:
    """One flag per block of the image: True where the block bitmaps say "in use", and for
    every block of a group whose bitmap is uninitialized or of the image past the file system.
    None when the superblock describes something this reader does not follow."""
    raw = image[_SUPERBLOCK : _SUPERBLOCK + 1024].tobytes()
    (blocks_lo,) = struct.unpack_from("<I", raw, 0x4)
    first_data_block, log_block = struct.unpack_from("<II", raw, 0x14)
    (per_group,) = struct.unpack_from("<I", raw, 0x20)
    (incompat,) = struct.unpack_from("<I", raw, 0x60)
    (desc_size,) = struct.unpack_from("<H", raw, 0xFE)
    (blocks_hi,) = struct.unpack_from("<I", raw, 0x150)
    wide = bool(incompat & _INCOMPAT_64BIT)
    block = 1024 << log_block
    blocks = blocks_lo | (blocks_hi << 32 if wide else 0)
    desc_size = desc_size if wide else 32
    image_blocks = image.size // block
    if not per_group or per_group % 8 or per_group > 8 * block or desc_size < 32:
        return None
    if blocks > image_blocks or first_data_block >= blocks:
        return None
    used = np.ones(image_blocks, dtype=bool)
    groups = -(-(blocks - first_data_block) // per_group)
    table = (first_data_block + 1) * block
    if table + groups * desc_size > image.size:
        return None
    for group in range(groups):
        at = table + group * desc_size
        descriptor = image[at : at + desc_size].tobytes()
        (bitmap,) = struct.unpack_from("<I", descriptor, 0x0)
        (flags,) = struct.unpack_from("<H", descriptor, 0x12)
        if desc_size >= 64:
            bitmap |= struct.unpack_from("<I", descriptor, 0x20)[0] << 32
        if flags & _BG_BLOCK_UNINIT:
            continue
        if bitmap >= image_blocks:
            return None
        first = first_data_block + group * per_group
        count = min(per_group, blocks - first)
        bits = image[bitmap * block : bitmap * block + per_group // 8]
        used[first : first + count] = np.unpackbits(bits, bitorder="little")[:count].astype(bool)
    return used
