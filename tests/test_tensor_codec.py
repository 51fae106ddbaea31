"""Tensor codec: round trips, wire compression bounds, and every refused stream."""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import grpc
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from hfl_lab._exceptions import ConfigError, HflLabError, TensorValidationError
from trainer.proto import parameter_server_pb2 as pb
from trainer.tensor_decode import DecodedStream, StreamAssembler, decode_tensors
from trainer.tensors import (
    TensorSpec,
    bfloat16_bits_to_float32,
    check_model_version,
    encode_tensors,
    float32_to_bfloat16_bits,
    specs_for,
)

Chunks = list[pb.TensorChunk]
KIB = 1024


def model_arrays() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(7)
    return {
        "conv1/kernel": rng.standard_normal((3, 3, 3, 16)).astype(np.float32),
        "dense/kernel": rng.standard_normal((640, 10)).astype(np.float32),
        "bn/moving_mean": rng.standard_normal(16).astype(np.float64),
        "bn/count": np.array(12345, dtype=np.int64),
        "mask": rng.integers(0, 2, (7, 5)).astype(bool),
        "embedding/ids": rng.integers(-100, 100, 33).astype(np.int32),
        "half": rng.standard_normal((4, 4)).astype(np.float16),
        "empty": np.zeros((0, 3), dtype=np.float32),
    }


def specs_of(arrays: dict[str, np.ndarray]) -> list[TensorSpec]:
    return [TensorSpec.of(name, array) for name, array in arrays.items()]


def encoded(arrays: dict[str, np.ndarray] | None = None, **kwargs: object) -> Chunks:
    return list(encode_tensors(model_arrays() if arrays is None else arrays, **kwargs))  # type: ignore[arg-type]


def refused(chunks: Chunks, specs: list[TensorSpec] | None = None) -> TensorValidationError:
    with pytest.raises(TensorValidationError) as info:
        decode_tensors(chunks, specs if specs is not None else specs_of(model_arrays()))
    assert isinstance(info.value, HflLabError)
    return info.value


def flat(chunks: Chunks) -> list[pb.TensorPiece]:
    return [piece for chunk in chunks for piece in chunk.pieces]


def restream(pieces: list[pb.TensorPiece], header: pb.StreamHeader) -> Chunks:
    """One piece per chunk, header first, final last: lets a test reorder pieces freely."""
    chunks = [pb.TensorChunk(pieces=[piece]) for piece in pieces]
    chunks[0].header.CopyFrom(header)
    chunks[-1].final = True
    return chunks


def through_the_wire(chunks: Chunks) -> Chunks:
    return [pb.TensorChunk.FromString(chunk.SerializeToString()) for chunk in chunks]


# ------------------------------------------------------------------------------ round trips


@pytest.mark.parametrize("chunk_bytes", [KIB, 4 * KIB, 64 * KIB, 1 << 20, 4 << 20])
def test_round_trip_is_exact_for_every_dtype_and_chunk_size(chunk_bytes: int) -> None:
    # Arrange
    arrays = model_arrays()
    arrays["big"] = np.random.default_rng(1).standard_normal(300_000).astype(np.float32)

    # Act
    decoded = decode_tensors(
        through_the_wire(encoded(arrays, chunk_bytes=chunk_bytes)), specs_of(arrays)
    )

    # Assert
    assert list(decoded.tensors) == list(arrays)
    for name, original in arrays.items():
        result = decoded.tensors[name]
        assert result.dtype == original.dtype, name
        assert result.shape == original.shape, name
        np.testing.assert_array_equal(result, original, err_msg=name)


