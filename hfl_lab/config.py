"""LabConfig: the one typed, validated parameter set of notebooks, CLI and YAML files.

Papermill does not validate parameters, so this module does. Every value is checked on
construction (also by :meth:`LabConfig.replace`); a bad one raises :class:`ConfigError` naming the
parameter, what was expected and what was given.

Typing rule: the constructor takes Python values of the declared type and never parses strings.
An ``int`` is accepted where a ``float`` is expected, a list where a tuple is, a ``Path`` where a
path string is; ``"4"`` for ``workers`` is an error (it may be a quoting mistake or a value meant
for another parameter). Text is parsed only where it is text by nature: ``-p name=value`` pairs
(:meth:`LabConfig.from_cli`, YAML scalar rules, raw text for string parameters) and YAML files.
"""

from __future__ import annotations

import dataclasses
import difflib
import itertools
import math
import os
import re
import time
import types
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple, Union, get_args, get_origin, get_type_hints

import yaml

from hfl_lab._exceptions import ConfigError

__all__ = [
    "PARAMETER_NAMES",
    "PROFILES",
    "LabConfig",
    "LearningRateSchedule",
    "Parameter",
    "default_data_path",
    "validate_notebook_parameters",
]

_REPO = Path(__file__).resolve().parents[1]
#: ResNet-v1 CIFAR depths listed in messages; any 6n+2 in [8, 110] is accepted
DEPTHS = (8, 14, 20, 32, 44, 56, 110)
#: the TF reference resnet_cifar schedule: decay x0.1 at these epochs
REFERENCE_BOUNDARY_EPOCHS = (91, 136, 182)
REFERENCE_DECAY_RATES = (1.0, 0.1, 0.01, 0.001)
_DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$")
_PROFILE_ALIAS = "profile"


def default_data_path() -> str:
    """``../shared/data/cifar-10-subset`` beside the repo (or under $HFL_LAB_SHARED), else ""."""
    shared = os.environ.get("HFL_LAB_SHARED")
    base = Path(shared) if shared else _REPO.parent / "shared"
    candidate = base / "data" / "cifar-10-subset"
    return str(candidate) if candidate.is_dir() else ""


def _default_run_dir() -> str:
    return f"runs/{time.strftime('%Y%m%d-%H%M%S')}"


def _param(
    default: Any = None,
    doc: str = "",
    *,
    choices: tuple[Any, ...] | None = None,
    ge: float | None = None,
    le: float | None = None,
    gt: float | None = None,
    lt: float | None = None,
    path: bool = False,
    factory: Any = None,
) -> Any:
    """A dataclass field carrying its one-line doc and its allowed values."""
    meta = {"doc": doc, "choices": choices, "ge": ge, "le": le, "gt": gt, "lt": lt, "path": path}
    if factory is not None:
        return field(default_factory=factory, metadata=meta)
    return field(default=default, metadata=meta)


class _ValidatingMeta(type):
    """Turns unknown or positional constructor arguments into a ConfigError (not a TypeError)."""

    def __call__(cls, *args: Any, **kwargs: Any) -> Any:
        if args:
            raise ConfigError(
                f"{cls.__name__} takes its parameters by name, got {len(args)} positional ones.",
                fix="write e.g. LabConfig(workers=2, depth=8).",
            )
        _check_names(kwargs)
        return super().__call__(**kwargs)


class LearningRateSchedule(NamedTuple):
    """Piecewise-constant learning rate; unpacks into ``PiecewiseConstantSchedule(*schedule)``."""

    boundaries: tuple[int, ...]
    values: tuple[float, ...]
    warmup_steps: int


@dataclass(frozen=True)
class Parameter:
    """One parameter as ``hfl-lab --help`` and error messages describe it."""

    name: str
    type: str
    default: Any
    doc: str
    allowed: str

    def help_line(self) -> str:
        allowed = f" [{self.allowed}]" if self.allowed else ""
        return f"{self.name} ({self.type}, default {self.default!r}): {self.doc}{allowed}"


