"""The check of a notebook's parameters cell, which papermill fills in without checking.

Papermill only warns about ``-p`` names the notebook does not declare and injects them as new
variables, so :func:`validate_notebook_parameters` reads the whole namespace: LabConfig names
become the config, and any other plain value is refused with the closest parameter name.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from hfl_lab._exceptions import ConfigError
from hfl_lab.config.checks import PROFILE_ALIAS, check_names
from hfl_lab.config.lab_config import LabConfig
from hfl_lab.config.parameters import ACCEPTED_NAMES


def validate_notebook_parameters(
    namespace: Mapping[str, Any], *, extra: Iterable[str] = (), strict: bool = True
) -> LabConfig:
    """The validated config of a notebook's parameters cell.

    The cell after the parameters cell reads ``config = validate_notebook_parameters(globals())``.
    ``profile`` (or ``profile_name``) picks the base profile; every other LabConfig name in the
    namespace overrides it. Papermill injects misspelt ``-p`` names as new variables with only a
    warning, so with ``strict`` every other public plain-value variable (number, string, bool,
    None, list, tuple, dict) that is neither a parameter nor listed in ``extra`` (the notebook's
    own parameters) is an error; modules, functions and objects are never parameters.
    """
    own = tuple(extra)
    allowed = ACCEPTED_NAMES | {PROFILE_ALIAS} | set(own)
    params: dict[str, Any] = {}
    for name, value in namespace.items():
        if name.startswith("_") or name in _IPYTHON_NAMES:
            continue
        if name in ACCEPTED_NAMES or name == PROFILE_ALIAS:
            params[name] = value
        elif strict and name not in allowed and isinstance(value, _PLAIN_TYPES):
            try:
                check_names({name: value}, extra=own)
            except ConfigError as e:
                raise ConfigError(
                    e.message,
                    fix=f"{e.fix} If '{name}' is a variable of the notebook itself, list it in "
                    "extra=[...], or restart the kernel and run the notebook from the top.",
                ) from None
    return LabConfig.from_dict(params)


_PLAIN_TYPES = (bool, int, float, str, list, tuple, dict, type(None))
_IPYTHON_NAMES = frozenset({"In", "Out", "exit", "quit", "get_ipython"})