def test_chunks_respect_the_size_and_the_stream_is_framed() -> None:
    arrays: dict[str, np.ndarray] = {"a": np.ones(10_000, np.float32), "b": np.ones(3, np.int64)}
    header = pb.StreamHeader(
        kind=pb.UPDATE_KIND_GRADIENTS, model_version=9, worker_id="worker1", num_samples=128
    )
    header.metrics.loss = 2.5

    chunks = encoded(arrays, chunk_bytes=KIB, header=header)

    n = len(chunks)
    assert all(sum(len(p.data) for p in chunk.pieces) <= KIB for chunk in chunks)
    assert 40 <= n <= 45
    assert all(chunk.ByteSize() <= KIB + 100 for chunk in chunks[1:])
    assert [chunk.HasField("header") for chunk in chunks] == [True] + [False] * (n - 1)
    assert [chunk.final for chunk in chunks] == [False] * (n - 1) + [True]
    assert [bool(p.shape) for p in flat(chunks)].count(True) == 2  # first piece of each
    sent = chunks[0].header
    assert (sent.kind, sent.model_version, sent.worker_id, sent.num_samples) == (
        pb.UPDATE_KIND_GRADIENTS,
        9,
        "worker1",
        128,
    )
    assert sent.metrics.loss == 2.5
    assert (sent.tensor_count, sent.total_bytes) == (2, 40_024)
    assert header.tensor_count == 0  # the caller's header is not modified


def test_small_tensors_share_a_chunk() -> None:
    arrays = {f"bn{i}/gamma": np.ones(16, np.float32) for i in range(100)}

    chunks = encoded(arrays)

    assert len(chunks) == 1
    assert len(chunks[0].pieces) == 100


def test_empty_stream_round_trips_with_its_header() -> None:
    chunks = encoded({}, header=pb.StreamHeader(model_version=3))

    decoded = decode_tensors(chunks, [])

    assert len(chunks) == 1
    assert decoded == DecodedStream(chunks[0].header, {})
    assert decoded.header.model_version == 3


def test_big_endian_input_travels_little_endian() -> None:
    values = np.arange(12, dtype=np.float32).reshape(3, 4)
    chunks = encoded({"w": values.astype(">f4")})

    decoded = decode_tensors(chunks, [TensorSpec("w", "float32", (3, 4))])

    assert chunks[0].pieces[0].data == values.astype("<f4").tobytes()
    np.testing.assert_array_equal(decoded.tensors["w"], values)


def test_incremental_assembler_matches_decode() -> None:
    arrays = model_arrays()
    assembler = StreamAssembler(specs_of(arrays))

    for chunk in encoded(arrays, chunk_bytes=KIB):
        assembler.add(chunk)
    result = assembler.finish()

    np.testing.assert_array_equal(result.tensors["dense/kernel"], arrays["dense/kernel"])


_FLOAT_WIDTHS: dict[int, Literal[16, 32, 64]] = {2: 16, 4: 32, 8: 64}
_DTYPES = st.sampled_from(["float32", "float64", "float16", "int8", "int32", "int64", "uint8"])


@st.composite
def tensor_dicts(draw: st.DrawFn) -> dict[str, np.ndarray]:
    count = draw(st.integers(0, 5))
    arrays = {}
    for index in range(count):
        dtype = np.dtype(draw(_DTYPES))
        shape = draw(hnp.array_shapes(min_dims=0, max_dims=3, min_side=0, max_side=9))
        elements = (
            st.floats(-1e4, 1e4, width=_FLOAT_WIDTHS[dtype.itemsize])
            if dtype.kind == "f"
            else st.integers(np.iinfo(dtype).min, np.iinfo(dtype).max)
        )
        arrays[f"layer{index}/w"] = draw(hnp.arrays(dtype, shape, elements=elements))
    return arrays


@settings(max_examples=80, deadline=None)
@given(arrays=tensor_dicts(), chunk_bytes=st.integers(1, 5000))
def test_round_trip_property(arrays: dict[str, np.ndarray], chunk_bytes: int) -> None:
    decoded = decode_tensors(
        through_the_wire(encoded(arrays, chunk_bytes=chunk_bytes)), specs_of(arrays)
    )

    assert list(decoded.tensors) == list(arrays)
    for name, original in arrays.items():
        assert decoded.tensors[name].dtype == original.dtype
        np.testing.assert_array_equal(decoded.tensors[name], original)


# ------------------------------------------------------------------------------ compression


