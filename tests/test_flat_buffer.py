"""The model as one flat buffer: its layout, flat streams and their validation, and the
optimizer and aggregator over flat buffers giving the per-tensor results bit for bit."""

from __future__ import annotations

import math
from collections.abc import Callable

import grpc
import numpy as np
import pytest

from hfl_lab._exceptions import TensorValidationError
from trainer.aggregation import Aggregator, clip_to_norm, l2_norm
from trainer.flat import FlatTensors, all_finite, flat_layout, flat_squared_norm
from trainer.model import VariableSpec
from trainer.optim import MomentumSGD, PiecewiseConstantSchedule
from trainer.proto import parameter_server_pb2 as pb
from trainer.tensor_decode import decode_tensors
from trainer.tensor_wire import parse_chunk, serialize_tensors
from trainer.tensors import TensorSpec, encode_tensors

Chunks = list[pb.TensorChunk]

SPECS = [
    TensorSpec("conv/kernel", "float32", (3, 3, 3, 8)),
    TensorSpec("bn/gamma", "float32", (8,)),
    TensorSpec("bn/beta", "float32", (8,)),
    TensorSpec("bn/moving_mean", "float32", (8,), trainable=False),
    TensorSpec("bn/moving_variance", "float32", (8,), trainable=False),
    TensorSpec("dense/kernel", "float32", (8, 10)),
    TensorSpec("dense/bias", "float32", (10,)),
    TensorSpec("empty", "float32", (0, 3)),
]
VARIABLES = [VariableSpec(s.name, s.shape, "float32", s.trainable, s.name.startswith("bn/"))
             for s in SPECS]


def model(seed: int = 0, scale: float = 1.0) -> FlatTensors:
    rng = np.random.default_rng(seed)
    layout = flat_layout(SPECS)
    assert layout is not None
    return layout.gather({s.name: (rng.standard_normal(s.shape) * scale).astype(np.float32)
                          for s in SPECS})


def stream(tensors: FlatTensors, chunk_bytes: int = 256, **kwargs: object) -> Chunks:
    header = pb.StreamHeader(kind=pb.UPDATE_KIND_GRADIENTS, model_version=3)
    return list(encode_tensors(tensors, header=header, chunk_bytes=chunk_bytes,
                               **kwargs))  # type: ignore[arg-type]


def refused(chunks: Chunks) -> TensorValidationError:
    with pytest.raises(TensorValidationError) as info:
        decode_tensors(chunks, SPECS)
    return info.value


# ------------------------------------------------------------------------------ the layout


def test_layout_puts_trainable_tensors_first_and_iterates_in_spec_order() -> None:
    # Act
    layout = flat_layout(SPECS)
    # Assert
    assert layout is not None
    assert [e[0] for e in layout.entries] == [
        "conv/kernel", "bn/gamma", "bn/beta", "dense/kernel", "dense/bias", "empty",
        "bn/moving_mean", "bn/moving_variance"]
    assert layout.trainable_size == 216 + 8 + 8 + 80 + 10
    assert layout.size == layout.trainable_size + 16
    assert list(FlatTensors(np.zeros(layout.size, np.float32), layout)) == [s.name for s in SPECS]
    tensors = model()
    assert np.shares_memory(tensors["dense/bias"], tensors.buffer)
    assert list(tensors.trainable) == [s.name for s in SPECS if s.trainable]
    assert list(tensors.non_trainable) == ["bn/moving_mean", "bn/moving_variance"]
    np.testing.assert_array_equal(tensors.non_trainable["bn/moving_mean"],
                                  tensors["bn/moving_mean"])


def test_digest_names_the_layout() -> None:
    layout = flat_layout(SPECS)
    same = flat_layout([TensorSpec(s.name, s.dtype, s.shape, s.trainable) for s in SPECS])
    reshaped = flat_layout([*SPECS[:5], TensorSpec("dense/kernel", "float32", (10, 8)),
                            *SPECS[6:]])
    renamed = flat_layout([TensorSpec("x" if s.name == "empty" else s.name, s.dtype, s.shape,
                                      s.trainable) for s in SPECS])
    assert layout is not None and same is not None and reshaped is not None
    assert renamed is not None
    assert layout.digest == same.digest
    assert layout.digest != reshaped.digest and layout.digest != renamed.digest
    assert flat_layout([TensorSpec("ids", "int32", (3,))]) is None  # no flat form


def test_norm_and_finiteness_over_the_buffer() -> None:
    values = np.random.default_rng(1).standard_normal(200_000).astype(np.float32)
    other = values[::-1].copy()
    assert math.isclose(flat_squared_norm(values),
                        float(np.square(values, dtype=np.float64).sum()), rel_tol=1e-12)
    assert math.isclose(flat_squared_norm(values, other),
                        float(np.square(values.astype(np.float64) - other).sum()),
                        rel_tol=1e-12)
    huge = np.full(10, 3e38, np.float32)  # its float32 sum overflows; it is finite all the same
    assert all_finite(values) and all_finite(huge)
    values[12345] = np.nan
    assert not all_finite(values)


