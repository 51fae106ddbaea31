"""Benchmark registration: the `@benchmark` decorator and the registry `python -m bench` runs."""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

from hfl_lab._exceptions import ConfigError

#: modules of this package that hold tools, not benchmarks
_NOT_BENCHMARKS = frozenset(
    {"__main__", "plain_participant", "registry", "report", "runner", "simulated_joiners",
     "simulated_workers", "support", "timing"}
)


@dataclass(frozen=True)
class BenchContext:
    """What a benchmark may adapt to: ``quick`` runs fewer repetitions."""

    quick: bool = False

    def repeats(self, full: int, quick: int = 3) -> int:
        return quick if self.quick else full


@dataclass(frozen=True)
class Measurement:
    """A benchmark's result: ``value`` in the benchmark's unit, and the same-run baseline."""

    value: float
    baseline: float | None = None

    @property
    def ratio(self) -> float | None:
        return None if self.baseline is None else self.value / self.baseline


@dataclass(frozen=True)
class Benchmark:
    id: str
    what: str
    unit: str
    goal: str
    run: Callable[..., Measurement]
    params: dict[str, Any] = field(default_factory=dict)
    judged_by: str = "ratio"  # "value" for figures BENCH.md lists in seconds

    def measure(self, ctx: BenchContext) -> Measurement:
        return self.run(ctx, **self.params)


class Registry:
    """Benchmarks by id, in registration order."""

    def __init__(self) -> None:
        self._benchmarks: dict[str, Benchmark] = {}

    def add(self, bench: Benchmark) -> None:
        if bench.id in self._benchmarks:
            raise ConfigError(
                f"benchmark id '{bench.id}' is registered twice.",
                fix="give every figure its own id (see docs/BENCH.md).",
            )
        self._benchmarks[bench.id] = bench

    def __iter__(self) -> Iterator[Benchmark]:
        return iter(self._benchmarks.values())

    def __len__(self) -> int:
        return len(self._benchmarks)

    def select(self, ids: Iterable[str] | None) -> list[Benchmark]:
        """The benchmarks named in ``ids`` (all when None), in registration order. An id also
        names its family: ``X-join`` selects ``X-join`` and every ``X-join-...`` (the figures
        one measurement writes together)."""
        if ids is None:
            return list(self)
        wanted = set(ids)

        def named(bench_id: str, name: str) -> bool:
            return bench_id == name or bench_id.startswith(name + "-")

        unknown = sorted(name for name in wanted
                         if not any(named(bench_id, name) for bench_id in self._benchmarks))
        if unknown:
            raise ConfigError(
                f"unknown benchmark id(s): {', '.join(unknown)}.",
                fix=f"choose among {', '.join(self._benchmarks) or 'none registered'}.",
            )
        return [bench for bench in self if any(named(bench.id, name) for name in wanted)]


REGISTRY = Registry()


def benchmark(
    id: str,  # named like the record field
    *,
    what: str,
    unit: str,
    goal: str = "report",
    registry: Registry | None = None,
    judged_by: str = "ratio",
    **params: Any,
) -> Callable[[Callable[..., Measurement]], Callable[..., Measurement]]:
    """Register the decorated ``fn(ctx, **params) -> Measurement`` under ``id``.

    Stack the decorator to register one function for several sizes (``params`` differ).
    """
    from bench.report import parse_goal

    parse_goal(goal)  # a typo in a goal fails at import, not after an hour of measuring

    def register(fn: Callable[..., Measurement]) -> Callable[..., Measurement]:
        (REGISTRY if registry is None else registry).add(
            Benchmark(id, what, unit, goal, fn, dict(params), judged_by)
        )
        return fn

    return register


def discover(package: str = "bench") -> None:
    """Import every module of ``package`` so that their decorators register."""
    module = importlib.import_module(package)
    for info in pkgutil.iter_modules(module.__path__):
        if info.name not in _NOT_BENCHMARKS:
            importlib.import_module(f"{package}.{info.name}")