@dataclass(frozen=True, kw_only=True)
class LabConfig(metaclass=_ValidatingMeta):
    """Every parameter of a lab run. Defaults are the ``quick`` profile (minutes on 2 cores)."""

    profile_name: str = _param(
        "quick", "profile the other defaults came from", choices=("quick", "full")
    )
    # -- where it runs
    backend: str = _param(
        "local", "where the TDs run: processes here, or pods", choices=("local", "kubernetes")
    )
    workers: int = _param(2, "number of worker TDs", ge=1, le=64)
    threads: int = _param(1, "CPU threads per participant's torch (0 = torch default)", ge=0)
    # -- model and training
    depth: int = _param(8, "ResNet-v1 depth, 6n+2 (56 is the reference)", choices=DEPTHS)
    batch_size: int = _param(32, "images per worker per local step", ge=1, le=4096)
    steps: int | None = _param(
        None, "total parameter-server steps (rounds for fedavg); exclusive with epochs", ge=1
    )
    epochs: float | None = _param(
        None, "passes over the training data; exclusive with steps", gt=0, le=10000
    )
    aggregation: str = _param(
        "sync", "how updates are combined", choices=("sync", "async", "fedavg")
    )
    sync_quorum: int | None = _param(
        None, "K of N: contributions per update (sync/fedavg); default all workers", ge=1
    )
    max_staleness: int | None = _param(
        None, "async: oldest accepted gradient, in versions; default the worker count", ge=0
    )
    local_steps: int = _param(1, "fedavg: local steps E per round", ge=1, le=10000)
    learning_rate: float | None = _param(
        None, "initial learning rate; default the reference 0.1 x update batch / 128", gt=0
    )
    lr_boundaries: tuple[int, ...] | None = _param(
        None, "steps where the rate changes; default the reference epochs 91/136/182"
    )
    lr_values: tuple[float, ...] | None = _param(
        None, "rates before the first boundary and after each boundary"
    )
    warmup_steps: int = _param(0, "steps of linear learning-rate warm-up", ge=0)
    weight_decay: float = _param(2e-4, "L2 weight decay (reference 2e-4)", ge=0, le=1)
    momentum: float = _param(0.9, "SGD momentum (reference 0.9)", ge=0, lt=1)
    bn_momentum: float = _param(
        0.9, "batch-norm moving-average momentum (reference 0.997; lower settles in short runs)",
        ge=0, lt=1,
    )
    augment: bool = _param(True, "random crop and flip of training images, as the reference")
    # -- data
    partition: str = _param(
        "iid", "how the training set is split over workers", choices=("iid", "dirichlet")
    )
    dirichlet_alpha: float = _param(
        0.5, "dirichlet partition: label skew (smaller = more skewed)", gt=0, le=1e6
    )
    seed: int = _param(0, "seed of partitions, initial weights and batches", ge=0, le=2**32 - 1)
    data_path: str = _param(
        doc="folder of the CIFAR-10 python version (holding cifar-10-batches-py)",
        path=True,
        factory=default_data_path,
    )
    # -- run bookkeeping
    eval_every: int = _param(20, "evaluate the global model every N steps (0 = at the end)", ge=0)
    checkpoint_every: int = _param(30, "checkpoint every N steps (0 = at the end)", ge=0)
    run_dir: str = _param(
        doc="folder for this run's plots, metrics and logs", path=True, factory=_default_run_dir
    )
    timeout_s: float = _param(1800.0, "wall-clock limit of the training run, seconds", gt=0)
    # -- wire
    wire_dtype: str = _param(
        "float32", "dtype of tensors on the wire", choices=("float32", "float16", "bfloat16")
    )
    chunk_bytes: int = _param(1 << 20, "bytes per streamed tensor chunk", ge=4096, le=4 << 20)
    # -- trust
    policy_path: str | None = _param(
        None, "attestation policy YAML; default the lab's baseline policy", path=True
    )
    allow_simulated: bool = _param(
        True, "accept simulated-TD evidence (the local backend needs it; never secure)"
    )
    reattest_every_s: float = _param(
        300.0, "re-attest each participant every N seconds (0 = never)", ge=0
    )
    cert_lifetime_s: float = _param(900.0, "lifetime of mesh certificates, seconds", gt=0)
    vault: bool = _param(True, "store checkpoints in the LUKS model vault")
    vault_size_mb: int = _param(64, "size of the LUKS volume file, MB", ge=8, le=1 << 20)
    # -- kubernetes backend
    kubeconfig: str | None = _param(
        None, "kubeconfig file; default $KUBECONFIG or ~/.kube/config", path=True
    )
    kube_context: str | None = _param(None, "kubeconfig context; default its current context")
    namespace: str = _param("hfl-lab", "Kubernetes namespace of the run")
    image: str = _param("hfl-lab:0.1.0", "container image of the participants")
    runtime_class: str = _param("kata-qemu-tdx", "RuntimeClass of the TD pods")
    k8s_overlay: str = _param(
        "kata-qemu-tdx",
        "kustomize overlay of k8s/",
        choices=("runc", "kata-qemu-tdx", "kata-qemu-tdx-encrypted-signed"),
    )

    # ------------------------------------------------------------------ validation

    def __post_init__(self) -> None:
        hints = _hints()
        for f in dataclasses.fields(self):
            value = _coerce(f.name, getattr(self, f.name), hints[f.name], f.metadata)
            _check_range(f.name, value, f.metadata)
            object.__setattr__(self, f.name, value)
        if self.steps is None and self.epochs is None:
            object.__setattr__(self, "steps", DEFAULT_STEPS)
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
            raise ConfigError(_choice_message("depth", self.depth, DEPTHS), fix=_DEPTH_FIX)
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

    # ------------------------------------------------------------------ construction

    @classmethod
    def profile(cls, name: str, **overrides: Any) -> LabConfig:
        """The named profile (``quick`` or ``full``) with ``overrides`` applied and validated."""
        if name not in PROFILES:
            raise ConfigError(
                _choice_message("profile", name, tuple(PROFILES)),
                fix="use 'quick' for a lab that finishes in minutes or 'full' for the reference.",
            )
        _check_names(overrides)
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
        base = _pop_profile(params)
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
            target = "profile_name" if name == _PROFILE_ALIAS else name
            _check_names({target: None})
            params[target] = _parse_text(target, text.strip(), hints[target])
        if base is None:
            return cls.from_dict(params)
        return base.replace(**params)

    def replace(self, **changes: Any) -> LabConfig:
        """A copy with ``changes`` applied and validated; setting steps clears epochs and back."""
        _check_names(changes)
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
                    _type_name(hints[f.name]),
                    default,
                    f.metadata["doc"],
                    _allowed(f.name, f.metadata),
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


