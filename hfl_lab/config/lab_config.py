"""LabConfig itself: a validated, frozen parameter set, and the ways to build and write one.

The fields are declared in :mod:`hfl_lab.config.parameters`; this module checks each value
(through :mod:`hfl_lab.config.checks`) and their combinations, builds configs from profiles, YAML
files, ``-p`` pairs and notebook namespaces, writes YAML and ``--help`` text, and derives the
values the trainer needs (quorum, learning-rate schedule, steps).
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import os
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple, get_type_hints

import yaml

from hfl_lab._exceptions import ConfigError
from hfl_lab.config.checks import (
    PROFILE_ALIAS,
    allowed_values,
    check_data_pins,
    check_names,
    check_range,
    choice_message,
    coerce,
    parse_text,
    pop_profile,
    type_name,
)
from hfl_lab.config.parameters import (
    DEFAULT_STEPS,
    DEPTHS,
    PROFILES,
    REFERENCE_BOUNDARY_EPOCHS,
    REFERENCE_DECAY_RATES,
    LabParameters,
    Parameter,
)

_DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$")


class _ValidatingMeta(type):
    """Turns unknown or positional constructor arguments into a ConfigError (not a TypeError)."""

    def __call__(cls, *args: Any, **kwargs: Any) -> Any:
        if args:
            raise ConfigError(
                f"{cls.__name__} takes its parameters by name, got {len(args)} positional ones.",
                fix="write e.g. LabConfig(workers=2, depth=8).",
            )
        check_names(kwargs)
        return super().__call__(**kwargs)


class LearningRateSchedule(NamedTuple):
    """Piecewise-constant learning rate; unpacks into ``PiecewiseConstantSchedule(*schedule)``."""

    boundaries: tuple[int, ...]
    values: tuple[float, ...]
    warmup_steps: int


@dataclass(frozen=True, kw_only=True)
class LabConfig(LabParameters, metaclass=_ValidatingMeta):
    """Every parameter of a lab run. Defaults are the ``quick`` profile (minutes on 2 cores)."""

    # ------------------------------------------------------------------ validation

    def __post_init__(self) -> None:
        hints = _hints()
        for f in dataclasses.fields(self):
            value = coerce(f.name, getattr(self, f.name), hints[f.name], f.metadata)
            check_range(f.name, value, f.metadata)
            object.__setattr__(self, f.name, value)
        if self.steps is None and self.epochs is None:
            object.__setattr__(self, "steps", DEFAULT_STEPS)
        if self.data_sha256 is not None:
            object.__setattr__(self, "data_sha256", check_data_pins(self.data_sha256))
        self._check_combinations()

    def _check_combinations(self) -> None:
        if self.steps is not None and self.epochs is not None:
            raise ConfigError(
                f"steps ({self.steps}) and epochs ({self.epochs}) are mutually exclusive.",
                fix="set only one of them (the other to None).",
            )
        if self.sync_quorum is not None and self.sync_quorum > self.workers:
            raise ConfigError(
                f"sync_quorum must be ≤ workers ({self.workers}), got {self.sync_quorum}.",
                fix=f"use a quorum from 1 to {self.workers}, or None for all workers.",
            )
        if self.min_live_workers > 1 and (self.quorum_rule != "live"
                                          or self.min_live_workers > self.workers):
            raise ConfigError(
                f"min_live_workers={self.min_live_workers} needs quorum_rule 'live' and at most "
                f"the {self.workers} workers (quorum_rule is {self.quorum_rule!r}).",
                fix="set quorum_rule: live (a hosted run does) and min_live_workers <= workers.",
            )
        self._check_robustness()
        if (self.lr_boundaries is None) != (self.lr_values is None):
            raise ConfigError(
                "lr_boundaries and lr_values must be given together.",
                fix="set both (one more value than boundaries) or neither for the reference.",
            )
        if self.lr_boundaries is not None and self.lr_values is not None:
            if len(self.lr_values) != len(self.lr_boundaries) + 1:
                raise ConfigError(
                    f"lr_values needs one more entry than lr_boundaries "
                    f"(got {len(self.lr_values)} values, {len(self.lr_boundaries)} boundaries).",
                    fix="give the rate before the first boundary and after each boundary.",
                )
            bounds = self.lr_boundaries
            if any(b < 1 for b in bounds) or any(b <= a for a, b in itertools.pairwise(bounds)):
                raise ConfigError(
                    f"lr_boundaries must be positive and strictly increasing, got {list(bounds)}.",
                    fix="sort the boundaries and remove duplicates.",
                )
            if any(v < 0 for v in self.lr_values):
                raise ConfigError(
                    f"lr_values must be ≥ 0, got {list(self.lr_values)}.",
                    fix="use non-negative learning rates.",
                )
        if 0 < self.cert_lifetime_s <= self.reattest_every_s:
            raise ConfigError(
                f"reattest_every_s ({self.reattest_every_s}) must be shorter than "
                f"cert_lifetime_s ({self.cert_lifetime_s}), or certificates expire first.",
                fix="re-attest more often or issue longer-lived certificates.",
            )
        if self.depth not in DEPTHS and not (8 <= self.depth <= 110 and self.depth % 6 == 2):
            raise ConfigError(choice_message("depth", self.depth, DEPTHS), fix=_DEPTH_FIX)
        for name in ("namespace", "runtime_class"):
            value = getattr(self, name)
            if not _DNS_LABEL.match(value):
                raise ConfigError(
                    f"{name} must be a Kubernetes name (lowercase letters, digits and '-', "
                    f"at most 63), got {value!r}.",
                    fix=f"use e.g. {_default_of(name)!r}.",
                )
        if not self.image.strip() or any(c.isspace() for c in self.image):
            raise ConfigError(
                f"image must be a container image reference, got {self.image!r}.",
                fix="use e.g. 'registry.example.com/hfl-lab:0.1.0'.",
            )

    def _check_robustness(self) -> None:
        rule = self.aggregation_rule
        if rule == "mean":
            return
        if self.aggregation == "async":
            raise ConfigError(
                f"aggregation_rule {rule!r} combines several updates per step, but async "
                "applies each gradient on its own.",
                fix="use aggregation sync or fedavg for a robust rule, or aggregation_rule "
                "'mean' (max_update_norm bounds async updates).",
            )
        if self.quorum < 3:
            raise ConfigError(
                f"aggregation_rule {rule!r} needs at least 3 updates per step to outvote one "
                f"bad worker; with K={self.quorum} it is the mean.",
                fix="use at least 3 workers (and sync_quorum ≥ 3), or aggregation_rule 'mean'.",
            )

    # ------------------------------------------------------------------ construction

    @classmethod
    def profile(cls, name: str, **overrides: Any) -> LabConfig:
        """The named profile (``quick`` or ``full``) with ``overrides`` applied and validated."""
        if name not in PROFILES:
            raise ConfigError(
                choice_message("profile", name, tuple(PROFILES)),
                fix="use 'quick' for a lab that finishes in minutes or 'full' for the reference.",
            )
        check_names(overrides)
        given = overrides.pop("profile_name", name)
        if given != name:
            raise ConfigError(
                f"profile_name {given!r} contradicts the profile {name!r} it is built from.",
                fix="leave profile_name out; LabConfig.profile sets it.",
            )
        merged = _merge(PROFILES[name], overrides)
        merged["profile_name"] = name
        config: LabConfig = cls(**merged)
        return config

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> LabConfig:
        """From a mapping such as a YAML file's; ``profile``/``profile_name`` picks the base."""
        params = dict(values)
        base = pop_profile(params)
        return cls.profile(base, **params)

    @classmethod
    def from_yaml(cls, path: str | os.PathLike[str]) -> LabConfig:
        """From a YAML file of ``name: value`` lines (see :meth:`to_yaml`)."""
        file = Path(path)
        try:
            text = file.read_text(encoding="utf-8")
        except OSError as e:
            raise ConfigError(
                f"cannot read the config file {file}: {e.strerror or e}.",
                fix="check the path (hfl-lab writes one with LabConfig.to_yaml).",
            ) from None
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as e:
            where = getattr(e, "problem_mark", None)
            line = f" at line {where.line + 1}" if where is not None else ""
            raise ConfigError(
                f"the config file {file} is not valid YAML{line}.",
                fix="write one 'name: value' per line; quote strings that contain ':' or '#'.",
            ) from None
        if data is None:
            data = {}
        if not isinstance(data, dict):
            raise ConfigError(
                f"the config file {file} must hold a mapping of name: value, "
                f"got a {type(data).__name__}.",
                fix="write one 'name: value' per line.",
            )
        return cls.from_dict(data)

    @classmethod
    def from_cli(cls, pairs: Iterable[str], base: LabConfig | None = None) -> LabConfig:
        """From ``-p name=value`` pairs over ``base`` (default: the profile named, or quick).

        Values of string parameters are taken as written; others are read as YAML scalars
        (``4``, ``0.1``, ``true``, ``null``, ``[1, 2]``).
        """
        hints = _hints()
        params: dict[str, Any] = {}
        for pair in pairs:
            name, sep, text = pair.partition("=")
            name = name.strip()
            if not sep or not name:
                raise ConfigError(
                    f"parameter {pair!r} is not of the form name=value.",
                    fix="write e.g. -p workers=4.",
                )
            target = "profile_name" if name == PROFILE_ALIAS else name
            check_names({target: None})
            params[target] = parse_text(target, text.strip(), hints[target])
        if base is None:
            return cls.from_dict(params)
        return base.replace(**params)

    def replace(self, **changes: Any) -> LabConfig:
        """A copy with ``changes`` applied and validated; setting steps clears epochs and back."""
        check_names(changes)
        merged = _merge(self.to_dict(), changes)
        config: LabConfig = type(self)(**merged)
        return config

    # ------------------------------------------------------------------ output

    def to_dict(self) -> dict[str, Any]:
        """Plain values (tuples as lists), in declaration order; ``from_dict`` reads it back."""
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            out[f.name] = list(value) if isinstance(value, tuple) else value
        return out

    def to_yaml(self, path: str | os.PathLike[str] | None = None) -> str:
        """YAML text with each parameter's doc as a comment; also written to ``path`` if given."""
        lines = ["# HFL-TDX Lab configuration (LabConfig); load with LabConfig.from_yaml"]
        for name, value in self.to_dict().items():
            lines.append(f"# {_field(name).metadata['doc']}")
            dumped = yaml.safe_dump({name: value}, default_flow_style=True, sort_keys=False)
            lines.append(dumped.strip().removeprefix("{").removesuffix("}"))
        text = "\n".join(lines) + "\n"
        if path is not None:
            Path(path).write_text(text, encoding="utf-8")
        return text

    @classmethod
    def parameters(cls) -> list[Parameter]:
        """Every parameter with type, default, doc and allowed values (for ``--help``)."""
        hints = _hints()
        out = []
        for f in dataclasses.fields(cls):
            default = f.default if f.default is not dataclasses.MISSING else "<computed>"
            out.append(
                Parameter(
                    f.name,
                    type_name(hints[f.name]),
                    default,
                    f.metadata["doc"],
                    allowed_values(f.name, f.metadata),
                )
            )
        return out

    @classmethod
    def help_text(cls) -> str:
        """One line per parameter, as ``hfl-lab --help`` prints them."""
        return "\n".join(p.help_line() for p in cls.parameters())

    # ------------------------------------------------------------------ derived values

    @property
    def quorum(self) -> int:
        """Contributions per update: ``sync_quorum`` or all workers (async: 1)."""
        if self.aggregation == "async":
            return 1
        return self.sync_quorum if self.sync_quorum is not None else self.workers

    @property
    def staleness_bound(self) -> int:
        """Async staleness bound: ``max_staleness`` or the worker count."""
        return self.max_staleness if self.max_staleness is not None else self.workers

    @property
    def update_batch_size(self) -> int:
        """Images behind one optimizer step: K x batch (sync), one batch (async, fedavg local)."""
        return self.batch_size * (self.quorum if self.aggregation == "sync" else 1)

    @property
    def samples_per_step(self) -> int:
        """Training images consumed by one parameter-server step (one round for fedavg)."""
        local = self.local_steps if self.aggregation == "fedavg" else 1
        return self.batch_size * self.quorum * local

    @property
    def initial_learning_rate(self) -> float:
        """``learning_rate`` or the reference 0.1 x update batch / 128."""
        if self.learning_rate is not None:
            return self.learning_rate
        return 0.1 * self.update_batch_size / 128

    def steps_per_epoch(self, num_train_samples: int) -> int:
        """Parameter-server steps per pass over ``num_train_samples`` images (at least 1)."""
        if num_train_samples < 1:
            raise ConfigError(
                f"the training set has {num_train_samples} images.",
                fix="point data_path at a CIFAR-10 copy with training batches.",
            )
        return max(1, num_train_samples // self.samples_per_step)

    def total_steps(self, num_train_samples: int) -> int:
        """``steps``, or ``epochs`` converted to steps for a training set of this size."""
        if self.steps is not None:
            return self.steps
        assert self.epochs is not None  # __post_init__ guarantees one of them
        return max(1, math.ceil(self.epochs * self.steps_per_epoch(num_train_samples)))

    def lr_schedule(self, num_train_samples: int) -> LearningRateSchedule:
        """The learning-rate schedule: explicit boundaries/values, or the reference one."""
        if self.lr_boundaries is not None and self.lr_values is not None:
            return LearningRateSchedule(self.lr_boundaries, self.lr_values, self.warmup_steps)
        per_epoch = self.steps_per_epoch(num_train_samples)
        return LearningRateSchedule(
            tuple(per_epoch * e for e in REFERENCE_BOUNDARY_EPOCHS),
            tuple(self.initial_learning_rate * r for r in REFERENCE_DECAY_RATES),
            self.warmup_steps,
        )

    def require_data_path(self) -> Path:
        """``data_path`` as a Path, or a ConfigError saying how to point it at CIFAR-10."""
        if not self.data_path:
            raise ConfigError(
                "data_path is not set and no ../shared/data/cifar-10-subset exists beside the "
                "repository.",
                fix=_DATA_FIX,
            )
        path = Path(self.data_path).expanduser()
        if not path.is_dir():
            raise ConfigError(f"data_path {path} is not a folder.", fix=_DATA_FIX)
        return path

    def describe(self) -> str:
        """A short human line: what this run will do."""
        amount = f"{self.steps} steps" if self.steps is not None else f"{self.epochs:g} epochs"
        sim = ", simulated TDs allowed (not a hardware guarantee)" if self.allow_simulated else ""
        return (
            f"{self.profile_name}: ResNet-{self.depth}, {self.workers} workers ({self.aggregation}"
            f", K={self.quorum}), batch {self.batch_size}, {amount}, lr "
            f"{self.initial_learning_rate:g}, {self.partition} data, backend {self.backend}{sim}"
        )


_DEPTH_FIX = "use one of 8, 14, 20, 32, 44, 56, 110 (any 6n+2 from 8 to 110; 56 is the reference)."
_DATA_FIX = (
    "set data_path to an extracted copy of the CIFAR-10 python version "
    "(cifar-10-python.tar.gz from https://www.cs.toronto.edu/~kriz/cifar.html): the folder "
    "holding cifar-10-batches-py, or that folder itself."
)


# ---------------------------------------------------------------------- helpers


def _hints() -> dict[str, Any]:
    global _HINTS
    if _HINTS is None:
        _HINTS = get_type_hints(LabConfig)
    return _HINTS


_HINTS: dict[str, Any] | None = None


def _field(name: str) -> dataclasses.Field[Any]:
    for f in dataclasses.fields(LabConfig):
        if f.name == name:
            return f
    raise KeyError(name)


def _default_of(name: str) -> Any:
    return _field(name).default


def _merge(base: Mapping[str, Any], changes: Mapping[str, Any]) -> dict[str, Any]:
    """``base`` updated by ``changes``; setting one of steps/epochs clears the other."""
    merged = {**base, **changes}
    for chosen, other in (("steps", "epochs"), ("epochs", "steps")):
        if changes.get(chosen) is not None and other not in changes:
            merged[other] = None
    return merged
