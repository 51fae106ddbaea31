"""Tensor stream decoding: reassemble chunked tensor streams and validate them against the model."""

from __future__ import annotations

import functools
import operator
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import grpc
import numpy as np
import numpy.typing as npt

from hfl_lab._exceptions import ConfigError, TensorValidationError
from trainer.buffer_pool import DECODE_POOL
from trainer.flat import FlatLayout, FlatTensors, flat_layout
from trainer.proto import parameter_server_pb2 as pb
from trainer.tensor_wire import WireChunk, WirePiece
from trainer.tensors import (
    DEFAULT_SIZE_MARGIN,
    DTYPE_TO_ENUM,
    WIRE_DTYPES,
    Array,
    TensorSpec,
    bfloat16_bits_to_float32,
    dtype_name,
    wire_itemsize,
    wire_numpy_dtype,
)

__all__ = ["DecodedStream", "StreamAssembler", "decode_tensors"]

#: tensors start on cache-line boundaries in the stream's memory block
_ALIGN = 64


@dataclass(frozen=True)
class DecodedStream:
    """A validated tensor stream: its header and the tensors, in spec order.

    When every tensor is float32 the tensors are a :class:`~trainer.flat.FlatTensors`: views
    of one flat buffer, trainable first (whichever way the stream was laid out)."""

    header: pb.StreamHeader
    tensors: Mapping[str, Array] = field(default_factory=dict)


