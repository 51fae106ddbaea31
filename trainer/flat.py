"""A model's float32 tensors as one flat buffer: trainable first, then non-trainable.

Both sides of the wire know the model's tensor specs, so both derive the same offset table
(:class:`FlatLayout`) and the same digest of it. A tensor is then a view of the buffer; a push,
a pull, the NaN/Inf check, the aggregation and the optimizer each touch the buffer as a whole
instead of 279 tensors one by one (ResNet-56).
"""

from __future__ import annotations

import functools
import hashlib
import math
from collections.abc import Iterator, KeysView, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import numpy.typing as npt

from hfl_lab._exceptions import ConfigError

__all__ = ["QUICK_NORM_MARGIN", "FlatLayout", "FlatTensors", "all_finite", "below_bound",
           "flat_layout", "flat_squared_norm", "is_flat", "quick_squared_norm"]

FloatArray = npt.NDArray[np.float32]

#: elements per block when a float64 reduction runs over a float32 buffer (fits in L2 cache)
_BLOCK = 1 << 16


class _Spec(Protocol):
    @property
    def name(self) -> str: ...
    @property
    def dtype(self) -> str: ...
    @property
    def shape(self) -> tuple[int, ...]: ...
    @property
    def trainable(self) -> bool: ...


@dataclass(frozen=True, eq=False)
class FlatLayout:
    """Where each tensor lives in a flat float32 buffer: ``(name, start, end, shape)`` in order.

    ``trainable_size`` elements of trainable tensors come first, in spec order; the
    non-trainable ones (batch-norm moving statistics) follow, in spec order.
    """

    entries: tuple[tuple[str, int, int, tuple[int, ...]], ...]
    trainable_count: int
    trainable_size: int
    size: int
    #: the names in the specs' own order: how a :class:`FlatTensors` iterates
    order: tuple[str, ...] = ()

    def same_as(self, other: FlatLayout) -> bool:
        return self is other or self.digest == other.digest

    @functools.cached_property
    def digest(self) -> bytes:
        """SHA-256 of the names, shapes and offsets: equal digests, equal layouts."""
        text = "\n".join(f"{n}|{a}|{b}|{','.join(map(str, s))}" for n, a, b, s in self.entries)
        return hashlib.sha256(f"{self.trainable_size}\n{text}".encode()).digest()

    @functools.cached_property
    def index(self) -> dict[str, tuple[int, int, tuple[int, ...]]]:
        return {n: (a, b, s) for n, a, b, s in self.entries}

    @functools.cached_property
    def names(self) -> tuple[str, ...]:
        return self.order or tuple(n for n, _, _, _ in self.entries)

    @functools.cached_property
    def trainable(self) -> FlatLayout:
        """The layout of the trainable part alone (offsets unchanged: it comes first)."""
        entries = self.entries[: self.trainable_count]
        return FlatLayout(entries, len(entries), self.trainable_size, self.trainable_size)

    @functools.cached_property
    def non_trainable(self) -> FlatLayout:
        """The layout of the non-trainable part alone, offsets from its own start."""
        t = self.trainable_size
        entries = tuple((n, a - t, b - t, s) for n, a, b, s in
                        self.entries[self.trainable_count:])
        return FlatLayout(entries, 0, 0, self.size - t)

    @functools.cached_property
    def shapes(self) -> dict[str, tuple[int, ...]]:
        return {n: s for n, _, _, s in self.entries}

    @functools.cached_property
    def starts(self) -> npt.NDArray[np.int64]:
        return np.array([a for _, a, _, _ in self.entries], dtype=np.int64)

    def tensors_starting(self, begin: int, end: int) -> int:
        """How many tensors start at an element offset in ``[begin, end)``."""
        return int(np.searchsorted(self.starts, end) - np.searchsorted(self.starts, begin))

    def name_at(self, element: int) -> str:
        """The tensor that holds element ``element``."""
        for name, start, end, _ in self.entries:
            if start <= element < end:
                return name
        return self.entries[-1][0] if self.entries else ""

    def gather(self, tensors: Mapping[str, npt.ArrayLike]) -> FlatTensors:
        """``tensors`` copied into a new buffer of this layout (names and shapes checked)."""
        if isinstance(tensors, FlatTensors) and tensors.layout.same_as(self):
            return tensors
        buffer = np.empty(self.size, dtype=np.float32)
        if tensors.keys() != self.index.keys():
            diff = sorted(set(tensors) ^ set(self.index))[:3]
            raise ConfigError(f"tensors differ from the model's: {diff}.",
                              fix="pass every tensor of the model, by its spec name.")
        for name, start, end, shape in self.entries:
            value = np.asarray(tensors[name], dtype=np.float32)
            if value.shape != shape:
                raise ConfigError(f"tensor {name!r} has shape {value.shape}, expected {shape}.",
                                  fix="pass tensors of the model's own shapes.")
            buffer[start:end] = value.reshape(-1)
        return FlatTensors(buffer, self)


@functools.lru_cache(maxsize=32)
def _layout_of(specs: tuple[tuple[str, str, tuple[int, ...], bool], ...]) -> FlatLayout | None:
    if any(dtype != "float32" for _, dtype, _, _ in specs):
        return None
    entries = []
    offset = 0
    for trainable in (True, False):
        for name, _, shape, is_trainable in specs:
            if is_trainable is trainable:
                size = math.prod(shape)
                entries.append((name, offset, offset + size, tuple(shape)))
                offset += size
        if trainable:
            trainable_count, trainable_size = len(entries), offset
    if len({e[0] for e in entries}) != len(entries):
        return None
    return FlatLayout(tuple(entries), trainable_count, trainable_size, offset,
                      tuple(name for name, _, _, _ in specs))