@settings(max_examples=60, deadline=None)
@given(
    values=hnp.arrays(
        np.float32,
        hnp.array_shapes(min_dims=1, max_dims=2, max_side=50),
        elements=st.floats(-65000, 65000, width=32).filter(lambda x: x == 0 or abs(x) >= 2**-14),
    ),
    chunk_bytes=st.integers(1, 300),
)
def test_float16_wire_error_is_within_half_an_ulp(values: np.ndarray, chunk_bytes: int) -> None:
    chunks = encoded({"w": values}, wire_dtype="float16", chunk_bytes=chunk_bytes)

    result = decode_tensors(chunks, [TensorSpec.of("w", values)]).tensors["w"]

    assert result.dtype == np.float32
    assert sum(len(piece.data) for piece in flat(chunks)) == 2 * values.size
    # normal float16 range: 11 significant bits, round to nearest -> relative error <= 2^-11
    np.testing.assert_array_less(np.abs(result - values), np.abs(values) * 2.0**-11 + 1e-30)


@settings(max_examples=60, deadline=None)
@given(
    values=hnp.arrays(
        np.float32,
        hnp.array_shapes(min_dims=1, max_dims=2, max_side=50),
        elements=st.floats(-3.0000000054977558e38, 3.0000000054977558e38, width=32).filter(
            lambda x: x == 0 or abs(x) >= 2**-126
        ),
    )
)
def test_bfloat16_wire_error_is_within_half_an_ulp(values: np.ndarray) -> None:
    chunks = encoded({"w": values}, wire_dtype="bfloat16", chunk_bytes=64)

    result = decode_tensors(chunks, [TensorSpec.of("w", values)]).tensors["w"]

    assert result.dtype == np.float32
    assert sum(len(piece.data) for piece in flat(chunks)) == 2 * values.size
    # 8 significant bits, round to nearest -> relative error <= 2^-8 over the float32 range
    bound = np.abs(values).astype(np.float64) * 2.0**-8
    assert np.all(np.abs(result.astype(np.float64) - values) <= bound)


def test_bfloat16_rounds_to_nearest_even_and_keeps_specials() -> None:
    bits = np.array(
        [
            0x3F808000,  # exactly halfway, kept lsb 0 -> stays 0x3F80
            0x3F818000,  # exactly halfway, kept lsb 1 -> up to 0x3F82
            0x3F808001,  # just above halfway -> up
            0x3F807FFF,  # just below halfway -> down
            0x7F800000,  # +Inf
            0xFF800000,  # -Inf
            0x7F7FFFFF,  # float32 max -> overflows to +Inf, as IEEE rounding says
            0xFFFFFFFF,  # negative NaN whose payload would wrap if rounded blindly
            0x7F800001,  # signalling NaN with the payload only in the low bits
        ],
        dtype=np.uint32,
    )

    out = float32_to_bfloat16_bits(bits.view(np.float32))

    assert out[:7].tolist() == [0x3F80, 0x3F82, 0x3F81, 0x3F80, 0x7F80, 0xFF80, 0x7F80]
    assert np.isnan(bfloat16_bits_to_float32(out[7:])).all()


def test_bfloat16_matches_ml_dtypes_reference() -> None:
    ml_dtypes = pytest.importorskip("ml_dtypes")
    values = np.random.default_rng(3).standard_normal(100_000).astype(np.float32) * 1e3

    ours = float32_to_bfloat16_bits(values)

    np.testing.assert_array_equal(ours, values.astype(ml_dtypes.bfloat16).view(np.uint16))


def test_compression_leaves_non_float32_tensors_alone() -> None:
    arrays = model_arrays()

    chunks = encoded(arrays, wire_dtype="bfloat16")
    decoded = decode_tensors(chunks, specs_of(arrays))

    for name in ("bn/moving_mean", "bn/count", "half"):
        np.testing.assert_array_equal(decoded.tensors[name], arrays[name])


def test_float16_overflow_is_refused_at_the_sender() -> None:
    with pytest.raises(TensorValidationError, match=r"'w'.*float16 range") as info:
        encoded({"w": np.array([1.0, 1e6], np.float32)}, wire_dtype="float16")
    assert info.value.code == grpc.StatusCode.INVALID_ARGUMENT


