"""The CIFAR-10 python batch files, read without letting them run code.

The batch files are pickles on storage the host controls, read inside attested TDs: a plain
pickle.load would run whatever a crafted file names. _BatchUnpickler admits only the globals
an official batch refers to, and each as a stand-in that accepts just the arguments those files
pass, so no numpy or Python callable ever sees the file's values; arrays are rebuilt with
np.frombuffer from checked bytes. (The shared subset was pickled by Python 3 with numpy 2, the
official download by Python 2 with numpy 1: both spellings of _reconstruct are admitted.)
"""

from __future__ import annotations

import _compat_pickle
import io
import math
import pickle
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from hfl_lab._exceptions import ConfigError

__all__ = ["IMAGE_SIZE", "NUM_CLASSES", "Images", "Labels", "parse_batch"]

NUM_CLASSES = 10
IMAGE_SIZE = 32

Images = npt.NDArray[np.uint8]
Labels = npt.NDArray[np.int64]


class _Refused(Exception):
    """A batch file asked for something no CIFAR-10 batch holds (``what`` says what)."""

    def __init__(self, what: str) -> None:
        super().__init__(what)
        self.what = what


class _Admitted:
    """A global a batch file may name: a stand-in callable that pickle's BUILD cannot modify."""

    def __init__(self, call: Any = None) -> None:
        self._call = call

    def __call__(self, *args: object) -> object:
        if self._call is None:
            raise _Refused("calls numpy.ndarray directly, which no CIFAR-10 batch does")
        return self._call(*args)

    def __setstate__(self, state: object) -> None:
        raise _Refused("tries to modify the loader's stand-in for a numpy or codec global")


#: ``numpy.ndarray``: only the subtype argument of _reconstruct, never called
_NDARRAY = _Admitted()
_INTEGER_CODES = frozenset(f"{kind}{size}" for kind in "iu" for size in (1, 2, 4, 8))
_PLAIN_DTYPE_STATE = (None, None, None, -1, -1, 0)  # no sub-array, names, fields; default flags
_DTYPE_KINDS = {"b": "bool", "f": "float", "c": "complex", "O": "object", "S": "bytes",
                "U": "text", "V": "structured", "M": "datetime", "m": "timedelta"}


def _text(value: object) -> str | None:
    if isinstance(value, bytes):
        return value.decode("latin-1")
    return value if isinstance(value, str) else None


def _latin1(text: object, encoding: object = "utf-8", errors: object = "strict") -> bytes:
    """``_codecs.encode(str, "latin1")``: how Python 3 writes bytes in a protocol-2 pickle."""
    if isinstance(text, str) and encoding in ("latin1", "latin-1") and errors == "strict":
        return text.encode("latin-1")
    raise _Refused(
        f"calls _codecs.encode with a {type(text).__name__} and {encoding!r}, not the latin1 "
        "text of a CIFAR-10 batch"
    )


class _Dtype:
    """A numpy dtype as a batch file describes it: a plain integer type, nothing else."""

    def __init__(self, code: object, align: object = False, copy: object = False) -> None:
        name = _text(code)
        if name not in _INTEGER_CODES:
            kind = _DTYPE_KINDS.get((name or "?")[:1].lstrip("<>|="), "not a number")
            raise _Refused(
                f"holds a numpy array of dtype {code!r} ({kind}), not the uint8 images and "
                "integer labels of a CIFAR-10 batch"
            )
        self.dtype = np.dtype(name)

    def __setstate__(self, state: object) -> None:
        if not (isinstance(state, tuple) and len(state) == 8 and state[0] == 3
                and state[2:] == _PLAIN_DTYPE_STATE):
            raise _Refused("holds a numpy dtype with fields, sub-arrays or flags")
        order = _text(state[1])
        if order == "<":
            self.dtype = self.dtype.newbyteorder("<")
        elif order == ">":
            self.dtype = self.dtype.newbyteorder(">")
        elif order != "|":
            raise _Refused(f"holds a numpy dtype of byte order {state[1]!r}")


class _Array:
    """An ndarray as a batch file describes it; ``array`` is set once its state checks out."""

    array: npt.NDArray[Any] | None = None

    def __setstate__(self, state: object) -> None:
        if not isinstance(state, tuple) or len(state) not in (4, 5) or self.array is not None:
            raise _Refused("holds an ndarray state that numpy does not write")
        shape, dtype, fortran, raw = state[-4:]
        ok_shape = isinstance(shape, tuple) and len(shape) <= 4 and all(
            isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in shape
        )
        if not (ok_shape and isinstance(dtype, _Dtype) and isinstance(fortran, bool)):
            raise _Refused("holds an ndarray that is not a plain integer array")
        if not isinstance(raw, bytes) or len(raw) != math.prod(shape) * dtype.dtype.itemsize:
            raise _Refused("holds an ndarray whose bytes do not match its shape")
        flat = np.frombuffer(raw, dtype=dtype.dtype)
        self.array = flat.reshape(shape, order="F" if fortran else "C")


