"""Reused decode memory (trainer.buffer_pool) never overwrites a live tensor; the quick float32
norm keeps the exact norm's decision; a flat stream's NaN/Inf check made while it arrives."""

from __future__ import annotations

import gc
import math
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest

from hfl_lab._exceptions import TensorValidationError
from trainer.buffer_pool import MIN_POOLED_BYTES, BufferPool
from trainer.flat import (
    QUICK_NORM_MARGIN,
    FlatTensors,
    below_bound,
    flat_layout,
    flat_squared_norm,
    quick_squared_norm,
)
from trainer.proto import parameter_server_pb2 as pb
from trainer.tensor_decode import decode_tensors
from trainer.tensor_wire import parse_chunk, serialize_tensors
from trainer.tensors import TensorSpec

NBYTES = MIN_POOLED_BYTES * 2
# a model large enough for the decode pool: 3 tensors, 1.5 MB
SPECS = [TensorSpec("a", "float32", (256, 512)), TensorSpec("b", "float32", (512,)),
         TensorSpec("stats", "float32", (512, 512), trainable=False)]


def flat_model(value: float | None = None, seed: int = 0) -> FlatTensors:
    layout = flat_layout(SPECS)
    assert layout is not None
    rng = np.random.default_rng(seed)
    buffer = (rng.standard_normal(layout.size).astype(np.float32) if value is None
              else np.full(layout.size, value, np.float32))
    return FlatTensors(buffer, layout)


def decoded(tensors: FlatTensors, chunk_bytes: int = 1 << 18) -> FlatTensors:
    header = pb.StreamHeader(kind=pb.UPDATE_KIND_WEIGHTS, model_version=1)
    messages = [c.data for c in serialize_tensors(tensors, header=header,
                                                  chunk_bytes=chunk_bytes)]
    result = decode_tensors((parse_chunk(m) for m in messages), SPECS).tensors
    assert isinstance(result, FlatTensors)
    return result


# ------------------------------------------------------------------------------ the pool


def address(array: npt.NDArray[Any]) -> int:
    return int(array.__array_interface__["data"][0])


def test_a_block_comes_back_only_when_no_view_of_it_is_alive() -> None:
    pool = BufferPool()
    first = pool.take(NBYTES)
    where = address(first)
    view = first[10:20].view(np.uint16)  # a view: its base is the block
    del first
    second = pool.take(NBYTES)
    assert not np.shares_memory(second, view)  # the view keeps its block busy
    del view, second
    gc.collect()
    assert address(pool.take(NBYTES)) == where  # idle again: handed out again
    assert (pool.made, pool.reused) == (2, 1)


def test_memoryviews_and_float_views_keep_a_block_busy() -> None:
    pool = BufferPool()
    floats = pool.take_floats(NBYTES // 4)
    raw = pool.take(NBYTES).data  # a memoryview of the block
    others = [pool.take(NBYTES) for _ in range(3)]
    addresses = {address(floats), address(np.asarray(raw)), *map(address, others)}
    assert len(addresses) == 5 and (pool.made, pool.reused) == (5, 0)


def test_the_pool_keeps_a_bounded_number_of_blocks() -> None:
    pool = BufferPool(per_size=2, max_bytes=3 * NBYTES)
    held = [pool.take(NBYTES) for _ in range(4)]
    assert pool.held_bytes == 2 * NBYTES  # two of one size
    held.append(pool.take(NBYTES + 4))  # would pass max_bytes: not kept
    held.append(pool.take(MIN_POOLED_BYTES - 1))  # small blocks are never kept
    assert pool.held_bytes == 2 * NBYTES
    assert [b.nbytes for b in held[-2:]] == [NBYTES + 4, MIN_POOLED_BYTES - 1]


def test_decoded_streams_never_share_memory_while_alive() -> None:
    # Arrange: decode one model and keep its tensors
    kept = decoded(flat_model(1.0))
    kept_a = kept["a"]
    # Act: decode others meanwhile, and drop them (their memory is free for reuse)
    for seed in range(3):
        other = decoded(flat_model(seed=seed))
        assert not np.shares_memory(other.buffer, kept.buffer)
        np.testing.assert_array_equal(other.buffer, flat_model(seed=seed).buffer)
        del other
    # Assert: the kept tensors are untouched
    assert np.all(kept.buffer == 1.0) and np.all(kept_a == 1.0)


def test_a_refused_stream_leaves_no_block_busy_and_no_stale_bytes_show() -> None:
    bad = flat_model(2.0)
    bad.buffer[-1] = np.inf
    with pytest.raises(TensorValidationError, match="non-finite"):
        decoded(bad)
    good = decoded(flat_model(seed=7))  # may reuse the refused stream's block
    np.testing.assert_array_equal(good.buffer, flat_model(seed=7).buffer)


# ------------------------------------------------------------------------------ NaN/Inf check


@pytest.mark.parametrize("where", [0.0, 0.5, 1.0])
def test_a_flat_stream_with_nan_in_any_chunk_is_refused(where: float) -> None:
    tensors = flat_model()
    index = round(where * (tensors.layout.size - 1))
    tensors.buffer[index] = np.nan
    name = tensors.layout.name_at(index)
    with pytest.raises(TensorValidationError, match=f"'{name}': non-finite values.*1 NaN/Inf"):
        decoded(tensors)


def test_huge_finite_values_whose_sum_overflows_are_accepted() -> None:
    tensors = flat_model(3e38)  # every chunk's float32 sum overflows; each value is finite
    np.testing.assert_array_equal(decoded(tensors).buffer, tensors.buffer)


# ------------------------------------------------------------------------------ quick norm


@pytest.mark.parametrize("size", [0, 1, 1000, 200_003])
def test_the_quick_norm_is_within_its_margin_of_the_exact_one(size: int) -> None:
    rng = np.random.default_rng(size)
    values = (rng.standard_normal(size) * rng.uniform(1e-3, 1e3, size)).astype(np.float32)
    base = rng.standard_normal(size).astype(np.float32)
    for minus in (None, base):
        exact = flat_squared_norm(values, minus)
        quick = quick_squared_norm(values, minus)
        assert abs(quick - exact) <= QUICK_NORM_MARGIN / 5 * exact


def test_the_quick_norm_sums_overflowing_blocks_in_float64() -> None:
    values = np.full(100_000, 1e30, np.float32)  # 1e60 squared: beyond float32
    values[:50] = 1.0
    assert quick_squared_norm(values) == flat_squared_norm(values)
    assert math.isfinite(quick_squared_norm(values, -values))


def test_below_bound_decides_only_what_the_exact_norm_would() -> None:
    values = np.random.default_rng(3).standard_normal(100_000).astype(np.float32)
    norm = math.sqrt(flat_squared_norm(values))
    quick = quick_squared_norm(values)
    assert below_bound(quick, norm * 1.001, values.size)
    assert not below_bound(quick, norm, values.size)  # at the bound: the exact norm decides
    assert not below_bound(quick, norm * 0.999, values.size)
    tiny = np.full(10, 1e-30, np.float32)  # squares below float32's range: count as zero
    assert not below_bound(quick_squared_norm(tiny), 1e-25, tiny.size)
