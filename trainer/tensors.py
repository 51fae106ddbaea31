"""Tensor codec: numpy arrays to chunked raw-byte protobuf streams and back, with validation."""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Final

import grpc
import numpy as np
import numpy.typing as npt

from hfl_lab._exceptions import ConfigError, HflLabError
from trainer.proto import parameter_server_pb2 as pb

DEFAULT_CHUNK_BYTES: Final = 1 << 20
#: gRPC's default receive limit is 4 MiB per message; chunks stay below it with room to spare
MAX_CHUNK_BYTES: Final = 4 << 20
#: declared stream bytes may exceed the model's size by this factor before being refused
DEFAULT_SIZE_MARGIN: Final = 1.1
#: protobuf framing of one TensorPiece besides its name and data (tags, lengths, shape, ints)
_PIECE_FRAMING_BYTES: Final = 48

# dtype name (numpy spelling) <-> wire enum. bfloat16 exists only on the wire.
_DTYPE_TO_ENUM: Final[dict[str, int]] = {
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
_ENUM_TO_DTYPE: Final = {value: name for name, value in _DTYPE_TO_ENUM.items()}
TENSOR_DTYPES: Final = frozenset(_DTYPE_TO_ENUM) - {"bfloat16"}
WIRE_DTYPES: Final = ("float32", "float16", "bfloat16")
_WIRE_ITEMSIZE: Final = {"bfloat16": 2}

Array = npt.NDArray[Any]


# dtype.name is slow enough to show on a ResNet's 279 tensors; a dict lookup is not
_NAME_OF_DTYPE: Final = {np.dtype(name): name for name in TENSOR_DTYPES}


def _dtype_of(array: Array) -> str:
    return _NAME_OF_DTYPE.get(array.dtype) or array.dtype.name


def _dtype_name(value: int) -> str:
    return _ENUM_TO_DTYPE.get(value, f"unknown dtype enum {value}")


class TensorValidationError(HflLabError):
    """A tensor stream or a tensor in it is not what the model expects.

    ``code`` is the gRPC status the receiving side should answer with; ``tensor`` names the
    offending tensor (None for stream-level problems); ``expected``/``actual`` are the values
    compared.
    """

    def __init__(
        self,
        message: str,
        *,
        code: grpc.StatusCode,
        tensor: str | None = None,
        expected: object = None,
        actual: object = None,
        fix: str | None = None,
    ) -> None:
        super().__init__(message, fix=fix)
        self.code = code
        self.tensor = tensor
        self.expected = expected
        self.actual = actual


def _invalid(
    tensor: str | None, what: str, expected: object, actual: object
) -> TensorValidationError:
    where = f"tensor '{tensor}'" if tensor else "tensor stream"
    return TensorValidationError(
        f"{where}: {what}: expected {expected}, got {actual}.",
        code=grpc.StatusCode.INVALID_ARGUMENT,
        tensor=tensor,
        expected=expected,
        actual=actual,
        fix="send tensors encoded by trainer.tensors.encode_tensors from the model the "
        "parameter server announced at Register.",
    )


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
            dtype=_DTYPE_TO_ENUM[self.dtype],  # type: ignore[arg-type]
            shape=self.shape,
            trainable=self.trainable,
        )

    @classmethod
    def from_proto(cls, message: pb.TensorSpec) -> TensorSpec:
        dtype = _dtype_name(message.dtype)
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
        with np.errstate(over="ignore"):  # overflow is reported below, with the fix
            wire = array.astype("<f2")
        if not np.isfinite(wire).all() and np.isfinite(array).all():
            raise TensorValidationError(
                f"tensor '{name}' has values beyond the float16 range (max |x| = "
                f"{float(np.abs(array).max()):.4g} > 65504).",
                code=grpc.StatusCode.INVALID_ARGUMENT,
                tensor=name,
                fix="use wire dtype bfloat16 (float32 range) or float32 for this model.",
            )
        return wire
    if array.dtype == np.float32 and wire_dtype == "bfloat16":
        return float32_to_bfloat16_bits(array).astype("<u2", copy=False)
    return np.ascontiguousarray(array, dtype=array.dtype.newbyteorder("<"))


