"""TensorChunk messages as bytes, built and read without copying the tensor data through protobuf.

A ``TensorChunk`` is almost all ``TensorPiece.data``. Built through protobuf, every byte is
copied out of the array, into the message, and into the serialized message; read back, into
the parsed message and out of it again. On a 100 MB model those copies cost more than TLS and
the socket. Here a chunk is serialized with one copy (the join that makes the gRPC message)
and parsed with none: a piece's data is a view of the received message.

The bytes are the protobuf encoding of the same message (``serialize_tensors`` yields exactly
``encode_tensors(...)[i].SerializeToString()``), so either side may use plain protobuf. The
parser walks only the framing; everything but ``data`` (names, enums, shapes, the header) is
still parsed by protobuf itself. What protobuf refuses is refused, and a little more: a group,
or a known field with the wrong wire type, which protobuf would skip and no writer produces.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import TypeVar

from google.protobuf.message import DecodeError

from hfl_lab._exceptions import WireFormatError
from trainer.proto import parameter_server_pb2 as pb
from trainer.tensors import DEFAULT_CHUNK_BYTES, Array, PlannedPiece, plan_chunks

__all__ = [
    "PULL_METHOD",
    "PUSH_METHOD",
    "SerializedChunk",
    "WireChunk",
    "WireFormatError",
    "WirePiece",
    "parse_chunk",
    "serialize_tensors",
]

_SERVICE = pb.DESCRIPTOR.services_by_name["ParameterServer"].full_name
#: the RPCs whose messages are tensor chunks: gRPC method paths
PULL_METHOD = f"/{_SERVICE}/PullParameters"
PUSH_METHOD = f"/{_SERVICE}/PushUpdate"

# protobuf wire types and the tags of TensorChunk / TensorPiece fields (see the .proto)
_VARINT, _I64, _LEN, _I32 = 0, 1, 2, 5
_CHUNK_HEADER, _CHUNK_PIECES, _CHUNK_FINAL = 1, 2, 3
_PIECE_DATA = 7
_TAG_HEADER = bytes([_CHUNK_HEADER << 3 | _LEN])
_TAG_PIECE = bytes([_CHUNK_PIECES << 3 | _LEN])
_TAG_DATA = bytes([_PIECE_DATA << 3 | _LEN])
_FINAL_TRUE = bytes([_CHUNK_FINAL << 3 | _VARINT, 1])
_MAX_VARINT_BYTES = 10
#: pieces up to this size are parsed by protobuf whole: copying a few kB costs less than
#: walking their fields in Python
_SMALL_PIECE_BYTES = 16 << 10


# --------------------------------------------------------------------------------- writing


@dataclass(frozen=True)
class SerializedChunk:
    """One serialized ``TensorChunk``, how many tensors start in it and its tensor bytes."""

    data: bytes
    tensors_started: int
    tensor_bytes: int


def serialize_tensors(
    tensors: Mapping[str, Array],
    *,
    header: pb.StreamHeader | None = None,
    wire_dtype: str = "float32",
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
) -> Iterator[SerializedChunk]:
    """``encode_tensors`` as serialized messages: each tensor byte is copied once, here."""
    for planned in plan_chunks(tensors, header=header, wire_dtype=wire_dtype,
                               chunk_bytes=chunk_bytes):
        parts: list[bytes | memoryview] = []
        if planned.header is not None:
            encoded = planned.header.SerializeToString()
            parts += (_TAG_HEADER, _varint_bytes(len(encoded)), encoded)
        for piece in planned.pieces:
            parts += _piece_parts(piece)
        if planned.final:
            parts.append(_FINAL_TRUE)
        started = (planned.tensors_started if planned.tensors_started is not None
                   else sum(1 for piece in planned.pieces if piece.offset == 0))
        size = sum(len(piece.data) for piece in planned.pieces)
        yield SerializedChunk(b"".join(parts), started, size)


def _piece_parts(piece: PlannedPiece) -> tuple[bytes | memoryview, ...]:
    meta = pb.TensorPiece(
        name=piece.name,
        wire_dtype=piece.wire_enum,  # type: ignore[arg-type]
        offset=piece.offset,
        total_bytes=piece.total_bytes,
    )
    if piece.offset == 0:
        meta.dtype = piece.dtype_enum  # type: ignore[assignment]
        meta.shape.extend(piece.shape)
    encoded = meta.SerializeToString()
    size = len(piece.data)
    if not size:  # protobuf leaves an empty bytes field out
        return _TAG_PIECE, _varint_bytes(len(encoded)), encoded
    length = _varint_bytes(size)
    return (
        _TAG_PIECE,
        _varint_bytes(len(encoded) + 1 + len(length) + size),
        encoded,
        _TAG_DATA,
        length,
        piece.data.data,  # the array's memory, not a copy
    )


def _varint_bytes(value: int) -> bytes:
    out = bytearray()
    while value > 0x7F:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


# --------------------------------------------------------------------------------- reading


class WirePiece:
    """A ``TensorPiece`` whose ``data`` is a read-only view of the received message."""

    __slots__ = ("data", "dtype", "name", "offset", "shape", "total_bytes", "wire_dtype")

    def __init__(self, meta: pb.TensorPiece, data: memoryview) -> None:
        self.name: str = meta.name
        self.dtype: int = meta.dtype
        self.shape: tuple[int, ...] = tuple(meta.shape)
        self.wire_dtype: int = meta.wire_dtype
        self.offset: int = meta.offset
        self.total_bytes: int = meta.total_bytes
        self.data = data


class WireChunk:
    """A parsed ``TensorChunk``: the same fields as the message; large pieces as
    :class:`WirePiece`, small ones as protobuf messages."""

    __slots__ = ("_has_header", "final", "header", "pieces")

    def __init__(self, header: pb.StreamHeader | None,
                 pieces: list[WirePiece | pb.TensorPiece], final: bool) -> None:
        self._has_header = header is not None
        self.header = header if header is not None else pb.StreamHeader()
        self.pieces = pieces
        self.final = final

    def HasField(self, name: str) -> bool:  # the protobuf message's spelling
        if name != "header":
            raise ValueError(f"TensorChunk has no message field {name!r}")
        return self._has_header


def parse_chunk(message: bytes) -> WireChunk:
    """Read a serialized ``TensorChunk``; raise :class:`WireFormatError` if it is malformed.

    Protobuf's rules hold: fields in any order, unknown fields skipped, a repeated header
    merged, the last ``final`` and the last ``data`` of a piece winning.
    """
    view = memoryview(message)
    headers: list[memoryview] = []
    pieces: list[WirePiece | pb.TensorPiece] = []
    final = False
    pos, end = 0, len(message)
    while pos < end:
        field, kind, pos = _key(message, pos, end)
        if kind == _LEN:
            size, pos = _varint(message, pos, end)
            stop = pos + size
            if stop > end:
                raise WireFormatError("a field runs past the end of the message")
            if field == _CHUNK_HEADER:
                headers.append(view[pos:stop])
            elif field == _CHUNK_PIECES:
                if size <= _SMALL_PIECE_BYTES:
                    pieces.append(_parse(pb.TensorPiece, message[pos:stop]))
                else:
                    pieces.append(_parse_piece(message, view, pos, stop))
            pos = stop
        elif field in (_CHUNK_HEADER, _CHUNK_PIECES) or (field == _CHUNK_FINAL and kind):
            raise WireFormatError(f"field {field} of TensorChunk has the wrong wire type {kind}")
        elif field == _CHUNK_FINAL:
            value, pos = _varint(message, pos, end)
            final = value != 0
        else:
            pos = _skip(message, kind, pos, end)
    header = _parse(pb.StreamHeader, b"".join(headers)) if headers else None
    return WireChunk(header, pieces, final)


def _parse_piece(message: bytes, view: memoryview, start: int, end: int) -> WirePiece:
    """One piece: protobuf parses every field but ``data``, which stays a view."""
    meta: list[list[int]] = []  # byte ranges of the other fields, in order
    data = view[0:0]
    pos = start
    while pos < end:
        begin = pos
        field, kind, pos = _key(message, pos, end)
        if field == _PIECE_DATA:
            if kind != _LEN:
                raise WireFormatError(f"TensorPiece.data has the wrong wire type {kind}")
            size, pos = _varint(message, pos, end)
            if pos + size > end:
                raise WireFormatError("TensorPiece.data runs past the end of its piece")
            data = view[pos : pos + size]
            pos += size
            continue
        pos = _skip(message, kind, pos, end)
        if meta and meta[-1][1] == begin:
            meta[-1][1] = pos
        else:
            meta.append([begin, pos])
    fields = b"".join(view[a:b] for a, b in meta)
    return WirePiece(_parse(pb.TensorPiece, fields), data)


_Message = TypeVar("_Message", pb.StreamHeader, pb.TensorPiece)


def _parse(cls: type[_Message], data: bytes) -> _Message:
    try:
        return cls.FromString(data)
    except DecodeError as e:
        raise WireFormatError(f"{cls.__name__}: {e}") from None


def _key(message: bytes, pos: int, end: int) -> tuple[int, int, int]:
    key, pos = _varint(message, pos, end)
    field, kind = key >> 3, key & 7
    if field == 0:
        raise WireFormatError("field number 0")
    return field, kind, pos


def _varint(message: bytes, pos: int, end: int) -> tuple[int, int]:
    if pos < end and message[pos] < 0x80:  # the common case: one byte
        return message[pos], pos + 1
    value = shift = 0
    for index in range(pos, min(end, pos + _MAX_VARINT_BYTES)):
        byte = message[index]
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value & 0xFFFF_FFFF_FFFF_FFFF, index + 1
        shift += 7
    raise WireFormatError("truncated or overlong varint")


def _skip(message: bytes, kind: int, pos: int, end: int) -> int:
    """Past the value of a field of wire type ``kind`` (groups are refused)."""
    if kind == _VARINT:
        return _varint(message, pos, end)[1]
    if kind == _LEN:
        size, pos = _varint(message, pos, end)
        pos += size
    elif kind == _I64:
        pos += 8
    elif kind == _I32:
        pos += 4
    else:
        raise WireFormatError(f"wire type {kind} is not used by TensorChunk")
    if pos > end:
        raise WireFormatError("a field runs past the end of the message")
    return pos
