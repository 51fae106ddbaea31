"""Tensor chunks as bytes: encode_tensors' protobuf messages, read back without copies."""

from __future__ import annotations

import numpy as np
import pytest
from google.protobuf.message import DecodeError

from hfl_lab._exceptions import TensorValidationError, WireFormatError
from trainer.proto import parameter_server_pb2 as pb
from trainer.tensor_decode import decode_tensors
from trainer.tensor_wire import WirePiece, parse_chunk, serialize_tensors
from trainer.tensors import TensorSpec, encode_tensors

KIB = 1024


def model_arrays() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(3)
    return {
        "conv/kernel": rng.standard_normal((3, 3, 16, 32)).astype(np.float32),  # 18 kB
        "bn/gamma": rng.standard_normal(32).astype(np.float32),
        "big": rng.standard_normal(70_000).astype(np.float32),  # 280 kB: spans 1 MiB/64 KiB
        "count": np.array(7, dtype=np.int64),
        "mask": rng.integers(0, 2, (5, 3)).astype(bool),
        "empty": np.zeros((0, 4), dtype=np.float32),
        "half": rng.standard_normal(9).astype(np.float16),
    }


def specs_of(arrays: dict[str, np.ndarray]) -> list[TensorSpec]:
    return [TensorSpec.of(name, array) for name, array in arrays.items()]


HEADER = pb.StreamHeader(kind=pb.UPDATE_KIND_GRADIENTS, model_version=4, worker_id="worker1",
                         num_samples=32)


@pytest.mark.parametrize("wire_dtype", ["float32", "float16", "bfloat16"])
@pytest.mark.parametrize("chunk_bytes", [KIB, 64 * KIB, 1 << 20])
def test_serialized_chunks_are_the_protobuf_encoding(wire_dtype: str, chunk_bytes: int) -> None:
    # Arrange
    arrays = model_arrays()
    kwargs = {"header": HEADER, "wire_dtype": wire_dtype, "chunk_bytes": chunk_bytes}

    # Act
    serialized = list(serialize_tensors(arrays, **kwargs))  # type: ignore[arg-type]
    messages = list(encode_tensors(arrays, **kwargs))  # type: ignore[arg-type]

    # Assert
    assert [c.data for c in serialized] == [m.SerializeToString() for m in messages]
    assert sum(c.tensors_started for c in serialized) == len(arrays)
    assert sum(c.tensor_bytes for c in serialized) == messages[0].header.total_bytes


@pytest.mark.parametrize("wire_dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("chunk_bytes", [KIB, 64 * KIB, 1 << 20])
def test_parsed_chunks_decode_like_protobuf_messages(wire_dtype: str, chunk_bytes: int) -> None:
    arrays = model_arrays()
    wire = [c.data for c in serialize_tensors(arrays, header=HEADER, wire_dtype=wire_dtype,
                                              chunk_bytes=chunk_bytes)]

    fast = decode_tensors([parse_chunk(b) for b in wire], specs_of(arrays))
    reference = decode_tensors([pb.TensorChunk.FromString(b) for b in wire], specs_of(arrays))

    assert fast.header == reference.header == parse_chunk(wire[0]).header
    assert list(fast.tensors) == list(arrays)
    for name in arrays:
        assert fast.tensors[name].dtype == reference.tensors[name].dtype, name
        np.testing.assert_array_equal(fast.tensors[name], reference.tensors[name], err_msg=name)


def test_large_pieces_are_views_of_the_message() -> None:
    arrays = {"big": np.arange(100_000, dtype=np.float32)}
    message = next(c.data for c in serialize_tensors(arrays, chunk_bytes=1 << 20))

    piece = parse_chunk(message).pieces[0]

    assert isinstance(piece, WirePiece)
    assert piece.data.obj is message
    assert bytes(piece.data) == arrays["big"].tobytes()


def test_protobuf_rules_hold_for_unknown_repeated_and_reordered_fields() -> None:
    # Arrange: a message protobuf accepts, though encode_tensors never writes it this way
    piece = pb.TensorPiece(name="w", dtype=pb.DTYPE_FLOAT32, wire_dtype=pb.DTYPE_FLOAT32,
                           total_bytes=40_000, data=b"\1" * 40_000)
    piece_bytes = (
        pb.TensorPiece(data=b"\2" * 40_000).SerializeToString()  # overridden below: last wins
        + b"\xa0\x06\x05"  # unknown varint field 100
        + piece.SerializeToString()
        + pb.TensorPiece(shape=[10_000]).SerializeToString()
    )
    message = (
        b"\x18\x00"  # final = false, overridden at the end
        + pb.TensorChunk(header=pb.StreamHeader(model_version=9)).SerializeToString()
        + b"\x12" + _varint(len(piece_bytes)) + piece_bytes
        + pb.TensorChunk(header=pb.StreamHeader(worker_id="worker0")).SerializeToString()
        + b"\xfa\x3e\x03abc"  # unknown length-delimited field 999
        + b"\x18\x01"
    )

    # Act
    ours = parse_chunk(message)
    theirs = pb.TensorChunk.FromString(message)

    # Assert
    assert ours.HasField("header") and ours.header == theirs.header
    assert (ours.header.model_version, ours.header.worker_id) == (9, "worker0")
    assert ours.final is True and theirs.final is True
    (mine,) = ours.pieces
    (reference,) = theirs.pieces
    assert (mine.name, mine.dtype, tuple(mine.shape), mine.total_bytes) == (
        reference.name, reference.dtype, tuple(reference.shape), reference.total_bytes)
    assert bytes(mine.data) == reference.data == b"\1" * 40_000


#: malformed messages, and whether protobuf refuses them too: it skips a group, or a known
#: field of the wrong wire type, as an unknown field; no TensorChunk writer makes either
MALFORMED = {
    "truncated varint": (b"\x18\xff", True),
    "length past the end": (b"\x12\x7f\x0a", True),
    "piece data past its end": (b"\x12\x05\x3a\x7f\x00\x00\x00", True),
    "field number 0": (b"\x00\x01", True),
    "bad name encoding": (b"\x12\x03\x0a\x01\xff", True),
    "group wire type": (b"\x1b\x1c", False),
    "header with a varint wire type": (b"\x08\x01", False),
}


@pytest.mark.parametrize(("message", "protobuf_refuses"), MALFORMED.values(),
                         ids=MALFORMED.keys())
def test_malformed_messages_are_refused(message: bytes, protobuf_refuses: bool) -> None:
    with pytest.raises(WireFormatError):
        parse_chunk(message)
    if protobuf_refuses:
        with pytest.raises(DecodeError):
            pb.TensorChunk.FromString(message)


def test_a_large_piece_with_a_bad_name_is_refused() -> None:
    piece = pb.TensorPiece(name="w", data=bytes(40_000)).SerializeToString()
    bad = piece.replace(b"\x0a\x01w", b"\x0a\x01\xff", 1)
    message = b"\x12" + _varint(len(bad)) + bad

    with pytest.raises(WireFormatError, match="TensorPiece"):
        parse_chunk(message)


def test_validation_still_applies_to_parsed_chunks() -> None:
    arrays = {"w": np.ones(20_000, np.float32)}
    arrays["w"][123] = np.nan
    wire = [c.data for c in serialize_tensors(arrays, chunk_bytes=16 * KIB)]

    with pytest.raises(TensorValidationError, match="1 NaN/Inf"):
            decode_tensors([parse_chunk(b) for b in wire], specs_of(arrays))


def _varint(value: int) -> bytes:
    out = bytearray()
    while value > 0x7F:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)