def _reconstruct(subtype: object, shape: object, typecode: object) -> _Array:
    """``numpy.core.multiarray._reconstruct(ndarray, (0,), b"b")``, the start of every array."""
    if subtype is not _NDARRAY or shape != (0,) or _text(typecode) != "b":
        raise _Refused("asks numpy's _reconstruct for something other than a plain ndarray")
    return _Array()


_ADMITTED = {
    ("_codecs", "encode"): _Admitted(_latin1),
    ("numpy", "ndarray"): _NDARRAY,
    ("numpy", "dtype"): _Admitted(_Dtype),
    ("numpy.core.multiarray", "_reconstruct"): _Admitted(_reconstruct),
    ("numpy._core.multiarray", "_reconstruct"): _Admitted(_reconstruct),
}


def _python3_name(module: str, name: str) -> str:
    """``module.name`` as Python 3 calls it (protocol 2 writes builtins as __builtin__)."""
    written = f"{module}.{name}"
    if (module, name) in _compat_pickle.NAME_MAPPING:
        module, name = _compat_pickle.NAME_MAPPING[(module, name)]
    modern = f"{_compat_pickle.IMPORT_MAPPING.get(module, module)}.{name}"
    return modern if modern == written else f"{modern} (written {written})"


class _BatchUnpickler(pickle.Unpickler):
    """Unpickles a CIFAR-10 batch: dicts, lists, ints, bytes and plain integer arrays only."""

    def find_class(self, module: str, name: str) -> Any:
        admitted = _ADMITTED.get((module, name))
        if admitted is None:
            raise _Refused(f"refers to {_python3_name(module, name)}, which no CIFAR-10 batch does")
        return admitted


def _unpickle(path: Path, raw: bytes, data_fix: str) -> object:
    try:
        return _BatchUnpickler(io.BytesIO(raw), encoding="bytes").load()
    except _Refused as refused:
        raise ConfigError(
            f"CIFAR-10 batch file {path} {refused.what}; it was refused before anything in it "
            "ran.",
            fix=f"replace the file with a genuine copy (and pin it with data_sha256); {data_fix}",
        ) from None
    except Exception as exc:  # noqa: BLE001 - any other failure: a truncated or corrupt file
        raise ConfigError(
            f"CIFAR-10 batch file {path} is corrupt or not in the python format "
            f"({type(exc).__name__}: {exc}).",
            fix=f"re-extract the file; {data_fix}",
        ) from None


def _described(value: object) -> str:
    if isinstance(value, np.ndarray):
        return f"a {value.dtype} array of shape {value.shape}"
    if isinstance(value, _Array):
        return "an incomplete array"
    return f"a {type(value).__name__}"


def parse_batch(path: Path, raw: bytes, data_fix: str) -> tuple[Images, Labels]:
    """The images and labels of the batch file ``path`` whose bytes are ``raw``, or a
    ConfigError saying what is wrong (``data_fix``: how to point the lab at good data)."""
    refix = f"re-extract the file; {data_fix}"
    entry = _unpickle(path, raw, data_fix)
    if not isinstance(entry, dict):
        raise ConfigError(
            f"CIFAR-10 batch file {path} holds {_described(entry)}, not a mapping with "
            "b'data' and b'labels'.",
            fix=refix,
        )
    values = {k: v.array if isinstance(v, _Array) else v for k, v in entry.items()}
    for key in (b"data", b"labels"):
        if key not in values:
            text_keys = " (its keys are text, not bytes)" if key.decode() in values else ""
            raise ConfigError(
                f"CIFAR-10 batch file {path} has no {key!r} entry{text_keys}.", fix=refix
            )
    data, labels = values[b"data"], values[b"labels"]
    if not (isinstance(data, np.ndarray) and data.dtype == np.uint8 and data.ndim == 2):
        raise ConfigError(
            f"CIFAR-10 batch file {path} holds {_described(data)} as b'data'; expected a "
            "(N, 3072) uint8 array.",
            fix=refix,
        )
    integer_list = isinstance(labels, list) and all(
        isinstance(y, int) and not isinstance(y, bool) for y in labels
    )
    integer_array = (
        isinstance(labels, np.ndarray) and labels.ndim == 1 and labels.dtype.kind in "iu"
    )
    if not (integer_list or integer_array):
        raise ConfigError(
            f"CIFAR-10 batch file {path} holds {_described(labels)} as b'labels'; expected a "
            "list of integer labels 0..9.",
            fix=refix,
        )
    y = np.array(labels, dtype=np.int64)
    if data.shape[1] != 3 * IMAGE_SIZE * IMAGE_SIZE or len(data) != len(y):
        raise ConfigError(
            f"CIFAR-10 batch file {path} holds data of shape {data.shape} with {len(y)} "
            "labels; expected (N, 3072) uint8 and N labels.",
            fix=refix,
        )
    if len(y) and (y.min() < 0 or y.max() >= NUM_CLASSES):
        raise ConfigError(f"CIFAR-10 batch file {path} has labels outside 0..9.", fix=refix)
    # Rows are channel-major (R plane, G plane, B plane); the model takes NHWC.
    images = data.reshape(-1, 3, IMAGE_SIZE, IMAGE_SIZE).transpose(0, 2, 3, 1)
    return np.ascontiguousarray(images), y