def flat_layout(specs: Sequence[_Spec]) -> FlatLayout | None:
    """The flat layout of a model's specs; None when a tensor is not float32 (no flat form)."""
    return _layout_of(tuple((s.name, s.dtype, tuple(s.shape), bool(s.trainable)) for s in specs))


class FlatTensors(Mapping[str, FloatArray]):
    """A name -> array mapping whose arrays are views of one flat float32 buffer (float64 for
    an aggregator's running sums)."""

    __slots__ = ("buffer", "layout", "whole")

    def __init__(self, buffer: npt.NDArray[Any], layout: FlatLayout) -> None:
        if (buffer.dtype not in (np.float32, np.float64) or buffer.ndim != 1
                or len(buffer) != layout.size):
            raise ConfigError(
                f"a flat buffer of {layout.size} floats was expected, got {buffer.dtype} "
                f"{buffer.shape}.", fix="build the buffer from the model's FlatLayout.")
        self.buffer: FloatArray = buffer
        self.layout = layout
        #: for a part (:attr:`trainable`, :attr:`non_trainable`): the tensors it is part of
        self.whole: FlatTensors | None = None

    def __getitem__(self, name: str) -> FloatArray:
        start, end, shape = self.layout.index[name]
        return self.buffer[start:end].reshape(shape)

    def __iter__(self) -> Iterator[str]:
        return iter(self.layout.names)

    def __len__(self) -> int:
        return len(self.layout.entries)

    def __contains__(self, name: object) -> bool:
        return name in self.layout.index

    def keys(self) -> KeysView[str]:  # a dict's keys view: == with another is fast
        return self.layout.index.keys()

    @property
    def trainable(self) -> FlatTensors:
        """The trainable tensors: a view of the buffer's first part."""
        part = self.layout.trainable
        view = FlatTensors(self.buffer[: part.size], part)
        view.whole = self
        return view

    @property
    def non_trainable(self) -> FlatTensors:
        """The non-trainable tensors: a view of the buffer's second part."""
        part = self.layout.non_trainable
        view = FlatTensors(self.buffer[self.layout.trainable_size:], part)
        view.whole = self
        return view

    def copy(self) -> FlatTensors:
        return FlatTensors(self.buffer.copy(), self.layout)


def flat_squared_norm(buffer: npt.NDArray[np.float32],
                      minus: npt.NDArray[np.float32] | None = None) -> float:
    """The sum of squares of a float32 buffer (of ``buffer - minus``), in float64 (finite
    float32 values never overflow it), block by block: no float64 copy of the buffer is made."""
    total = 0.0
    scratch = np.empty(min(_BLOCK, len(buffer)), dtype=np.float64)
    for start in range(0, len(buffer), _BLOCK):
        block = buffer[start:start + _BLOCK]
        part = scratch[: len(block)]
        if minus is None:
            np.copyto(part, block)
        else:
            np.subtract(block, minus[start:start + _BLOCK], out=part, dtype=np.float64)
        # not np.dot: BLAS wakes its thread pool per call, which on a busy machine costs
        # milliseconds each time
        np.square(part, out=part)
        total += float(np.add.reduce(part))
    return total


#: :func:`quick_squared_norm`'s relative error is below this (see there): a sum this much
#: below a bound is below it exactly too
QUICK_NORM_MARGIN = 1e-5


def quick_squared_norm(buffer: npt.NDArray[np.float32],
                       minus: npt.NDArray[np.float32] | None = None) -> float:
    """:func:`flat_squared_norm` at half the memory traffic, to within a relative 1e-5.

    Each block's difference, squares and sum stay float32 (numpy's pairwise summation); the
    block sums add up in float64. The float32 rounding of the difference and the square cost
    2^-24 each and the pairwise sum of a block under 30 roundings of 2^-24: under 2e-6 of the
    sum in all, which is far inside :data:`QUICK_NORM_MARGIN`. A block whose float32 sum is
    not finite (its squares overflow float32: values beyond 1.8e19) is summed again in
    float64, as :func:`flat_squared_norm` does. Squares below float32's smallest subnormal
    (values under 1e-22) count as zero: each adds under 1.5e-45 to the true sum.
    """
    total = 0.0
    scratch = np.empty(min(_BLOCK, len(buffer)), dtype=np.float32)
    for start in range(0, len(buffer), _BLOCK):
        block = buffer[start:start + _BLOCK]
        other = None if minus is None else minus[start:start + _BLOCK]
        part = scratch[: len(block)]
        with np.errstate(over="ignore", invalid="ignore"):
            if other is None:
                np.multiply(block, block, out=part)
            else:
                np.subtract(block, other, out=part)
                np.multiply(part, part, out=part)
            value = float(np.add.reduce(part))
        if not math.isfinite(value):
            value = flat_squared_norm(block, other)
        total += value
    return total


def below_bound(squared: float, bound: float, size: int) -> bool:
    """True when a :func:`quick_squared_norm` of ``size`` elements shows the exact norm to be
    at most ``bound`` (False: the exact norm decides)."""
    limit = bound * bound * (1 - QUICK_NORM_MARGIN) - size * 1.5e-45  # subnormals lost
    return squared <= limit


def all_finite(buffer: npt.NDArray[np.floating[Any]]) -> bool:
    """True when no element is NaN or infinite: one summing pass without a temporary (NaN and
    Inf make the sum non-finite; only a huge finite buffer's overflow needs the exact check)."""
    with np.errstate(all="ignore"):
        if np.isfinite(np.add.reduce(buffer, axis=None)):
            return True
    return bool(np.isfinite(buffer).all())


def is_flat(tensors: object) -> bool:
    """True for :class:`FlatTensors` and for an empty mapping (no tensors: nothing to lay out)."""
    return isinstance(tensors, FlatTensors) or (isinstance(tensors, Mapping) and not tensors)
