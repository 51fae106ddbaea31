"""Tensor codec: model tensor specs, and numpy arrays to chunked raw-byte protobuf streams.

The way back (reassembly and validation) is :mod:`trainer.tensor_decode`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Final

import grpc
import numpy as np
import numpy.typing as npt

from hfl_lab._exceptions import ConfigError, TensorValidationError
from trainer.flat import FlatTensors
from trainer.proto import parameter_server_pb2 as pb

DEFAULT_CHUNK_BYTES: Final = 1 << 20
#: gRPC's default receive limit is 4 MiB per message; chunks stay below it with room to spare
MAX_CHUNK_BYTES: Final = 4 << 20
#: declared stream bytes may exceed the model's size by this factor before being refused
DEFAULT_SIZE_MARGIN: Final = 1.1
#: protobuf framing of one TensorPiece besides its name and data (tags, lengths, shape, ints)
_PIECE_FRAMING_BYTES: Final = 48

# dtype name (numpy spelling) <-> wire enum. bfloat16 exists only on the wire.
DTYPE_TO_ENUM: Final[dict[str, int]] = {
    "float32": pb.DTYPE_FLOAT32,
    "float16": pb.DTYPE_FLOAT16,
    "bfloat16": pb.DTYPE_BFLOAT16,
    "float64": pb.DTYPE_FLOAT64,
    "int8": pb.DTYPE_INT8,
    "int16": pb.DTYPE_INT16,
    "int32": pb.DTYPE_INT32,
    "int64": pb.DTYPE_INT64,
    "uint8": pb.DTYPE_UINT8,
    "bool": pb.DTYPE_BOOL,
}
_ENUM_TO_DTYPE: Final = {value: name for name, value in DTYPE_TO_ENUM.items()}
TENSOR_DTYPES: Final = frozenset(DTYPE_TO_ENUM) - {"bfloat16"}
WIRE_DTYPES: Final = ("float32", "float16", "bfloat16")
_WIRE_ITEMSIZE: Final = {"bfloat16": 2}

Array = npt.NDArray[Any]


# dtype.name is slow enough to show on a ResNet's 279 tensors; a dict lookup is not
_NAME_OF_DTYPE: Final = {np.dtype(name): name for name in TENSOR_DTYPES}


def _dtype_of(array: Array) -> str:
    return _NAME_OF_DTYPE.get(array.dtype) or array.dtype.name


def dtype_name(value: int) -> str:
    return _ENUM_TO_DTYPE.get(value, f"unknown dtype enum {value}")


@dataclass(frozen=True)
class TensorSpec:
    """Name, dtype, shape and trainability of one model tensor."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    trainable: bool = True

    def __post_init__(self) -> None:
        if not self.name:
            raise ConfigError("a tensor spec has an empty name.", fix="name every tensor.")
        if self.dtype not in TENSOR_DTYPES:
            raise ConfigError(
                f"tensor '{self.name}' has dtype {self.dtype!r}, which cannot travel.",
                fix=f"use one of {sorted(TENSOR_DTYPES)}.",
            )
        if any(dim < 0 for dim in self.shape):
            raise ConfigError(f"tensor '{self.name}' has a negative dimension {self.shape}.")

    @property
    def size(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.size * np.dtype(self.dtype).itemsize

    @classmethod
    def of(cls, name: str, array: Array, *, trainable: bool = True) -> TensorSpec:
        return cls(name, _dtype_of(array), tuple(int(d) for d in array.shape), trainable)

    def to_proto(self) -> pb.TensorSpec:
        return pb.TensorSpec(
            name=self.name,
            dtype=DTYPE_TO_ENUM[self.dtype],  # type: ignore[arg-type]
            shape=self.shape,
            trainable=self.trainable,
        )

    @classmethod
    def from_proto(cls, message: pb.TensorSpec) -> TensorSpec:
        dtype = dtype_name(message.dtype)
        return cls(message.name, dtype, tuple(message.shape), message.trainable)


def specs_for(specs: Iterable[TensorSpec], kind: int) -> list[TensorSpec]:
    """The tensors a stream of ``kind`` (``pb.UpdateKind``) carries, in model order.

    Both kinds carry every tensor. A gradient stream holds the gradients of the trainable
    tensors and the new values of the non-trainable ones (the batch-norm moving statistics the
    worker's forward pass produced), which the PS averages like the reference does.
    """
    if kind not in (pb.UPDATE_KIND_GRADIENTS, pb.UPDATE_KIND_WEIGHTS):
        raise TensorValidationError(
            f"unknown update kind {kind}.",
            code=grpc.StatusCode.INVALID_ARGUMENT,
            expected="GRADIENTS or WEIGHTS",
            actual=kind,
            fix="set StreamHeader.kind to UPDATE_KIND_GRADIENTS or UPDATE_KIND_WEIGHTS.",
        )
    return list(specs)


def check_model_version(received: int, current: int, *, max_staleness: int = 0) -> int:
    """Return the staleness of an update computed from ``received``; refuse it when too old.

    Raises ``TensorValidationError`` with ``FAILED_PRECONDITION`` when the update is more
    than ``max_staleness`` versions behind, or claims a version the server never had.
    """
    if received > current:
        raise TensorValidationError(
            f"update claims model version {received}, but the current version is {current}.",
            code=grpc.StatusCode.FAILED_PRECONDITION,
            expected=f"<= {current}",
            actual=received,
            fix="pull the parameters again and recompute the update.",
        )
    staleness = current - received
    if staleness > max_staleness:
        raise TensorValidationError(
            f"update is stale: computed from model version {received}, current is {current} "
            f"(staleness {staleness} > allowed {max_staleness}).",
            code=grpc.StatusCode.FAILED_PRECONDITION,
            expected=f">= {current - max_staleness}",
            actual=received,
            fix="pull the current parameters and recompute the update.",
        )
    return staleness


# --------------------------------------------------------------------------- float compression


def float32_to_bfloat16_bits(values: Array) -> npt.NDArray[np.uint16]:
    """Upper 16 bits of each float32, rounded to nearest even; NaN stays a (quiet) NaN."""
    bits = np.ascontiguousarray(values, dtype=np.float32).view(np.uint32)
    # Adding 0x7FFF plus the lowest kept bit rounds half to even before truncation; in-place
    # steps keep the temporaries to one array on a 100 MB model.
    rounded = bits >> 16
    rounded &= 1
    rounded += 0x7FFF
    rounded += bits
    rounded >>= 16
    out = rounded.astype(np.uint16)
    nan = np.isnan(values)
    if nan.any():  # rounding could carry a NaN payload into the exponent (-> Inf or wrap)
        out[nan] = ((bits[nan] >> 16) | 0x0040).astype(np.uint16)
    return out


def bfloat16_bits_to_float32(bits: npt.NDArray[np.uint16]) -> npt.NDArray[np.float32]:
    widened = bits.astype(np.uint32)
    widened <<= 16
    return widened.view(np.float32)


def _to_wire(name: str, array: Array, wire_dtype: str) -> Array:
    """Little-endian contiguous array of the elements as they travel."""
    if array.dtype == np.float32 and wire_dtype == "float16":
        return _to_float16(array, lambda _: (name, array))
    if array.dtype == np.float32 and wire_dtype == "bfloat16":
        return float32_to_bfloat16_bits(array).astype("<u2", copy=False)
    return np.ascontiguousarray(array, dtype=array.dtype.newbyteorder("<"))


# --------------------------------------------------------------------------------- encoding


@dataclass(frozen=True)
class PlannedPiece:
    """One run of a tensor's wire bytes, as a view of the array: not copied yet."""

    name: str
    wire_enum: int
    offset: int
    total_bytes: int
    data: npt.NDArray[np.uint8]
    #: the tensor's dtype enum and shape, carried by its first piece only (offset 0)
    dtype_enum: int = 0
    shape: tuple[int, ...] = ()


@dataclass(frozen=True)
class PlannedChunk:
    """The pieces of one ``TensorChunk``; the first chunk has the header, the last is final."""

    header: pb.StreamHeader | None
    pieces: list[PlannedPiece]
    final: bool
    #: tensors whose first byte is in this chunk (None: the pieces at offset 0)
    tensors_started: int | None = None


def encode_tensors(
    tensors: Mapping[str, Array],
    *,
    header: pb.StreamHeader | None = None,
    wire_dtype: str = "float32",
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
) -> Iterator[pb.TensorChunk]:
    """Pack ``tensors`` (in mapping order) into ``TensorChunk`` messages of about ``chunk_bytes``.

    Small tensors share a chunk; a large one is split into pieces across chunks. The first
    message carries ``header`` (kind, version, worker, ...) completed with the tensor count
    and total wire bytes; the last one has ``final`` set. float32 tensors are sent as
    ``wire_dtype``; tensors of any other dtype travel as they are.
    (:func:`trainer.tensor_wire.serialize_tensors` makes the same messages as bytes.)
    """
    for planned in plan_chunks(tensors, header=header, wire_dtype=wire_dtype,
                               chunk_bytes=chunk_bytes):
        chunk = pb.TensorChunk(final=planned.final)
        if planned.header is not None:
            chunk.header.CopyFrom(planned.header)
        for p in planned.pieces:
            piece = chunk.pieces.add(
                name=p.name,
                wire_dtype=p.wire_enum,
                offset=p.offset,
                total_bytes=p.total_bytes,
                data=p.data.tobytes(),
            )
            if p.offset == 0:
                piece.dtype = p.dtype_enum  # type: ignore[assignment]
                piece.shape.extend(p.shape)
        yield chunk


def plan_chunks(
    tensors: Mapping[str, Array],
    *,
    header: pb.StreamHeader | None = None,
    wire_dtype: str = "float32",
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
) -> Iterator[PlannedChunk]:
    """The chunk layout of :func:`encode_tensors`, with each piece's data as an array view.

    :class:`~trainer.flat.FlatTensors` make a flat stream (:func:`plan_flat_chunks`)."""
    if isinstance(tensors, FlatTensors):
        yield from plan_flat_chunks(tensors, header=header, wire_dtype=wire_dtype,
                                    chunk_bytes=chunk_bytes)
        return
    _check_stream_options(wire_dtype, chunk_bytes)
    wire_names = {name: _wire_dtype_of(name, array, wire_dtype) for name, array in tensors.items()}
    stream_header = pb.StreamHeader()
    if header is not None:
        stream_header.CopyFrom(header)
    stream_header.tensor_count = len(tensors)
    stream_header.total_bytes = sum(
        array.size * wire_itemsize(wire_names[name]) for name, array in tensors.items()
    )
    first: pb.StreamHeader | None = stream_header
    pieces: list[PlannedPiece] = []
    room = chunk_bytes
    for name, array in tensors.items():
        wire_enum = DTYPE_TO_ENUM[wire_names[name]]
        data = _to_wire(name, array, wire_names[name]).reshape(-1).view(np.uint8)
        total = len(data)
        offset = 0
        while True:
            size = min(max(room, 0), total - offset)
            if size == 0 and offset < total:  # this chunk is full: send it, start the next
                yield PlannedChunk(first, pieces, final=False)
                first, pieces, room = None, [], chunk_bytes
                continue
            if offset == 0:
                pieces.append(PlannedPiece(name, wire_enum, 0, total, data[:size],
                                           DTYPE_TO_ENUM[_dtype_of(array)], array.shape))
            else:
                pieces.append(
                    PlannedPiece(name, wire_enum, offset, total, data[offset : offset + size])
                )
            # names and framing count against the chunk, so a message of many small tensors
            # stays near chunk_bytes too
            room -= size + len(name) + _PIECE_FRAMING_BYTES
            offset += size
            if offset >= total:
                break
    yield PlannedChunk(first, pieces, final=True)


def plan_flat_chunks(
    tensors: FlatTensors,
    *,
    header: pb.StreamHeader | None = None,
    wire_dtype: str = "float32",
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
) -> Iterator[PlannedChunk]:
    """A flat stream: the buffer's wire bytes in one piece per chunk, the layout's digest in
    the header (see ``StreamHeader.layout_digest``)."""
    _check_stream_options(wire_dtype, chunk_bytes)
    layout = tensors.layout
    wire = _flat_to_wire(tensors, wire_dtype).view(np.uint8)
    itemsize = wire_itemsize(wire_dtype)
    stream_header = pb.StreamHeader()
    if header is not None:
        stream_header.CopyFrom(header)
    stream_header.tensor_count = len(layout.entries)
    stream_header.total_bytes = total = len(wire)
    stream_header.layout_digest = layout.digest
    wire_enum = DTYPE_TO_ENUM[wire_dtype]
    # whole elements per chunk, and room for the header and framing in the first
    step = max(itemsize, (chunk_bytes - _PIECE_FRAMING_BYTES) // itemsize * itemsize)
    first: pb.StreamHeader | None = stream_header
    offset = 0
    while True:
        size = min(step, total - offset)
        piece = PlannedPiece("", wire_enum, offset, total, wire[offset:offset + size])
        end = offset + size
        final = end >= total
        started = layout.tensors_starting(offset // itemsize if offset else -1,
                                          end // itemsize if not final else layout.size + 1)
        yield PlannedChunk(first, [piece], final=final, tensors_started=started)
        if final:
            return
        first, offset = None, end


def _flat_to_wire(tensors: FlatTensors, wire_dtype: str) -> Array:
    buffer = tensors.buffer
    if wire_dtype == "float32":
        return buffer.astype("<f4", copy=False)
    if wire_dtype == "bfloat16":
        return float32_to_bfloat16_bits(buffer).astype("<u2", copy=False)

    def tensor_at(element: int) -> tuple[str, Array]:
        name = tensors.layout.name_at(element)
        return name, tensors[name]

    return _to_float16(buffer, tensor_at)


def _to_float16(values: Array, tensor_at: Callable[[int], tuple[str, Array]]) -> Array:
    """float32 ``values`` as float16 on the wire; refused where a finite value overflows, naming
    the tensor that holds the first one (``tensor_at``: the name and values of the tensor that
    holds element ``i`` of ``values``, flattened)."""
    with np.errstate(over="ignore"):  # overflow is reported below, with the fix
        wire = values.astype("<f2")
    if not np.isfinite(wire).all() and np.isfinite(values).all():
        name, tensor = tensor_at(int(np.flatnonzero(~np.isfinite(wire))[0]))
        raise TensorValidationError(
            f"tensor '{name}' has values beyond the float16 range (max |x| = "
            f"{float(np.abs(tensor).max()):.4g} > 65504).",
            code=grpc.StatusCode.INVALID_ARGUMENT,
            tensor=name,
            fix="use wire dtype bfloat16 (float32 range) or float32 for this model.",
        )
    return wire


def _check_stream_options(wire_dtype: str, chunk_bytes: int) -> None:
    if wire_dtype not in WIRE_DTYPES:
        raise ConfigError(
            f"wire dtype {wire_dtype!r} is unknown.", fix=f"use one of {WIRE_DTYPES}."
        )
    if not 1 <= chunk_bytes <= MAX_CHUNK_BYTES:
        raise ConfigError(
            f"chunk size {chunk_bytes} B is outside 1 B .. {MAX_CHUNK_BYTES} B.",
            fix="use the default of 1 MiB unless measurements say otherwise.",
        )


def _wire_dtype_of(name: str, array: Array, wire_dtype: str) -> str:
    """Check that ``array`` can travel; compression applies to float32 only."""
    TensorSpec.of(name, array)  # refuses empty names and dtypes that cannot travel
    return wire_dtype if array.dtype == np.float32 else _dtype_of(array)


def wire_itemsize(wire_dtype: str) -> int:
    return 2 if wire_dtype == "bfloat16" else np.dtype(wire_dtype).itemsize


def wire_numpy_dtype(wire_dtype: str) -> np.dtype[Any]:
    # bfloat16 arrives as its raw 16-bit patterns; widened to float32 after reassembly.
    return np.dtype("<u2") if wire_dtype == "bfloat16" else np.dtype(wire_dtype).newbyteorder("<")
