"""Writing the run folder's records: JSON-safe values and atomic replacement of files."""

from __future__ import annotations

import json
import math
import numbers
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from hfl_lab.events import LabEvent


def jsonable(value: Any) -> Any:
    """``value`` with numpy scalars/arrays, bytes and tuples made JSON values; NaN/inf → None."""
    if value is None or isinstance(value, (bool, str)):
        return value
    if isinstance(value, numbers.Integral):
        return int(value)
    if isinstance(value, numbers.Real):
        number = float(value)
        return number if math.isfinite(number) else None
    if isinstance(value, (bytes, bytearray)):
        return bytes(value).hex()
    if isinstance(value, Mapping):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set, frozenset)):
        return [jsonable(v) for v in value]
    tolist = getattr(value, "tolist", None)  # numpy arrays
    if callable(tolist):
        return jsonable(tolist())
    return str(value)


def event_line(event: LabEvent) -> str:
    """One events.jsonl line; ``LabEvent.from_json`` reads it back."""
    record = {
        "kind": event.kind,
        "source": event.source,
        "time": jsonable(event.time),
        "data": jsonable(event.data),
    }
    return json.dumps(record, allow_nan=False)


def write_text_atomic(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file, so readers see old or new only."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(path)


def write_json_atomic(path: Path, value: Any) -> None:
    write_text_atomic(path, json.dumps(jsonable(value), indent=2, allow_nan=False) + "\n")