# ------------------------------------------------------------------------------ refusals

INVALID = grpc.StatusCode.INVALID_ARGUMENT
EXHAUSTED = grpc.StatusCode.RESOURCE_EXHAUSTED
DATA_LOSS = grpc.StatusCode.DATA_LOSS


def _with_extra_tensor(chunks: Chunks) -> Chunks:
    return encoded({**model_arrays(), "intruder": np.ones(4, np.float32)})


def _wrong_dtype(chunks: Chunks) -> Chunks:
    arrays = model_arrays()
    arrays["embedding/ids"] = arrays["embedding/ids"].astype(np.float32)  # same byte size
    return encoded(arrays)


def _wider_dtype(chunks: Chunks) -> Chunks:
    arrays = model_arrays()
    arrays["dense/kernel"] = arrays["dense/kernel"].astype(np.float64)
    return encoded(arrays)


def _wrong_shape(chunks: Chunks) -> Chunks:
    arrays = model_arrays()
    arrays["dense/kernel"] = arrays["dense/kernel"].reshape(10, 640)
    return encoded(arrays)


def _poisoned(value: float, wire_dtype: str = "float32") -> Callable[[Chunks], Chunks]:
    def tamper(chunks: Chunks) -> Chunks:
        arrays = model_arrays()
        arrays["dense/kernel"][5, 5] = value
        return encoded(arrays, wire_dtype=wire_dtype)

    return tamper


Pieces = list[pb.TensorPiece]


def on_pieces(tamper: Callable[[Pieces], Pieces]) -> Callable[[Chunks], Chunks]:
    def on_stream(chunks: Chunks) -> Chunks:
        chunks = encoded(chunk_bytes=4 * KIB)  # dense/kernel (25.6 kB) spans 7 pieces
        return restream(tamper(flat(chunks)), chunks[0].header)

    return on_stream


def _index_of(pieces: Pieces, name: str, nth: int = 0) -> int:
    return [i for i, piece in enumerate(pieces) if piece.name == name][nth]


def _first_total(pieces: Pieces) -> Pieces:
    pieces[0].total_bytes = 10**9
    return pieces


def _swapped(pieces: Pieces) -> Pieces:
    i = _index_of(pieces, "dense/kernel", 2)
    pieces[i], pieces[i + 1] = pieces[i + 1], pieces[i]
    return pieces


def _overlapping(pieces: Pieces) -> Pieces:
    i = _index_of(pieces, "dense/kernel", 2)
    pieces.insert(i + 1, pieces[i])
    return pieces


def _interleaved(pieces: Pieces) -> Pieces:
    i = _index_of(pieces, "dense/kernel", 2)
    pieces.insert(i, pieces.pop(_index_of(pieces, "bn/moving_mean")))
    return pieces


def _duplicated(pieces: Pieces) -> Pieces:
    i = _index_of(pieces, "bn/count")
    return [*pieces[: i + 1], pieces[i], *pieces[i + 1 :]]


def _longer_piece(pieces: Pieces) -> Pieces:
    pieces[_index_of(pieces, "bn/count")].data += b"\0" * 8
    return pieces


def _empty_mid_piece(pieces: Pieces) -> Pieces:
    i = _index_of(pieces, "dense/kernel", 1)
    empty = pb.TensorPiece(name="dense/kernel", wire_dtype=pb.DTYPE_FLOAT32)
    empty.offset, empty.total_bytes = pieces[i].offset, pieces[i].total_bytes
    pieces.insert(i, empty)
    return pieces


def _compressed_int(pieces: Pieces) -> Pieces:
    pieces[_index_of(pieces, "bn/count")].wire_dtype = pb.DTYPE_FLOAT16
    return pieces


def _cut_inside_tensor(chunks: Chunks) -> Chunks:
    chunks = restream(flat(encoded(chunk_bytes=4 * KIB)), chunks[0].header)
    return chunks[: _index_of(flat(chunks), "dense/kernel", 3)]


