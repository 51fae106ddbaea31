"""Checks of single parameter names and values, with the messages that say how to fix them.

:class:`~hfl_lab.config.LabConfig` runs every value through :func:`coerce` (the declared type,
never parsing strings) and :func:`check_range` (choices and bounds from the parameter table);
:func:`parse_text` reads the text of ``-p name=value`` pairs, and :func:`check_names` refuses
unknown names, suggesting the closest one.
"""

from __future__ import annotations

import difflib
import math
import os
import re
import types
from collections.abc import Mapping
from typing import Any, Union, get_args, get_origin

import yaml

from hfl_lab._exceptions import ConfigError
from hfl_lab.config.parameters import ACCEPTED_NAMES, CIFAR10_BATCH_FILES, PARAMETER_NAMES

#: the name that picks the base profile (in YAML files, ``-p`` and notebooks), not a parameter
PROFILE_ALIAS = "profile"


def check_names(values: Mapping[str, Any], extra: tuple[str, ...] = ()) -> None:
    """A ConfigError for the first name in ``values`` that is no parameter (nor in ``extra``)."""
    for name in values:
        if name in ACCEPTED_NAMES:
            continue
        candidates = [*PARAMETER_NAMES, *extra]
        close = difflib.get_close_matches(name, candidates, n=1, cutoff=0.6)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        fix = f"use one of: {', '.join(candidates)}."
        if name == PROFILE_ALIAS:
            hint = " here (it only picks the base profile)"
            fix = "use LabConfig.profile(name, ...) to start from a profile."
        raise ConfigError(f"unknown parameter '{name}'{hint}.", fix=fix)


def pop_profile(params: dict[str, Any]) -> str:
    """The base profile that ``profile`` or ``profile_name`` names (removed from ``params``)."""
    alias = params.pop(PROFILE_ALIAS, None)
    label = params.pop("profile_name", None)
    if alias is not None and label is not None and alias != label:
        raise ConfigError(
            f"profile ({alias!r}) and profile_name ({label!r}) disagree.",
            fix="give only one of them.",
        )
    base = alias if alias is not None else label if label is not None else "quick"
    if not isinstance(base, str):
        raise ConfigError(
            f"profile must be a string, got the {type(base).__name__} {base!r}.",
            fix="use 'quick' or 'full'.",
        )
    return base


def type_name(hint: Any) -> str:
    """A type hint as messages and ``--help`` write it: ``int | None``, ``list of float``."""
    args = [a for a in get_args(hint) if a is not type(None)]
    if isinstance(hint, types.UnionType) or get_origin(hint) is Union:
        return " | ".join([*(type_name(a) for a in args), "None"])
    if get_origin(hint) is tuple:
        return f"list of {type_name(args[0])}"
    return str(getattr(hint, "__name__", hint))


def allowed_values(name: str, meta: Mapping[str, Any]) -> str:
    """A field's choices or bounds as text (``sync | async``, ``≥ 1, ≤ 64``); "" if none."""
    if name == "depth":
        return "6n+2: 8, 14, 20, 32, 44, 56, 110"
    if meta.get("choices"):
        return " | ".join(str(c) for c in meta["choices"])
    parts = []
    for key, sign in (("ge", "≥"), ("gt", ">"), ("le", "≤"), ("lt", "<")):
        if meta.get(key) is not None:
            parts.append(f"{sign} {_number(meta[key])}")
    return ", ".join(parts)


def _number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else f"{value:g}"


def _described(value: Any) -> str:
    if isinstance(value, str):
        return f"the string {value!r}"
    return f"the {type(value).__name__} {value!r}"


def coerce(name: str, value: Any, hint: Any, meta: Mapping[str, Any]) -> Any:
    """``value`` as the declared type (int→float, list→tuple, Path→str) or a ConfigError."""
    optional = type(None) in get_args(hint)
    if optional:
        if value is None:
            return None
        hint = next(a for a in get_args(hint) if a is not type(None))
    expected = type_name(hint) + (" or None" if optional else "")
    if get_origin(hint) is tuple:
        item = get_args(hint)[0]
        if isinstance(value, (list, tuple)) and value:
            return tuple(coerce(f"{name}[{i}]", v, item, {}) for i, v in enumerate(value))
        raise _type_error(name, f"non-empty list of {type_name(item)}", value, meta)
    if hint is bool:
        if isinstance(value, bool):
            return value
    elif hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return int(value)
    elif hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            if not math.isfinite(value):
                raise ConfigError(
                    f"{name} must be a finite number, got {value!r}.", fix="use a finite value."
                )
            return float(value)
    elif hint is str:
        if isinstance(value, str):
            return value
        if meta.get("path") and isinstance(value, os.PathLike):
            return os.fspath(value)
    raise _type_error(name, expected, value, meta)