DEFAULT_STEPS = 60
_DEPTH_FIX = "use one of 8, 14, 20, 32, 44, 56, 110 (any 6n+2 from 8 to 110; 56 is the reference)."
_DATA_FIX = (
    "set data_path to an extracted copy of the CIFAR-10 python version "
    "(cifar-10-python.tar.gz from https://www.cs.toronto.edu/~kriz/cifar.html): the folder "
    "holding cifar-10-batches-py, or that folder itself."
)

#: overrides of the defaults per profile (the defaults are the quick profile)
PROFILES: dict[str, dict[str, Any]] = {
    "quick": {},
    "full": {
        # TF official resnet_cifar: ResNet-56, batch 128, lr 0.1 x batch/128 decayed x0.1 at
        # epochs 91 and 136, 182 epochs (~64k steps of 128 images on the full 50k set).
        "depth": 56,
        "workers": 2,
        "bn_momentum": 0.997,
        "batch_size": 128,
        "epochs": 182,
        "threads": 0,
        "eval_every": 2000,
        "checkpoint_every": 5000,
        "timeout_s": 7 * 24 * 3600.0,
        "vault_size_mb": 256,
    },
}

#: every name a notebook parameters cell, a YAML file or ``-p`` may set
PARAMETER_NAMES: tuple[str, ...] = tuple(f.name for f in dataclasses.fields(LabConfig))
_ACCEPTED_NAMES = frozenset(PARAMETER_NAMES)