def _final_inside_tensor(chunks: Chunks) -> Chunks:
    chunks = _cut_inside_tensor(chunks)
    chunks[-1].final = True
    return chunks


def _final_too_early(chunks: Chunks) -> Chunks:
    chunks = restream(flat(chunks), chunks[0].header)
    chunks = chunks[: _index_of(flat(chunks), "bn/moving_mean") + 1]
    chunks[-1].final = True
    return chunks


def _huge_header(chunks: Chunks) -> Chunks:
    chunks[0].header.total_bytes = 10**12
    return chunks


def _no_header(chunks: Chunks) -> Chunks:
    chunks[0].ClearField("header")
    return chunks


def _after_final(chunks: Chunks) -> Chunks:
    return [*chunks, pb.TensorChunk(final=True)]


def _empty_chunk(chunks: Chunks) -> Chunks:
    chunks = restream(flat(chunks), chunks[0].header)
    return [chunks[0], pb.TensorChunk(), *chunks[1:]]


def _second_header(chunks: Chunks) -> Chunks:
    chunks = restream(flat(chunks), chunks[0].header)
    chunks[1].header.CopyFrom(chunks[0].header)
    return chunks


REFUSALS: list[tuple[str, Callable[[Chunks], Chunks], grpc.StatusCode, str, list[str]]] = [
    ("unknown tensor", _with_extra_tensor, INVALID, "intruder", ["not a tensor of this model"]),
    ("wrong dtype", _wrong_dtype, INVALID, "embedding/ids", ["int32, got float32"]),
    ("wider dtype", _wider_dtype, EXHAUSTED, "", ["more bytes than the model"]),
    ("wrong shape", _wrong_shape, INVALID, "dense/kernel", ["(640, 10)", "(10, 640)"]),
    ("NaN", _poisoned(float("nan")), INVALID, "dense/kernel", ["1 NaN/Inf"]),
    ("Inf", _poisoned(float("inf")), INVALID, "dense/kernel", ["1 NaN/Inf"]),
    ("NaN in bf16", _poisoned(float("nan"), "bfloat16"), INVALID, "dense/kernel", ["NaN"]),
    ("Inf in fp16", _poisoned(float("-inf"), "float16"), INVALID, "dense/kernel", ["NaN/Inf"]),
    ("huge header", _huge_header, EXHAUSTED, "", ["got 1000000000000"]),
    ("tensor claims more", on_pieces(_first_total), EXHAUSTED, "conv1/kernel", ["limit 1728"]),
    ("piece past tensor end", on_pieces(_longer_piece), EXHAUSTED, "bn/count", ["limit 8"]),
    ("duplicate tensor", on_pieces(_duplicated), INVALID, "bn/count", ["sent twice"]),
    ("swapped pieces", on_pieces(_swapped), INVALID, "dense/kernel", ["out of order"]),
    ("overlapping pieces", on_pieces(_overlapping), INVALID, "dense/kernel", ["out of order"]),
    ("interleaved tensors", on_pieces(_interleaved), INVALID, "bn/moving_mean", ["dense/kernel"]),
    ("empty piece", on_pieces(_empty_mid_piece), INVALID, "dense/kernel", ["empty piece"]),
    ("compressed integer", on_pieces(_compressed_int), INVALID, "bn/count", ["int64, got float16"]),
    (
        "missing final chunk",
        lambda c: restream(flat(c), c[0].header)[:-1],
        DATA_LOSS,
        "",
        ["without its final chunk"],
    ),
    ("cut inside a tensor", _cut_inside_tensor, DATA_LOSS, "dense/kernel", ["of 25600 bytes"]),
    ("final inside a tensor", _final_inside_tensor, DATA_LOSS, "dense/kernel", ["final chunk"]),
    ("empty stream", lambda c: [], DATA_LOSS, "", ["before its first chunk"]),
    ("missing tensors", _final_too_early, INVALID, "bn/count", ["'mask'", "'empty'"]),
    ("no header", _no_header, INVALID, "", ["no stream header"]),
    ("second header", _second_header, INVALID, "", ["header repeated"]),
    ("chunk after final", _after_final, INVALID, "", ["after the final"]),
    ("empty chunk", _empty_chunk, INVALID, "", ["without tensor data"]),
]


