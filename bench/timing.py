"""Timing helpers: median wall time over repetitions, after a warm-up."""

from __future__ import annotations

import contextlib
import gc
import statistics
import time
from collections.abc import Callable, Iterator, Mapping


@contextlib.contextmanager
def _frozen_heap() -> Iterator[None]:
    """Move what exists now out of the collector's reach for the duration of a measurement.

    The collection before each timed call then scans only what the benchmark made since,
    instead of every object of TensorFlow and Keras (about 0.15 s a call once they are imported).
    """
    gc.collect()
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()


def median_seconds(fn: Callable[[], object], *, repeats: int, warmup: int = 1) -> float:
    """Median wall time of ``fn()``; the warm-up runs fill caches and allocator pools."""
    for _ in range(warmup):
        fn()
    times = []
    with _frozen_heap():
        for _ in range(repeats):
            gc.collect()  # a collection inside a timed call belongs to no one's figure
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def interleaved_medians(
    fns: Mapping[str, Callable[[], object]], *, repeats: int, warmup: int = 1
) -> dict[str, float]:
    """Median wall time of each function, alternating them so that drift on a shared
    machine hits the measurement and its baseline alike."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    with _frozen_heap():
        for _ in range(repeats):
            for name, fn in fns.items():
                gc.collect()
                start = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in times.items()}
