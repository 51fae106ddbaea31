"""The parameter table of :class:`~hfl_lab.config.LabConfig`: every parameter's type, default,
one-line doc and allowed values, and the profiles that override the defaults.

This is the one place to add or change a parameter; :mod:`hfl_lab.config.lab_config` validates
the values and combinations, and ``hfl-lab --help``, the YAML files and the error messages read
their text from here.
"""

from __future__ import annotations

import dataclasses
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

_REPO = Path(__file__).resolve().parents[2]
#: ResNet-v1 CIFAR depths listed in messages; any 6n+2 in [8, 110] is accepted
DEPTHS = (8, 14, 20, 32, 44, 56, 110)
#: the TF reference resnet_cifar schedule: decay x0.1 at these epochs
REFERENCE_BOUNDARY_EPOCHS = (91, 136, 182)
REFERENCE_DECAY_RATES = (1.0, 0.1, 0.01, 0.001)
#: steps of a run that sets neither steps nor epochs
DEFAULT_STEPS = 60
#: the CIFAR-10 batch files the loader reads (trainer.data), which data_sha256 pins
CIFAR10_BATCH_FILES = (*(f"data_batch_{i}" for i in range(1, 6)), "test_batch")


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
class LabParameters:
    """The declared parameters of a lab run, unchecked; :class:`~hfl_lab.config.LabConfig` (a
    subclass) validates them, so construct that."""

    profile_name: str = _param(
        "quick", "profile the other defaults came from", choices=("quick", "full")
    )
    # -- where it runs
    backend: str = _param(
        "local", "where the TDs run: processes here, or pods", choices=("local", "kubernetes")
    )
    workers: int = _param(2, "number of worker TDs", ge=1, le=64)
    threads: int = _param(
        1, "CPU threads per participant's TensorFlow (0 = TensorFlow default)", ge=0
    )
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
    quorum_rule: str = _param(
        "fixed", "sync/fedavg: K of the N workers per update ('fixed'), or of the workers live "
        "now, K capped at their number ('live': one that leaves never stalls the run, one that "
        "joins late counts from its registration; what a hosted run uses)",
        choices=("fixed", "live"),
    )
    min_live_workers: int = _param(
        1, "quorum_rule 'live': no step completes while fewer workers are live (a workshop "
        "that waits for its attendees, and holds when too many left); 1 never holds", ge=1,
    )
    max_staleness: int | None = _param(
        None, "async: oldest accepted gradient, in versions; default the worker count", ge=0
    )
    local_steps: int = _param(1, "fedavg: local steps E per round", ge=1, le=10000)
    aggregation_rule: str = _param(
        "mean", "sync/fedavg: combine the K updates by their mean, or robustly per coordinate "
        "(one bad worker of K >= 3 cannot drag the median out of the others' range)",
        choices=("mean", "median", "trimmed_mean"),
    )
    trim_fraction: float = _param(
        0.2, "trimmed_mean: share of the K values dropped at each end, rounded up", gt=0, lt=0.5
    )
    # Measured per-worker gradient norms: quick profile (ResNet-8, batch 32) 1.3-2.3, batch 1-8
    # up to 7.6, ResNet-56 batch 128 up to 24 in its first steps; 100 clips none of them.
    max_update_norm: float = _param(
        100.0, "scale each worker's update down to this L2 norm: its gradient, or in fedavg its "
        "change, bounded by what E local steps of such gradients can do (0 = no bound)", ge=0
    )
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
    jit_compile: bool = _param(
        False, "compile each training step with XLA (off: slower on CPUs here, see bench P0)"
    )
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
    data_sha256: tuple[str, ...] | None = _param(
        None, "pinned SHA-256 of every batch file, file=hex each (trainer.data.dataset_digests "
        "writes them); the loader refuses a file that differs; default no pins"
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
    vault_kdf_iterations: int | None = _param(
        None, "PBKDF2 count of the volume's key slot (local backend, notebook 02); default: "
        "calibrated by cryptsetup to 500 ms. The passphrase is 32 random bytes, so the tests "
        "use the LUKS minimum", ge=1000,
    )
    workload_image: str = _param(
        "auto",
        "local: ps0 and the workers pull the encrypted, signed workload image (key by attested "
        "release) and run it; auto: when skopeo, umoci, docker-registry and gnupg are installed "
        "(make system-deps). kubernetes, encrypted+signed overlay: start() builds, encrypts, "
        "pushes and signs the image first (auto: where buildah or docker can build)",
        choices=("off", "auto", "on"),
    )
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
PARAMETER_NAMES: tuple[str, ...] = tuple(f.name for f in dataclasses.fields(LabParameters))
ACCEPTED_NAMES = frozenset(PARAMETER_NAMES)