# ------------------------------------------------------------------------------ flat streams


@pytest.mark.parametrize("wire_dtype", ["float32", "float16", "bfloat16"])
@pytest.mark.parametrize("chunk_bytes", [4, 100, 256, 1 << 20])
def test_flat_stream_round_trips(wire_dtype: str, chunk_bytes: int) -> None:
    # Arrange
    tensors = model()
    # Act
    chunks = stream(tensors, chunk_bytes, wire_dtype=wire_dtype)
    wire = [parse_chunk(c.SerializeToString()) for c in chunks]
    decoded = decode_tensors(wire, SPECS)
    # Assert
    assert all(len(c.pieces) == 1 and not c.pieces[0].name for c in chunks)
    assert chunks[0].header.layout_digest == tensors.layout.digest
    assert chunks[0].header.tensor_count == len(SPECS)
    result = decoded.tensors
    assert isinstance(result, FlatTensors) and list(result) == [s.name for s in SPECS]
    tolerance = {"float32": 0, "float16": 1e-3, "bfloat16": 8e-3}[wire_dtype]
    np.testing.assert_allclose(result.buffer, tensors.buffer, rtol=tolerance, atol=tolerance)
    started = sum(c.tensors_started for c in serialize_tensors(
        tensors, wire_dtype=wire_dtype, chunk_bytes=chunk_bytes))
    assert started == len(SPECS)  # each tensor counted once, where its first byte travels


def test_per_tensor_streams_decode_into_the_same_flat_layout() -> None:
    tensors = model()
    decoded = decode_tensors(encode_tensors(dict(tensors), chunk_bytes=64), SPECS)
    assert isinstance(decoded.tensors, FlatTensors)
    np.testing.assert_array_equal(decoded.tensors.buffer, tensors.buffer)


def _with_piece(chunks: Chunks, index: int, **fields: object) -> Chunks:
    for name, value in fields.items():
        setattr(chunks[index].pieces[0], name, value)
    return chunks


def _digest_of_another_model(chunks: Chunks) -> Chunks:
    chunks[0].header.layout_digest = bytes(32)
    return chunks


def _final_inside(chunks: Chunks) -> Chunks:
    chunks[-1].pieces[0].data = chunks[-1].pieces[0].data[:-4]
    chunks[0].header.total_bytes -= 4
    return chunks


def _nan_in_dense_kernel() -> Chunks:
    tensors = model()
    tensors["dense/kernel"][3, 4] = np.nan
    tensors["dense/bias"][0] = np.inf
    return stream(tensors)