def _type_error(name: str, expected: str, value: Any, meta: Mapping[str, Any]) -> ConfigError:
    if isinstance(value, str):
        fix = (
            f"write the value without quotes (e.g. {name}={value}); -p name=value on the CLI "
            "and YAML files parse numbers and booleans for you."
        )
    elif meta.get("choices"):
        fix = f"use one of {', '.join(str(c) for c in meta['choices'])}."
    elif "str" in expected:
        fix = "put the value in quotes."
    else:
        fix = f"{name}: {meta.get('doc', '')}."
    article = "an" if expected[:1] in "aeiou" else "a"
    return ConfigError(f"{name} must be {article} {expected}, got {_described(value)}.", fix=fix)


def choice_message(name: str, value: Any, choices: tuple[Any, ...]) -> str:
    """``name must be one of ..., got ...``, with the closest choice to a misspelt string."""
    listed = ", ".join(str(c) for c in choices)
    close = difflib.get_close_matches(str(value), [str(c) for c in choices], n=1, cutoff=0.6)
    hint = f" (did you mean {close[0]}?)" if close and isinstance(value, str) else ""
    return f"{name} must be one of {listed}, got {value!r}{hint}."


def check_range(name: str, value: Any, meta: Mapping[str, Any]) -> None:
    """A ConfigError if ``value`` is not among the field's choices or outside its bounds."""
    if value is None:
        return
    choices = meta.get("choices")
    if choices is not None and name != "depth":
        if value not in choices:
            raise ConfigError(
                choice_message(name, value, choices),
                fix=f"set {name} ({meta['doc']}) to one of them.",
            )
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return
    bounds = {k: meta.get(k) for k in ("ge", "gt", "le", "lt")}
    bad = (
        (bounds["ge"] is not None and value < bounds["ge"])
        or (bounds["gt"] is not None and value <= bounds["gt"])
        or (bounds["le"] is not None and value > bounds["le"])
        or (bounds["lt"] is not None and value >= bounds["lt"])
    )
    if bad:
        allowed = allowed_values(name, meta).replace(", ", " and ")
        raise ConfigError(
            f"{name} must be {allowed} ({meta['doc']}), got {value!r}.",
            fix=f"set {name} to a value {allowed}.",
        )


def parse_text(name: str, text: str, hint: Any) -> Any:
    """A ``-p`` value: raw text for string parameters, a YAML scalar/list otherwise."""
    args = get_args(hint)
    optional = type(None) in args
    if text in ("", "null", "None", "~") and optional:
        return None
    if hint is str or (optional and str in args):
        return text
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError:
        raise ConfigError(
            f"the value {text!r} of {name} cannot be parsed.",
            fix=f"write e.g. {name}=4, {name}=0.1, {name}=true or {name}=[1, 2].",
        ) from None
    if value is None and not optional:
        raise ConfigError(f"{name} needs a value, got {text!r}.", fix=f"write e.g. {name}=4.")
    return value


_SHA256 = re.compile(r"^[0-9a-fA-F]{64}$")
_PIN_FIX = (
    "pin every batch file as file=sha256, e.g. data_sha256=trainer.data.dataset_digests("
    "data_path) in a notebook, or `sha256sum data_batch_* test_batch` for the YAML file."
)


def check_data_pins(pins: tuple[str, ...]) -> tuple[str, ...]:
    """``data_sha256`` checked whole: ``file=hex`` for every batch file, once each; returned
    in the loader's file order with lower-case hex, so that equal pins measure the same."""
    found: dict[str, str] = {}
    for entry in pins:
        name, sep, digest = entry.partition("=")
        name, digest = name.strip(), digest.strip()
        if not sep or not name:
            raise ConfigError(f"data_sha256 entry {entry!r} is not name=hex.", fix=_PIN_FIX)
        if name not in CIFAR10_BATCH_FILES:
            close = difflib.get_close_matches(name, CIFAR10_BATCH_FILES, n=1, cutoff=0.6)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            raise ConfigError(
                f"data_sha256 pins '{name}', which is not a CIFAR-10 batch file the lab "
                f"reads{hint}.",
                fix=f"pin {', '.join(CIFAR10_BATCH_FILES)}.",
            )
        if not _SHA256.match(digest):
            raise ConfigError(
                f"data_sha256 pins {name} to {digest!r}, which is not 64 hex digits (a SHA-256).",
                fix=_PIN_FIX,
            )
        if name in found:
            raise ConfigError(f"data_sha256 pins {name} twice.", fix="keep one pin per file.")
        found[name] = digest.lower()
    missing = [n for n in CIFAR10_BATCH_FILES if n not in found]
    if missing:
        raise ConfigError(
            f"data_sha256 pins {len(found)} of the {len(CIFAR10_BATCH_FILES)} batch files; "
            f"missing: {', '.join(missing)} (an unpinned file could be swapped unnoticed).",
            fix=_PIN_FIX,
        )
    return tuple(f"{name}={found[name]}" for name in CIFAR10_BATCH_FILES)