def decode_tensors(
    chunks: Iterable[pb.TensorChunk | WireChunk],
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


@dataclass(frozen=True)
class _Wire:
    """One accepted encoding of a tensor: its wire dtype, byte length and numpy dtype."""

    name: str
    enum: int
    nbytes: int
    numpy_dtype: np.dtype[Any]


@dataclass(frozen=True)
class _Expected:
    """What the first piece of a tensor must announce, and where the tensor goes."""

    spec: TensorSpec
    dtype_enum: int
    wires: dict[int, _Wire]  # by wire dtype enum
    slot: int  # byte offset of the tensor in the stream's memory
    nbytes: int  # in memory, as the spec's dtype

    @classmethod
    def of(cls, spec: TensorSpec, accepted: frozenset[str], slot: int) -> _Expected:
        names = accepted & set(WIRE_DTYPES) if spec.dtype == "float32" else {spec.dtype}
        wires = {
            DTYPE_TO_ENUM[name]: _Wire(
                name, DTYPE_TO_ENUM[name], spec.size * wire_itemsize(name), wire_numpy_dtype(name)
            )
            for name in names
        }
        return cls(spec, DTYPE_TO_ENUM[spec.dtype], wires, slot, spec.nbytes)


@dataclass(frozen=True)
class _Layout:
    """The expectations for a model's streams and the memory they decode into."""

    expected: dict[str, _Expected]  # in spec order
    memory_bytes: int
    model_bytes: int
    #: the float32 model's flat layout: the tensors' slots follow it; None for other dtypes
    flat: FlatLayout | None
    #: a flat stream's accepted encodings, by wire dtype enum
    flat_wires: dict[int, _Wire]


@functools.lru_cache(maxsize=16)
def _layout(specs: tuple[TensorSpec, ...], accepted: frozenset[str]) -> _Layout:
    """Worked out once per model, not per stream: a ResNet's 279 specs cost milliseconds."""
    expected: dict[str, _Expected] = {}
    flat = flat_layout(specs)
    slot = 0
    for spec in specs:
        if flat is not None:  # one contiguous float32 buffer: the tensors are its views
            start = flat.index[spec.name][0] * 4
            expected[spec.name] = _Expected.of(spec, accepted, start)
            continue
        expected[spec.name] = _Expected.of(spec, accepted, slot)
        slot += -(-spec.nbytes // _ALIGN) * _ALIGN
    if len(expected) != len(specs):
        raise ConfigError("the expected tensor specs name a tensor twice.")
    if flat is not None:
        slot = flat.size * 4
    names = accepted & set(WIRE_DTYPES)
    flat_wires = {
        DTYPE_TO_ENUM[name]: _Wire(name, DTYPE_TO_ENUM[name],
                                   (flat.size if flat else 0) * wire_itemsize(name),
                                   wire_numpy_dtype(name))
        for name in names
    }
    return _Layout(expected, slot, sum(e.nbytes for e in expected.values()), flat, flat_wires)


#: _layout_for's memo: id of a caller's specs sequence -> (its specs then, accepted, layout)
_BY_CALLER: dict[int, tuple[tuple[TensorSpec, ...], Iterable[str], _Layout]] = {}


def _layout_for(specs: Sequence[TensorSpec], wire_dtypes: Iterable[str]) -> _Layout:
    """:func:`_layout`, found by the identity of the caller's specs: the PS and a worker pass
    the same list to every stream, and hashing a ResNet's 279 specs for the cache's key cost
    a quarter of a millisecond per stream. The entry holds the specs it was made for and
    counts only while the sequence holds the very same objects."""
    entry = _BY_CALLER.get(id(specs))
    if (entry is not None and entry[1] is wire_dtypes and len(entry[0]) == len(specs)
            and all(map(operator.is_, entry[0], specs))):
        return entry[2]
    snapshot = tuple(specs)
    layout = _layout(snapshot, frozenset(wire_dtypes))
    if len(_BY_CALLER) >= 64:
        _BY_CALLER.clear()
    _BY_CALLER[id(specs)] = (snapshot, wire_dtypes, layout)
    return layout


@dataclass
class _Partial:
    """A tensor being received: its wire bytes land straight in ``wire_array``'s memory."""

    spec: TensorSpec
    wire: _Wire
    home: Array  # the tensor's own memory, in the stream's block (flat, spec dtype)
    wire_array: Array  # the wire elements: ``home`` itself unless compressed
    bytes: memoryview  # ``wire_array``'s memory as flat bytes
    filled: int = 0


class StreamAssembler:
    """Incremental form of ``decode_tensors``, for servicers that consume a request iterator."""

    def __init__(
        self,
        specs: Sequence[TensorSpec],
        *,
        size_margin: float = DEFAULT_SIZE_MARGIN,
        wire_dtypes: Iterable[str] = WIRE_DTYPES,
        on_elements: Callable[[npt.NDArray[np.float32], int], None] | None = None,
    ) -> None:
        """``on_elements(values, start)`` sees each run of a float32 flat stream's elements as
        they arrive (``values`` is a view of the buffer from element ``start`` on, not yet
        validated): a caller's own pass over them while they are in the cache."""
        layout = _layout_for(specs, wire_dtypes)
        self._on_elements = on_elements
        self._layout = layout
        self._expected = layout.expected
        self._memory_bytes = layout.memory_bytes
        self._memory: Array | None = None
        self._limit = int(layout.model_bytes * size_margin)
        self._header: pb.StreamHeader | None = None
        self._current: _Partial | None = None
        self._done: dict[str, Array] = {}
        self._received = 0
        self._final = False
        #: a flat stream (its header carries the layout digest): the one buffer being filled
        self._flat: _Partial | None = None
        self._flat_mode = False
        #: a float32 flat stream's elements summed so far (NaN/Inf check while in cache), and
        #: whether a sum came out non-finite (then the exact check runs at the end)
        self._summed = 0
        self._suspect = False

    @property
    def received_bytes(self) -> int:
        """Tensor bytes (wire encoding) taken in so far."""
        return self._received

    def add(self, chunk: pb.TensorChunk | WireChunk) -> None:
        """Take the next chunk: a protobuf message, or one read by ``tensor_wire.parse_chunk``."""
        if self._final:
            raise _invalid(None, "chunk after the final one", "end of stream", "another chunk")
        if self._header is None:
            self._take_header(chunk)
        elif chunk.HasField("header"):
            raise _invalid(None, "stream header repeated", "a header on the first chunk", "two")
        pieces = chunk.pieces
        if not pieces and not chunk.final:
            raise _invalid(None, "chunk without tensor data", "at least one piece", "none")
        if self._flat_mode:
            for piece in pieces:
                self._add_flat_piece(piece)
            self._final = chunk.final
            return
        # once per chunk, not per tensor: entering errstate costs more than a small tensor's
        # NaN/Inf check (_count_nonfinite's sum overflows or meets NaN on purpose)
        with np.errstate(all="ignore"):
            for piece in pieces:
                self._add_piece(piece)
        self._final = chunk.final

    def _add_piece(self, piece: pb.TensorPiece | WirePiece) -> None:
        name = piece.name
        current = self._current
        if current is None or current.spec.name != name:
            if current is not None:
                raise _invalid(
                    name,
                    f"started before tensor '{current.spec.name}' was complete",
                    f"{current.wire.nbytes} bytes of '{current.spec.name}'",
                    f"{current.filled} bytes",
                )
            current = self._start(piece)
        elif piece.offset != current.filled or piece.wire_dtype != current.wire.enum:
            raise _invalid(
                name,
                "piece out of order, overlapping or re-encoded",
                f"offset {current.filled} in {current.wire.name}",
                f"offset {piece.offset} in {dtype_name(piece.wire_dtype)}",
            )
        self._append(current, piece)
        if current.filled == current.wire.nbytes:
            self._done[name] = _finish_tensor(current)
            self._current = None
        else:
            self._current = current

    def _add_flat_piece(self, piece: pb.TensorPiece | WirePiece) -> None:
        """A run of the flat buffer's wire bytes: the same checks as a tensor's piece."""
        flat = self._layout.flat
        assert flat is not None  # _take_header admits flat streams of float32 models only
        if piece.name:
            raise _invalid(piece.name, "named piece in a flat stream", "no name", "a name")
        current = self._flat
        if current is None:
            wire = self._layout.flat_wires.get(piece.wire_dtype)
            if wire is None:
                allowed = " | ".join(sorted(w.name for w in self._layout.flat_wires.values()))
                raise _invalid(None, "wire dtype not accepted", allowed,
                               dtype_name(piece.wire_dtype))
            total, offset = piece.total_bytes, piece.offset
            if total > wire.nbytes:
                raise _oversized(None, "more bytes announced than the model holds",
                                 wire.nbytes, total)
            if total != wire.nbytes or offset != 0:
                raise _invalid(None, "first piece does not match the model's layout",
                               f"{wire.nbytes} bytes from offset 0",
                               f"{total} bytes from offset {offset}")
            spec = TensorSpec("flat", "float32", (flat.size,))
            current = self._flat = self._receive(_Expected(spec, DTYPE_TO_ENUM["float32"],
                                                           {wire.enum: wire}, 0, flat.size * 4),
                                                 wire)
        elif piece.offset != current.filled or piece.wire_dtype != current.wire.enum:
            raise _invalid(
                self._flat_name(current.filled),
                "piece out of order, overlapping or re-encoded",
                f"offset {current.filled} in {current.wire.name}",
                f"offset {piece.offset} in {dtype_name(piece.wire_dtype)}",
            )
        self._append(current, piece)
        if current.wire_array is current.home:  # float32 on the wire: no widening later
            self._sum_received(current)

    def _sum_received(self, partial: _Partial) -> None:
        """The NaN/Inf check of the elements just copied, while they are in the cache: a sum
        is non-finite when any of them is NaN or Inf (or, rarely, when finite ones overflow
        it); :meth:`_finish_flat` then counts exactly."""
        done = partial.filled // 4
        if done > self._summed:
            values = partial.home[self._summed:done]
            with np.errstate(all="ignore"):
                if not np.isfinite(np.add.reduce(values)):
                    self._suspect = True
            if self._on_elements is not None:
                self._on_elements(values, self._summed)
            self._summed = done

    def _flat_name(self, wire_offset: int) -> str:
        """The tensor at a byte offset of the flat stream's wire bytes."""
        flat, partial = self._layout.flat, self._flat
        if flat is None or partial is None:
            return ""
        return flat.name_at(wire_offset // partial.wire.numpy_dtype.itemsize)

    def _finish_flat(self, header: pb.StreamHeader) -> DecodedStream:
        flat, partial = self._layout.flat, self._flat
        assert flat is not None
        if not self._final:
            detail = (f" inside tensor '{self._flat_name(partial.filled)}' ({partial.filled} "
                      f"of {partial.wire.nbytes} bytes of the model)" if partial else "")
            raise _truncated(f"the stream ended without its final chunk{detail}")
        if partial is None:
            if flat.size:
                raise _truncated("the final chunk arrived before any tensor data")
            _check_totals(header, len(flat.entries), 0)
            return DecodedStream(header, FlatTensors(np.empty(0, np.float32), flat))
        if partial.filled != partial.wire.nbytes:
            raise _truncated(
                f"the final chunk arrived inside tensor '{self._flat_name(partial.filled)}' "
                f"({partial.filled} of {partial.wire.nbytes} bytes of the model)"
            )
        _check_totals(header, len(flat.entries), self._received)
        buffer = partial.home
        with np.errstate(all="ignore"):
            if partial.wire.name == "bfloat16":
                np.copyto(buffer, bfloat16_bits_to_float32(partial.wire_array))
            elif partial.wire.name == "float16":
                np.copyto(buffer, partial.wire_array)
            summed = partial.wire_array is buffer and self._summed == flat.size
            bad = _count_nonfinite(buffer) if self._suspect or not summed else 0
        if bad:  # which tensor: the first one holding NaN/Inf
            first = int(np.flatnonzero(~np.isfinite(buffer))[0])
            name = flat.name_at(first)
            value = FlatTensors(buffer, flat)[name]
            count = int(value.size - np.count_nonzero(np.isfinite(value)))
            raise _invalid(name, "non-finite values", "finite values",
                           f"{count} NaN/Inf of {value.size}")
        return DecodedStream(header, FlatTensors(buffer, flat))

    def finish(self) -> DecodedStream:
        """Check that the stream was complete; return its header and tensors in spec order."""
        if self._header is None:
            raise _truncated("the stream ended before its first chunk")
        if self._flat_mode:
            return self._finish_flat(self._header)
        if not self._final:
            partial = self._current
            detail = (
                f" inside tensor '{partial.spec.name}' ({partial.filled} of "
                f"{partial.wire.nbytes} bytes)"
                if partial
                else ""
            )
            raise _truncated(
                f"the stream ended without its final chunk{detail}, after {len(self._done)} "
                f"of {len(self._expected)} tensors"
            )
        if self._current is not None:
            partial = self._current
            raise _truncated(
                f"the final chunk arrived inside tensor '{partial.spec.name}' "
                f"({partial.filled} of {partial.wire.nbytes} bytes)"
            )
        missing = [name for name in self._expected if name not in self._done]
        if missing:
            shown = ", ".join(f"'{name}'" for name in missing[:5])
            more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
            raise _invalid(
                missing[0],
                f"missing from the stream ({shown}{more})",
                len(self._expected),
                len(self._done),
            )
        header = self._header
        _check_totals(header, len(self._done), self._received)
        flat = self._layout.flat
        if flat is not None:  # the tensors are views of one buffer in the flat layout
            memory = self._memory if self._memory is not None else np.empty(0, np.uint8)
            return DecodedStream(header, FlatTensors(memory.view(np.float32), flat))
        return DecodedStream(header, {name: self._done[name] for name in self._expected})

    def _take_header(self, chunk: pb.TensorChunk | WireChunk) -> None:
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
        if header.layout_digest:
            flat = self._layout.flat
            if flat is None or header.layout_digest != flat.digest:
                raise _invalid(
                    None, "flat stream of another model (layout digest)",
                    flat.digest.hex()[:16] if flat else "a per-tensor stream",
                    header.layout_digest.hex()[:16],
                )
            self._flat_mode = True
        self._header = header

    def _start(self, piece: pb.TensorPiece | WirePiece) -> _Partial:
        name = piece.name
        expected = self._expected.get(name)
        if expected is None:
            raise _invalid(
                name,
                "not a tensor of this model",
                f"one of {len(self._expected)} model tensors",
                repr(name),
            )
        if name in self._done:
            raise _invalid(name, "sent twice", "each tensor once", "a duplicate")
        spec = expected.spec
        if piece.dtype != expected.dtype_enum:
            raise _invalid(name, "wrong dtype", spec.dtype, dtype_name(piece.dtype))
        shape = tuple(piece.shape)
        if shape != spec.shape:
            raise _invalid(name, "wrong shape", spec.shape, shape)
        wire = expected.wires.get(piece.wire_dtype)
        if wire is None:
            allowed = " | ".join(sorted(w.name for w in expected.wires.values()))
            raise _invalid(
                name, "wire dtype not accepted", allowed, dtype_name(piece.wire_dtype)
            )
        total, offset = piece.total_bytes, piece.offset
        if total > wire.nbytes:
            raise _oversized(name, "more bytes announced than its shape holds", wire.nbytes, total)
        if total != wire.nbytes or offset != 0:
            raise _invalid(
                name,
                "first piece does not match the shape",
                f"{wire.nbytes} bytes from offset 0",
                f"{total} bytes from offset {offset}",
            )
        return self._receive(expected, wire)

    def _receive(self, expected: _Expected, wire: _Wire) -> _Partial:
        """Where the tensor's bytes go: its slot in one block for the whole stream.

        One block instead of one allocation per tensor: fresh memory costs a page fault per
        4 KiB page on first touch, which on a large model costs more than copying the bytes.
        The block comes from :data:`~trainer.buffer_pool.DECODE_POOL`: an earlier stream's
        memory once no view of it is alive, so its pages are mapped already. It is sized from
        the specs, never from the sender's claims; its former bytes are never seen, since a
        stream is handed out only when every byte of every tensor has arrived. The tensors
        are views of it, so it stays theirs as long as any of them lives.
        """
        if self._memory is None:
            self._memory = DECODE_POOL.take(self._memory_bytes)
        spec = expected.spec
        slot = self._memory[expected.slot : expected.slot + expected.nbytes]
        if wire.name == spec.dtype:
            home = slot.view(wire.numpy_dtype)
            return _Partial(spec, wire, home, home, slot.data)
        staged: Array = np.empty(spec.size, dtype=wire.numpy_dtype)  # compressed: widened later
        staged_bytes = staged.view(np.uint8).data
        return _Partial(spec, wire, slot.view(np.float32), staged, staged_bytes)

    def _append(self, partial: _Partial, piece: pb.TensorPiece | WirePiece) -> None:
        nbytes = partial.wire.nbytes
        if piece.total_bytes != nbytes:
            raise _invalid(
                partial.spec.name, "total bytes changed mid-tensor", nbytes, piece.total_bytes
            )
        # a protobuf message copies the data out at each access (read it once); a WirePiece's
        # data is a view of the received message
        data = piece.data
        size = len(data)
        end = partial.filled + size
        if end > nbytes:
            raise _oversized(
                partial.spec.name, "piece runs past the end of the tensor", nbytes, end
            )
        if not size and nbytes:
            raise _invalid(partial.spec.name, "empty piece", "at least one byte", "0 bytes")
        # the one copy of the data: from the message's bytes into the tensor's own memory
        partial.bytes[partial.filled : end] = data
        partial.filled = end
        self._received += size
        if self._received > self._limit:  # unreachable with exact specs; kept as a backstop
            raise _oversized(
                partial.spec.name, "stream exceeds the model's size", self._limit, self._received
            )


def _finish_tensor(partial: _Partial) -> Array:
    spec, wire = partial.spec, partial.wire.name
    raw = partial.wire_array
    if wire == "bfloat16":
        np.copyto(partial.home, bfloat16_bits_to_float32(raw))
        array: Array = partial.home
    elif wire != spec.dtype:
        np.copyto(partial.home, raw)  # float16 -> float32, exact
        array = partial.home
    else:  # the wire is little-endian: a no-op on little-endian hosts
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
    # The caller has silenced numpy's floating-point warnings (StreamAssembler.add).
    total = np.add.reduce(array, axis=None, dtype=np.float64 if array.itemsize < 4 else None)
    if np.isfinite(total):
        return 0
    return int(array.size - np.count_nonzero(np.isfinite(array)))


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


def _check_totals(header: pb.StreamHeader, tensors: int, received: int) -> None:
    """Refuse a stream whose header announced another tensor count or byte total than came."""
    if header.tensor_count != tensors or header.total_bytes != received:
        raise _invalid(None, "header disagrees with the stream",
                       f"{header.tensor_count} tensors / {header.total_bytes} bytes",
                       f"{tensors} tensors / {received} bytes")


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
