"""A bounds-checked little-endian reader that names the field and offset of every failure."""

from __future__ import annotations

import struct

from hfl_lab._exceptions import QuoteFormatError


class Reader:
    """Reads fixed-size little-endian fields; a short read raises ``QuoteFormatError``."""

    def __init__(self, data: bytes, offset: int = 0, end: int | None = None) -> None:
        self.data = data
        self.offset = offset
        self.end = len(data) if end is None else end

    @property
    def remaining(self) -> int:
        return self.end - self.offset

    def take(self, size: int, field: str) -> bytes:
        if size < 0 or self.offset + size > self.end:
            raise QuoteFormatError(
                f"truncated: needs {size} bytes, only {max(self.remaining, 0)} left",
                field=field,
                offset=self.offset,
            )
        chunk = self.data[self.offset : self.offset + size]
        self.offset += size
        return chunk

    def u16(self, field: str) -> int:
        value: int = struct.unpack("<H", self.take(2, field))[0]
        return value

    def u32(self, field: str) -> int:
        value: int = struct.unpack("<I", self.take(4, field))[0]
        return value

    def sub(self, size: int, field: str) -> Reader:
        """A reader over the next ``size`` bytes, which this reader skips."""
        start = self.offset
        self.take(size, field)
        return Reader(self.data, start, start + size)


def u16(value: int) -> bytes:
    return struct.pack("<H", value)


def u32(value: int) -> bytes:
    return struct.pack("<I", value)