# ---------------------------------------------------------------------- notebooks


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
    allowed = _ACCEPTED_NAMES | {_PROFILE_ALIAS} | set(own)
    params: dict[str, Any] = {}
    for name, value in namespace.items():
        if name.startswith("_") or name in _IPYTHON_NAMES:
            continue
        if name in _ACCEPTED_NAMES or name == _PROFILE_ALIAS:
            params[name] = value
        elif strict and name not in allowed and isinstance(value, _PLAIN_TYPES):
            try:
                _check_names({name: value}, extra=own)
            except ConfigError as e:
                raise ConfigError(
                    e.message,
                    fix=f"{e.fix} If '{name}' is a variable of the notebook itself, list it in "
                    "extra=[...], or restart the kernel and run the notebook from the top.",
                ) from None
    return LabConfig.from_dict(params)


_PLAIN_TYPES = (bool, int, float, str, list, tuple, dict, type(None))
_IPYTHON_NAMES = frozenset({"In", "Out", "exit", "quit", "get_ipython"})


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


def _check_names(values: Mapping[str, Any], extra: tuple[str, ...] = ()) -> None:
    for name in values:
        if name in _ACCEPTED_NAMES:
            continue
        candidates = [*PARAMETER_NAMES, *extra]
        close = difflib.get_close_matches(name, candidates, n=1, cutoff=0.6)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        fix = f"use one of: {', '.join(candidates)}."
        if name == _PROFILE_ALIAS:
            hint = " here (it only picks the base profile)"
            fix = "use LabConfig.profile(name, ...) to start from a profile."
        raise ConfigError(f"unknown parameter '{name}'{hint}.", fix=fix)


def _pop_profile(params: dict[str, Any]) -> str:
    alias = params.pop(_PROFILE_ALIAS, None)
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


def _merge(base: Mapping[str, Any], changes: Mapping[str, Any]) -> dict[str, Any]:
    """``base`` updated by ``changes``; setting one of steps/epochs clears the other."""
    merged = {**base, **changes}
    for chosen, other in (("steps", "epochs"), ("epochs", "steps")):
        if changes.get(chosen) is not None and other not in changes:
            merged[other] = None
    return merged


def _type_name(hint: Any) -> str:
    args = [a for a in get_args(hint) if a is not type(None)]
    if isinstance(hint, types.UnionType) or get_origin(hint) is Union:
        return " | ".join([*(_type_name(a) for a in args), "None"])
    if get_origin(hint) is tuple:
        return f"list of {_type_name(args[0])}"
    return str(getattr(hint, "__name__", hint))


def _allowed(name: str, meta: Mapping[str, Any]) -> str:
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


def _coerce(name: str, value: Any, hint: Any, meta: Mapping[str, Any]) -> Any:
    """``value`` as the declared type (int→float, list→tuple, Path→str) or a ConfigError."""
    optional = type(None) in get_args(hint)
    if optional:
        if value is None:
            return None
        hint = next(a for a in get_args(hint) if a is not type(None))
    expected = _type_name(hint) + (" or None" if optional else "")
    if get_origin(hint) is tuple:
        item = get_args(hint)[0]
        if isinstance(value, (list, tuple)) and value:
            return tuple(_coerce(f"{name}[{i}]", v, item, {}) for i, v in enumerate(value))
        raise _type_error(name, f"non-empty list of {_type_name(item)}", value, meta)
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


def _choice_message(name: str, value: Any, choices: tuple[Any, ...]) -> str:
    listed = ", ".join(str(c) for c in choices)
    close = difflib.get_close_matches(str(value), [str(c) for c in choices], n=1, cutoff=0.6)
    hint = f" (did you mean {close[0]}?)" if close and isinstance(value, str) else ""
    return f"{name} must be one of {listed}, got {value!r}{hint}."


def _check_range(name: str, value: Any, meta: Mapping[str, Any]) -> None:
    if value is None:
        return
    choices = meta.get("choices")
    if choices is not None and name != "depth":
        if value not in choices:
            raise ConfigError(
                _choice_message(name, value, choices),
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
        allowed = _allowed(name, meta).replace(", ", " and ")
        raise ConfigError(
            f"{name} must be {allowed} ({meta['doc']}), got {value!r}.",
            fix=f"set {name} to a value {allowed}.",
        )


def _parse_text(name: str, text: str, hint: Any) -> Any:
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