@pytest.mark.parametrize(
    ("tamper", "code", "tensor", "phrases"),
    [case[1:] for case in REFUSALS],
    ids=[case[0] for case in REFUSALS],
)
def test_bad_streams_are_refused_with_a_status_and_the_tensor_name(
    tamper: Callable[[Chunks], Chunks], code: grpc.StatusCode, tensor: str, phrases: list[str]
) -> None:
    # Arrange
    chunks = tamper(encoded())

    # Act
    error = refused(chunks)

    # Assert
    assert error.code == code, str(error)
    if tensor:
        assert f"'{tensor}'" in str(error)
    for phrase in phrases:
        assert phrase in str(error)
    assert error.fix


def test_header_inconsistent_with_the_stream_is_refused() -> None:
    chunks = encoded()
    chunks[0].header.total_bytes -= 4

    error = refused(chunks)

    assert error.code == INVALID
    assert "header disagrees" in str(error)


def test_receiver_can_insist_on_uncompressed_tensors() -> None:
    arrays = {"w": np.ones(8, np.float32)}

    with pytest.raises(TensorValidationError, match=r"'w'.*expected float32, got bfloat16") as info:
        decode_tensors(
            encoded(arrays, wire_dtype="bfloat16"), specs_of(arrays), wire_dtypes=["float32"]
        )
    assert info.value.code == INVALID


def test_version_check_accepts_bounded_staleness_and_refuses_the_rest() -> None:
    assert check_model_version(10, 10) == 0
    assert check_model_version(8, 10, max_staleness=2) == 2
    for received, current in [(9, 10), (11, 10)]:
        with pytest.raises(TensorValidationError, match=f"version {received}") as info:
            check_model_version(received, current)
        assert info.value.code == grpc.StatusCode.FAILED_PRECONDITION
        assert info.value.fix


# ------------------------------------------------------------------------------ specs


def test_spec_proto_round_trip_and_gradient_selection() -> None:
    specs = [
        TensorSpec("conv/kernel", "float32", (3, 3, 3, 16)),
        TensorSpec("bn/moving_var", "float32", (16,), trainable=False),
        TensorSpec("step", "int64", ()),
    ]

    back = [
        TensorSpec.from_proto(pb.TensorSpec.FromString(s.to_proto().SerializeToString()))
        for s in specs
    ]

    assert back == specs
    assert specs[0].nbytes == 1728
    # gradient streams carry the new non-trainable values (BN statistics) too
    assert specs_for(specs, pb.UPDATE_KIND_GRADIENTS) == specs
    assert specs_for(specs, pb.UPDATE_KIND_WEIGHTS) == specs
    with pytest.raises(TensorValidationError) as refused:
        specs_for(specs, pb.UPDATE_KIND_UNSPECIFIED)
    assert refused.value.code == grpc.StatusCode.INVALID_ARGUMENT


@pytest.mark.parametrize(
    ("make", "phrase"),
    [
        (lambda: TensorSpec("", "float32", (1,)), "empty name"),
        (lambda: TensorSpec("w", "complex64", (1,)), "complex64"),
        (lambda: TensorSpec("w", "float32", (-1,)), "negative"),
        (lambda: list(encode_tensors({"w": np.ones(1, np.float32)}, chunk_bytes=0)), "chunk size"),
        (lambda: list(encode_tensors({"w": np.ones(1, np.float32)}, wire_dtype="int8")), "int8"),
        (lambda: list(encode_tensors({"w": np.ones(1, np.complex64)})), "complex64"),
        (lambda: StreamAssembler([TensorSpec("w", "float32", ())] * 2), "twice"),
    ],
)
def test_bad_configuration_is_a_config_error(make: Callable[[], object], phrase: str) -> None:
    with pytest.raises(ConfigError, match=phrase):
        make()
