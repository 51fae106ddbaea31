"""A version's pull is serialized once, as the first pull streams it (trainer.ps_jobs)."""

from __future__ import annotations

import threading
from collections.abc import Iterator

import grpc
import pytest

from hfl_lab._exceptions import TensorValidationError
from trainer.ps_jobs import PullCache, SerializedStream
from trainer.tensor_wire import SerializedChunk


def source(count: int, made: list[int], fail_at: int | None = None) -> Iterator[SerializedChunk]:
    for index in range(count):
        if index == fail_at:
            raise TensorValidationError("cannot encode", code=grpc.StatusCode.INVALID_ARGUMENT)
        made.append(index)
        yield SerializedChunk(bytes([index]) * 10, 1, 10)


def test_a_chunk_is_sent_before_the_next_is_made() -> None:
    made: list[int] = []
    reader = iter(SerializedStream(source(3, made)))
    assert next(reader).data == bytes([0]) * 10 and made == [0]
    assert [c.data[0] for c in reader] == [1, 2] and made == [0, 1, 2]


def test_every_reader_gets_the_same_chunks_made_once() -> None:
    # Arrange: 4 readers of one stream at once
    made: list[int] = []
    stream = SerializedStream(source(50, made))
    results: list[list[SerializedChunk]] = []
    go = threading.Barrier(4)

    def read() -> None:
        go.wait(timeout=30)
        results.append(list(stream))

    # Act
    threads = [threading.Thread(target=read) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    # Assert: the same bytes objects, in order, each made once
    assert made == list(range(50)) and len(results) == 4
    assert all([c.data for c in r] == [c.data for c in results[0]] for r in results)
    assert all(a is b for r in results for a, b in zip(r, results[0], strict=True))


def test_an_encoding_error_reaches_every_reader() -> None:
    stream = SerializedStream(source(5, [], fail_at=2))
    for _ in range(2):
        got: list[SerializedChunk] = []
        with pytest.raises(TensorValidationError, match="cannot encode"):
            got.extend(stream)
        assert len(got) == 2  # what was made goes out; then the error, not a short stream


def test_the_cache_keeps_one_version_and_wire() -> None:
    cache = PullCache()
    made: list[int] = []
    first = cache.get(1, 0, lambda: source(2, made))
    assert cache.get(1, 0, lambda: source(2, made)) is first
    assert cache.get(1, 1, lambda: source(2, made)) is not first
    assert cache.get(2, 0, lambda: source(2, made)) is not first
    assert made == []  # nothing is made before a pull reads it
