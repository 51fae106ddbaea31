"""The parameter server's checkpoint payload: weights + optimizer state + version, as npz bytes.

The bytes go through a :class:`hfl_lab.vault.CheckpointStore` (the LUKS model vault, or a plain
directory), which makes the write atomic and checks integrity. This module only (de)serializes,
with ``allow_pickle=False``: a checkpoint can never execute code when it is loaded.
"""

from __future__ import annotations

import io
import json
import zipfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt

from hfl_lab._exceptions import VaultError
from trainer.tensors import TensorSpec

__all__ = ["TrainingState", "decode_state", "encode_state"]

_WEIGHT = "w/"
_OPTIMIZER = "opt/"
_META = "meta.json"
FORMAT = "hfl-lab/ps-checkpoint/v1"


@dataclass
class TrainingState:
    """Everything the PS needs to resume: global version, weights, optimizer state, metadata."""

    version: int
    weights: dict[str, npt.NDArray[Any]]
    optimizer: dict[str, npt.NDArray[Any]] = field(default_factory=dict)
    metadata: dict[str, Any] = field(default_factory=dict)


def encode_state(state: TrainingState) -> bytes:
    arrays: dict[str, npt.NDArray[Any]] = {}
    for name, value in state.weights.items():
        arrays[_WEIGHT + name] = np.asarray(value)
    for name, value in state.optimizer.items():
        arrays[_OPTIMIZER + name] = np.asarray(value)
    meta = {"format": FORMAT, "version": state.version, **state.metadata}
    arrays[_META] = np.frombuffer(json.dumps(meta, sort_keys=True).encode(), dtype=np.uint8)
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)  # type: ignore[arg-type]
    return buffer.getvalue()


def decode_state(payload: bytes, specs: Sequence[TensorSpec] | None = None) -> TrainingState:
    """Read a payload back; with ``specs``, every model tensor must be there with its shape."""
    try:
        with np.load(io.BytesIO(payload), allow_pickle=False) as archive:
            arrays = {name: archive[name] for name in archive.files}
    except (ValueError, OSError, zipfile.BadZipFile, EOFError) as e:
        raise VaultError(
            f"the checkpoint payload is not a parameter-server checkpoint ({e}).",
            fix="restore an intact checkpoint, or start the run afresh with a new run folder.",
        ) from None
    if _META not in arrays:
        raise VaultError("the checkpoint has no metadata.", fix="restore an intact checkpoint.")
    meta: dict[str, Any] = json.loads(arrays.pop(_META).tobytes().decode())
    if meta.get("format") != FORMAT:
        raise VaultError(
            f"unknown checkpoint format {meta.get('format')!r} (expected {FORMAT}).",
            fix="resume with the lab version that wrote it.",
        )
    weights = {k[len(_WEIGHT):]: v for k, v in arrays.items() if k.startswith(_WEIGHT)}
    optimizer = {k[len(_OPTIMIZER):]: v for k, v in arrays.items() if k.startswith(_OPTIMIZER)}
    if specs is not None:
        _check_specs(weights, specs)
    version = int(meta.pop("version"))
    meta.pop("format")
    return TrainingState(version, weights, optimizer, meta)


def _check_specs(weights: Mapping[str, npt.NDArray[Any]], specs: Sequence[TensorSpec]) -> None:
    expected = {spec.name: spec for spec in specs}
    missing = sorted(expected.keys() - weights.keys())
    extra = sorted(weights.keys() - expected.keys())
    if missing or extra:
        raise VaultError(
            f"the checkpoint does not fit this model: {len(missing)} tensors missing "
            f"(e.g. {missing[:2]}), {len(extra)} unexpected (e.g. {extra[:2]}).",
            fix="resume with the same depth and batch-norm setting, or use a new run folder.",
        )
    for name, spec in expected.items():
        if tuple(weights[name].shape) != tuple(spec.shape):
            raise VaultError(
                f"checkpoint tensor {name!r} has shape {tuple(weights[name].shape)}, "
                f"the model expects {tuple(spec.shape)}.",
                fix="resume with the same depth, or use a new run folder.",
            )
