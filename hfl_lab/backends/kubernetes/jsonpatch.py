"""JSON Patch (RFC 6902) on plain dicts and lists, as kustomize applies it to manifests."""

from __future__ import annotations

import copy
from typing import Any

from hfl_lab._exceptions import ConfigError


def _tokens(pointer: str) -> list[str]:
    # RFC 6901 §3/§4: "/"-separated, "~1" is "/", "~0" is "~" (in that order)
    if pointer == "":
        return []
    if not pointer.startswith("/"):
        raise ConfigError(f"JSON pointer {pointer!r} must start with '/'.")
    return [t.replace("~1", "/").replace("~0", "~") for t in pointer[1:].split("/")]


def _index(container: list[Any], part: str, pointer: str, *, allow_end: bool) -> int:
    if part == "-" and allow_end:
        return len(container)
    if not part.isdigit() or (len(part) > 1 and part.startswith("0")):
        raise ConfigError(f"JSON pointer {pointer!r}: {part!r} is not an array index.")
    index = int(part)
    if index > len(container) or (index == len(container) and not allow_end):
        raise ConfigError(f"JSON pointer {pointer!r}: index {index} is out of range.")
    return index


def _parent(doc: Any, pointer: str) -> tuple[Any, str]:
    parts = _tokens(pointer)
    if not parts:
        raise ConfigError("a JSON patch may not replace the whole document here.")
    node = doc
    for part in parts[:-1]:
        node = _child(node, part, pointer)
    return node, parts[-1]


def _child(node: Any, part: str, pointer: str) -> Any:
    if isinstance(node, dict):
        if part not in node:
            raise ConfigError(f"JSON pointer {pointer!r}: no member {part!r}.")
        return node[part]
    if isinstance(node, list):
        return node[_index(node, part, pointer, allow_end=False)]
    raise ConfigError(f"JSON pointer {pointer!r} goes through a scalar.")


def get(doc: Any, pointer: str) -> Any:
    node = doc
    for part in _tokens(pointer):
        node = _child(node, part, pointer)
    return node


def _add(doc: Any, pointer: str, value: Any) -> None:
    parent, part = _parent(doc, pointer)
    if isinstance(parent, dict):
        parent[part] = value
    elif isinstance(parent, list):
        parent.insert(_index(parent, part, pointer, allow_end=True), value)
    else:
        raise ConfigError(f"JSON pointer {pointer!r} goes through a scalar.")


def _remove(doc: Any, pointer: str) -> Any:
    parent, part = _parent(doc, pointer)
    if isinstance(parent, dict):
        if part not in parent:
            raise ConfigError(f"JSON patch remove: {pointer!r} does not exist.")
        return parent.pop(part)
    if isinstance(parent, list):
        return parent.pop(_index(parent, part, pointer, allow_end=False))
    raise ConfigError(f"JSON pointer {pointer!r} goes through a scalar.")


def apply_patch(doc: dict[str, Any], operations: list[Any]) -> dict[str, Any]:
    """``doc`` with ``operations`` applied (a new object); ``ConfigError`` if one fails."""
    out = copy.deepcopy(doc)
    for op in operations:
        if not isinstance(op, dict) or "op" not in op or "path" not in op:
            raise ConfigError(f"JSON patch operation {op!r} needs 'op' and 'path'.")
        kind, path = op["op"], str(op["path"])
        if kind == "add":
            _add(out, path, copy.deepcopy(op["value"]))
        elif kind == "remove":
            _remove(out, path)
        elif kind == "replace":
            get(out, path)  # must exist (RFC 6902 §4.3)
            _remove(out, path)
            _add(out, path, copy.deepcopy(op["value"]))
        elif kind == "test":
            if get(out, path) != op["value"]:
                raise ConfigError(
                    f"JSON patch test failed at {path}: expected {op['value']!r}, "
                    f"found {get(out, path)!r}; the base changed, update the overlay."
                )
        elif kind in ("move", "copy"):
            value = get(out, str(op["from"]))
            if kind == "move":
                _remove(out, str(op["from"]))
            _add(out, path, copy.deepcopy(value))
        else:
            raise ConfigError(f"JSON patch operation {kind!r} is unknown.")
    return out