# --------------------------------------------------------------------------------- encoding


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
    """
    if wire_dtype not in WIRE_DTYPES:
        raise ConfigError(
            f"wire dtype {wire_dtype!r} is unknown.", fix=f"use one of {WIRE_DTYPES}."
        )
    if not 1 <= chunk_bytes <= MAX_CHUNK_BYTES:
        raise ConfigError(
            f"chunk size {chunk_bytes} B is outside 1 B .. {MAX_CHUNK_BYTES} B.",
            fix="use the default of 1 MiB unless measurements say otherwise.",
        )
    wire_names = {name: _wire_dtype_of(name, array, wire_dtype) for name, array in tensors.items()}
    stream_header = pb.StreamHeader()
    if header is not None:
        stream_header.CopyFrom(header)
    stream_header.tensor_count = len(tensors)
    stream_header.total_bytes = sum(
        array.size * _wire_itemsize(wire_names[name]) for name, array in tensors.items()
    )
    chunk = pb.TensorChunk(header=stream_header)
    room = chunk_bytes
    for name, array in tensors.items():
        wire_enum = _DTYPE_TO_ENUM[wire_names[name]]
        data = _to_wire(name, array, wire_names[name]).reshape(-1).view(np.uint8)
        total = len(data)
        offset = 0
        while True:
            size = min(max(room, 0), total - offset)
            if size == 0 and offset < total:  # this chunk is full: send it, start the next
                yield chunk
                chunk, room = pb.TensorChunk(), chunk_bytes
                continue
            piece = chunk.pieces.add(
                name=name,
                wire_dtype=wire_enum,
                offset=offset,
                total_bytes=total,
                data=data[offset : offset + size].tobytes(),
            )
            if offset == 0:
                piece.dtype = _DTYPE_TO_ENUM[_dtype_of(array)]  # type: ignore[assignment]
                piece.shape.extend(array.shape)
            # names and framing count against the chunk, so a message of many small tensors
            # stays near chunk_bytes too
            room -= size + len(name) + _PIECE_FRAMING_BYTES
            offset += size
            if offset >= total:
                break
    chunk.final = True
    yield chunk


def _wire_dtype_of(name: str, array: Array, wire_dtype: str) -> str:
    """Check that ``array`` can travel; compression applies to float32 only."""
    TensorSpec.of(name, array)  # refuses empty names and dtypes that cannot travel
    return wire_dtype if array.dtype == np.float32 else _dtype_of(array)


def _wire_itemsize(wire_dtype: str) -> int:
    return 2 if wire_dtype == "bfloat16" else np.dtype(wire_dtype).itemsize


def _wire_numpy_dtype(wire_dtype: str) -> np.dtype[Any]:
    # bfloat16 arrives as its raw 16-bit patterns; widened to float32 after reassembly.
    return np.dtype("<u2") if wire_dtype == "bfloat16" else np.dtype(wire_dtype).newbyteorder("<")


# --------------------------------------------------------------------------------- decoding


@dataclass(frozen=True)
class DecodedStream:
    """A validated tensor stream: its header and the tensors, in spec order."""

    header: pb.StreamHeader
    tensors: dict[str, Array] = field(default_factory=dict)


def decode_tensors(
    chunks: Iterable[pb.TensorChunk],
    specs: Sequence[TensorSpec],
    *,
    size_margin: float = DEFAULT_SIZE_MARGIN,
    wire_dtypes: Iterable[str] = WIRE_DTYPES,
) -> DecodedStream:
    """Reassemble and validate a stream against ``specs``: every spec exactly once, nothing else.

    float32 tensors come back as float32 whatever their wire dtype (limited to
    ``wire_dtypes``); others as their own dtype. Any deviation raises
    ``TensorValidationError`` whose ``code`` is the gRPC status to answer with.
    """
    assembler = StreamAssembler(specs, size_margin=size_margin, wire_dtypes=wire_dtypes)
    for chunk in chunks:
        assembler.add(chunk)
    return assembler.finish()


@dataclass
class _Partial:
    spec: TensorSpec
    wire_dtype: str
    buffer: bytearray
    filled: int = 0


class StreamAssembler:
    """Incremental form of ``decode_tensors``, for servicers that consume a request iterator."""

    def __init__(
        self,
        specs: Sequence[TensorSpec],
        *,
        size_margin: float = DEFAULT_SIZE_MARGIN,
        wire_dtypes: Iterable[str] = WIRE_DTYPES,
    ) -> None:
        self._specs = {spec.name: spec for spec in specs}
        if len(self._specs) != len(specs):
            raise ConfigError("the expected tensor specs name a tensor twice.")
        self._limit = int(sum(spec.nbytes for spec in specs) * size_margin)
        self._wire_dtypes = frozenset(wire_dtypes)
        self._header: pb.StreamHeader | None = None
        self._current: _Partial | None = None
        self._done: dict[str, Array] = {}
        self._received = 0
        self._final = False

    def add(self, chunk: pb.TensorChunk) -> None:
        if self._final:
            raise _invalid(None, "chunk after the final one", "end of stream", "another chunk")
        if self._header is None:
            self._take_header(chunk)
        elif chunk.HasField("header"):
            raise _invalid(None, "stream header repeated", "a header on the first chunk", "two")
        if not chunk.pieces and not chunk.final:
            raise _invalid(None, "chunk without tensor data", "at least one piece", "none")
        for piece in chunk.pieces:
            self._add_piece(piece)
        self._final = chunk.final

    def _add_piece(self, piece: pb.TensorPiece) -> None:
        name = piece.name
        current = self._current
        if current is None or current.spec.name != name:
            if current is not None:
                raise _invalid(
                    name,
                    f"started before tensor '{current.spec.name}' was complete",
                    f"{len(current.buffer)} bytes of '{current.spec.name}'",
                    f"{current.filled} bytes",
                )
            current = self._start(piece)
        elif (
            piece.offset != current.filled or piece.wire_dtype != _DTYPE_TO_ENUM[current.wire_dtype]
        ):
            raise _invalid(
                name,
                "piece out of order, overlapping or re-encoded",
                f"offset {current.filled} in {current.wire_dtype}",
                f"offset {piece.offset} in {_dtype_name(piece.wire_dtype)}",
            )
        self._append(current, piece)
        self._current = current
        if current.filled == len(current.buffer):
            self._done[name] = _finish_tensor(current)
            self._current = None

    def finish(self) -> DecodedStream:
        """Check that the stream was complete; return its header and tensors in spec order."""
        if self._header is None:
            raise _truncated("the stream ended before its first chunk")
        if not self._final:
            partial = self._current
            detail = (
                f" inside tensor '{partial.spec.name}' ({partial.filled} of "
                f"{len(partial.buffer)} bytes)"
                if partial
                else ""
            )
            raise _truncated(
                f"the stream ended without its final chunk{detail}, after {len(self._done)} "
                f"of {len(self._specs)} tensors"
            )
        if self._current is not None:
            partial = self._current
            raise _truncated(
                f"the final chunk arrived inside tensor '{partial.spec.name}' "
                f"({partial.filled} of {len(partial.buffer)} bytes)"
            )
        missing = [name for name in self._specs if name not in self._done]
        if missing:
            shown = ", ".join(f"'{name}'" for name in missing[:5])
            more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
            raise _invalid(
                missing[0],
                f"missing from the stream ({shown}{more})",
                len(self._specs),
                len(self._done),
            )
        header = self._header
        if header.tensor_count != len(self._done) or header.total_bytes != self._received:
            raise _invalid(
                None,
                "header disagrees with the stream",
                f"{header.tensor_count} tensors / {header.total_bytes} bytes",
                f"{len(self._done)} tensors / {self._received} bytes",
            )
        return DecodedStream(header, {name: self._done[name] for name in self._specs})

    def _take_header(self, chunk: pb.TensorChunk) -> None:
        if not chunk.HasField("header"):
            raise _invalid(None, "first chunk has no stream header", "a StreamHeader", "none")
        header = chunk.header
        if header.total_bytes > self._limit:
            raise _oversized(
                None,
                "announces more bytes than the model holds",
                self._limit,
                header.total_bytes,
            )
        self._header = header

    def _start(self, piece: pb.TensorPiece) -> _Partial:
        name = piece.name
        spec = self._specs.get(name)
        if spec is None:
            raise _invalid(
                name,
                "not a tensor of this model",
                f"one of {len(self._specs)} model tensors",
                repr(name),
            )
        if name in self._done:
            raise _invalid(name, "sent twice", "each tensor once", "a duplicate")
        dtype = _dtype_name(piece.dtype)
        if dtype != spec.dtype:
            raise _invalid(name, "wrong dtype", spec.dtype, dtype)
        if tuple(piece.shape) != spec.shape:
            raise _invalid(name, "wrong shape", spec.shape, tuple(piece.shape))
        wire = _dtype_name(piece.wire_dtype)
        allowed = self._wire_dtypes & set(WIRE_DTYPES) if spec.dtype == "float32" else {spec.dtype}
        if wire not in allowed:
            raise _invalid(name, "wire dtype not accepted", " | ".join(sorted(allowed)), wire)
        expected = spec.size * _wire_itemsize(wire)
        if piece.total_bytes > expected:
            raise _oversized(
                name, "more bytes announced than its shape holds", expected, piece.total_bytes
            )
        if piece.total_bytes != expected or piece.offset != 0:
            raise _invalid(
                name,
                "first piece does not match the shape",
                f"{expected} bytes from offset 0",
                f"{piece.total_bytes} bytes from offset {piece.offset}",
            )
        # Sized from the spec, never from the sender's claim, so a hostile header cannot
        # make us allocate more than the model.
        return _Partial(spec, wire, bytearray(expected))

    def _append(self, partial: _Partial, piece: pb.TensorPiece) -> None:
        name = partial.spec.name
        if piece.total_bytes != len(partial.buffer):
            raise _invalid(
                name, "total bytes changed mid-tensor", len(partial.buffer), piece.total_bytes
            )
        data = piece.data  # each access copies out of the message: read it once
        end = partial.filled + len(data)
        if end > len(partial.buffer):
            raise _oversized(
                name, "piece runs past the end of the tensor", len(partial.buffer), end
            )
        if not data and partial.buffer:
            raise _invalid(name, "empty piece", "at least one byte", "0 bytes")
        partial.buffer[partial.filled : end] = data
        partial.filled = end
        self._received += len(data)
        if self._received > self._limit:  # unreachable with exact specs; kept as a backstop
            raise _oversized(name, "stream exceeds the model's size", self._limit, self._received)


def _finish_tensor(partial: _Partial) -> Array:
    spec, wire = partial.spec, partial.wire_dtype
    raw = np.frombuffer(partial.buffer, dtype=_wire_numpy_dtype(wire))
    if wire == "bfloat16":
        array: Array = bfloat16_bits_to_float32(raw)
    elif wire != spec.dtype:
        array = raw.astype(np.float32)
    else:
        array = raw.astype(np.dtype(spec.dtype), copy=False)
    array = array.reshape(spec.shape)
    if array.dtype.kind == "f":
        bad = _count_nonfinite(array)
        if bad:
            raise _invalid(
                spec.name, "non-finite values", "finite values", f"{bad} NaN/Inf of {array.size}"
            )
    return array


def _count_nonfinite(array: Array) -> int:
    # A sum is one fast pass without a temporary; NaN/Inf always make it non-finite, and only
    # then (or on overflow of a huge but finite tensor) is the exact, slower count needed.
    with np.errstate(all="ignore"):
        total = np.add.reduce(array, axis=None, dtype=np.float64 if array.itemsize < 4 else None)
    if np.isfinite(total):
        return 0
    return int(array.size - np.count_nonzero(np.isfinite(array)))


def _truncated(what: str) -> TensorValidationError:
    return TensorValidationError(
        f"tensor stream truncated: {what}.",
        code=grpc.StatusCode.DATA_LOSS,
        fix="the sender died or the connection dropped; send the whole update again.",
    )


def _oversized(tensor: str | None, what: str, limit: int, actual: int) -> TensorValidationError:
    where = f"tensor '{tensor}'" if tensor else "tensor stream"
    return TensorValidationError(
        f"{where}: {what}: limit {limit} bytes, got {actual}.",
        code=grpc.StatusCode.RESOURCE_EXHAUSTED,
        tensor=tensor,
        expected=limit,
        actual=actual,
        fix="send only the model announced at Register, in its own shapes.",
    )