CASES: dict[str, tuple[Callable[[], Chunks], grpc.StatusCode, str]] = {
    "another model's digest": (lambda: _digest_of_another_model(stream(model())),
                               grpc.StatusCode.INVALID_ARGUMENT, "layout digest"),
    "NaN/Inf": (_nan_in_dense_kernel, grpc.StatusCode.INVALID_ARGUMENT,
                "'dense/kernel': non-finite values"),
    "final chunk missing": (lambda: stream(model())[:-1], grpc.StatusCode.DATA_LOSS,
                            "without its final chunk"),
    "final chunk inside a tensor": (lambda: _final_inside(stream(model())),
                                    grpc.StatusCode.DATA_LOSS, "final chunk arrived inside"),
    "declared oversize": (lambda: _with_piece(stream(model()), 0, total_bytes=1 << 40),
                          grpc.StatusCode.RESOURCE_EXHAUSTED, "more bytes announced"),
    "named piece": (lambda: _with_piece(stream(model()), 1, name="conv/kernel"),
                    grpc.StatusCode.INVALID_ARGUMENT, "named piece"),
    "out of order": (lambda: _with_piece(stream(model()), 2, offset=0),
                     grpc.StatusCode.INVALID_ARGUMENT, "out of order"),
    "re-encoded": (lambda: _with_piece(stream(model()), 1, wire_dtype=pb.DTYPE_FLOAT16),
                   grpc.StatusCode.INVALID_ARGUMENT, "re-encoded"),
    "wire dtype": (lambda: _with_piece(stream(model()), 0, wire_dtype=pb.DTYPE_INT8),
                   grpc.StatusCode.INVALID_ARGUMENT, "wire dtype not accepted"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_flat_streams_are_refused_with_their_status(case: str) -> None:
    make, code, phrase = CASES[case]
    error = refused(make())
    assert error.code == code
    assert phrase in error.message


def test_a_flat_stream_must_state_every_tensor() -> None:
    chunks = stream(model())
    chunks[0].header.tensor_count -= 1
    error = refused(chunks)
    assert error.code == grpc.StatusCode.INVALID_ARGUMENT
    assert "header disagrees" in error.message


def test_a_flat_stream_in_float16_names_the_first_tensor_beyond_its_range() -> None:
    tensors = model()
    tensors["bn/beta"][2] = 1e6
    tensors["dense/kernel"][0, 0] = -2e6  # later in the layout, and larger

    with pytest.raises(TensorValidationError, match=r"'bn/beta'.*float16 range") as info:
        stream(tensors, wire_dtype="float16")

    assert "max |x| = 1e+06 > 65504" in info.value.message
    assert info.value.code == grpc.StatusCode.INVALID_ARGUMENT


# ------------------------------------------------------------------- optimizer and aggregator


def test_flat_optimizer_matches_the_per_tensor_one_bit_for_bit() -> None:
    # Arrange: two optimizers, one fed dicts, one fed the flat buffer
    schedule = PiecewiseConstantSchedule((2,), (0.1, 0.01))
    per_tensor = MomentumSGD(VARIABLES, schedule, weight_decay=2e-4)
    flat = MomentumSGD(VARIABLES, schedule, weight_decay=2e-4)
    weights = model(0)
    dict_weights = dict(weights.copy())
    flat_weights = weights.trainable.buffer.copy()
    for step in range(4):
        gradients = model(10 + step, scale=0.1).trainable
        before = gradients.buffer.copy()
        # Act
        dict_weights = per_tensor.apply(dict_weights, dict(gradients))
        flat_weights = flat.apply_flat(flat_weights, gradients.buffer)
        # Assert
        np.testing.assert_array_equal(gradients.buffer, before)  # inputs left alone
        for name, start, end, _ in flat.layout.entries:
            np.testing.assert_array_equal(flat_weights[start:end],
                                          dict_weights[name].reshape(-1), err_msg=name)
    restored = MomentumSGD(VARIABLES, schedule)
    restored.load_state(flat.state())
    np.testing.assert_array_equal(restored.velocity.buffer, flat.velocity.buffer)
    assert restored.step == 4


@pytest.mark.parametrize("rule", ["mean", "median", "trimmed_mean"])
def test_flat_aggregation_matches_the_per_tensor_one(rule: str) -> None:
    # Arrange: the same three contributions, flat and as dicts
    parts = [model(seed) for seed in range(3)]
    shapes = {s.name: s.shape for s in SPECS if s.trainable}
    results = []
    for as_flat in (True, False):
        got: list[object] = []
        aggregator = Aggregator("sync", 3, shapes=shapes, rule=rule, apply=got.append)
        for i, part in enumerate(parts):
            update = part.trainable if as_flat else dict(part.trainable)
            stats = part.non_trainable if as_flat else dict(part.non_trainable)
            # Act
            outcome = aggregator.submit(f"worker{i}", 0, update, non_trainable=stats)
            assert outcome.accepted, outcome.reason
        results.append(got[0])
    flat_update, dict_update = results
    # Assert
    assert isinstance(flat_update.tensors, FlatTensors)  # type: ignore[attr-defined]
    for name in shapes:
        np.testing.assert_array_equal(flat_update.tensors[name],  # type: ignore[attr-defined]
                                      dict_update.tensors[name], err_msg=name)  # type: ignore[attr-defined]
    for name in ("bn/moving_mean", "bn/moving_variance"):
        np.testing.assert_array_equal(flat_update.non_trainable[name],  # type: ignore[attr-defined]
                                      dict_update.non_trainable[name])  # type: ignore[attr-defined]


def test_flat_contributions_are_validated_like_dicts() -> None:
    shapes = {s.name: s.shape for s in SPECS if s.trainable}
    aggregator = Aggregator("sync", 2, shapes=shapes)
    poisoned = model(0)
    poisoned["dense/bias"][1] = np.nan
    outcome = aggregator.submit("worker0", 0, poisoned.trainable,
                                non_trainable=poisoned.non_trainable)
    assert not outcome.accepted and "'dense/bias'" in outcome.reason
    other = flat_layout([TensorSpec("dense/kernel", "float32", (8, 10))])
    assert other is not None
    outcome = aggregator.submit("worker0", 0, other.gather({"dense/kernel": np.zeros((8, 10),
                                                                                    np.float32)}))
    assert not outcome.accepted and "differ" in outcome.reason


def test_flat_clipping_scales_like_the_per_tensor_one() -> None:
    update = model(0, scale=10.0).trainable
    clipped, norm = clip_to_norm(update, 5.0)
    reference, reference_norm = clip_to_norm(dict(update), 5.0)
    assert isinstance(clipped, FlatTensors)
    assert math.isclose(norm, reference_norm, rel_tol=1e-12)
    assert math.isclose(l2_norm(clipped), 5.0, rel_tol=1e-6)
    for name in update:
        np.testing.assert_allclose(clipped[name], reference[name], rtol=1e-6)
    same, _ = clip_to_norm(update, 1e9)
    assert same is update  # below the bound: untouched, not copied
