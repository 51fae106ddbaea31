"""CIFAR-10 (python format) loading, per-worker partitions, augmentation and batch streams."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import numpy.typing as npt

from hfl_lab._exceptions import ConfigError
from hfl_lab.config.checks import check_data_pins
from trainer.cifar_pickle import IMAGE_SIZE, NUM_CLASSES, Images, Labels, parse_batch

__all__ = [
    "BATCHES_DIR",
    "BatchStream",
    "Cifar10",
    "augment",
    "dataset_digests",
    "dirichlet_partition",
    "iid_partition",
    "label_histograms",
    "load_cifar10",
    "partition",
    "standardize",
]

BATCHES_DIR = "cifar-10-batches-py"
TRAIN_FILES = tuple(f"data_batch_{i}" for i in range(1, 6))
TEST_FILE = "test_batch"
PAD = 4  # TF reference resnet_cifar: resize_image_with_crop_or_pad to 40x40, then random crop

FloatImages = npt.NDArray[np.float32]
Indices = npt.NDArray[np.int64]

_FIX = (
    "point data_path at an extracted download of the CIFAR-10 python version "
    "(cifar-10-python.tar.gz from https://www.cs.toronto.edu/~kriz/cifar.html), i.e. the folder "
    f"holding '{BATCHES_DIR}' or that folder itself."
)


@dataclass(frozen=True)
class Cifar10:
    """CIFAR-10 images as uint8 NHWC and labels as int64."""

    train_images: Images
    train_labels: Labels
    test_images: Images
    test_labels: Labels
    path: Path


def _batches_dir(data_path: str | Path) -> Path:
    root = Path(data_path).expanduser()
    for candidate in (root / BATCHES_DIR, root):
        if (candidate / TEST_FILE).is_file() or (candidate / TRAIN_FILES[0]).is_file():
            return candidate
    if not root.exists():
        raise ConfigError(f"CIFAR-10 data folder {root} does not exist.", fix=_FIX)
    raise ConfigError(
        f"no CIFAR-10 batch files ({TRAIN_FILES[0]}, {TEST_FILE}) found in {root} "
        f"or {root / BATCHES_DIR}.",
        fix=_FIX,
    )


def _file_bytes(path: Path) -> bytes:
    if not path.is_file():
        raise ConfigError(f"CIFAR-10 batch file {path} is missing.", fix=_FIX)
    try:
        return path.read_bytes()
    except OSError as e:
        raise ConfigError(
            f"cannot read the CIFAR-10 batch file {path}: {e.strerror or e}.", fix=_FIX
        ) from None


def _read_batch(path: Path, sha256: str | None = None) -> tuple[Images, Labels]:
    # One read: the bytes that are hashed are the bytes that are parsed, so the host cannot
    # swap the file between the check and the load.
    raw = _file_bytes(path)
    if sha256 is not None:
        actual = hashlib.sha256(raw).hexdigest()
        if actual != sha256:
            raise ConfigError(
                f"CIFAR-10 batch file {path} has SHA-256 {actual}, but data_sha256 pins "
                f"{sha256}; it was not loaded.",
                fix="restore the pinned copy of the file; if this copy is the one to train on, "
                "pin it again with trainer.data.dataset_digests(data_path).",
            )
    return parse_batch(path, raw, _FIX)


def dataset_digests(data_path: str | Path) -> tuple[str, ...]:
    """The ``data_sha256`` pins of a CIFAR-10 copy: ``file=sha256`` for each file the loader reads.

    ``LabConfig(data_sha256=dataset_digests(path))`` pins the copy at ``path``; the pins are
    part of the participant configuration, so MR_CONFIG_ID measures them.
    """
    folder = _batches_dir(data_path)
    return tuple(
        f"{name}={hashlib.sha256(_file_bytes(folder / name)).hexdigest()}"
        for name in (*TRAIN_FILES, TEST_FILE)
    )


def load_cifar10(data_path: str | Path, *, sha256: Sequence[str] | None = None) -> Cifar10:
    """Read the five training batches and the test batch; never downloads anything.

    Each file is unpickled with an allow-list that admits the CIFAR-10 structure only. With
    ``sha256`` (``LabConfig.data_sha256``: ``file=hex`` for every file), a file whose digest
    differs is refused before it is parsed.
    """
    if isinstance(sha256, str):
        raise ConfigError(
            "sha256 must be a list of file=hex pins, got one string.",
            fix="pass LabConfig.data_sha256 or trainer.data.dataset_digests(data_path).",
        )
    folder = _batches_dir(data_path)
    pins = dict(p.split("=", 1) for p in check_data_pins(tuple(sha256))) if sha256 else {}
    train = [_read_batch(folder / name, pins.get(name)) for name in TRAIN_FILES]
    test_images, test_labels = _read_batch(folder / TEST_FILE, pins.get(TEST_FILE))
    return Cifar10(
        train_images=np.concatenate([images for images, _ in train]),
        train_labels=np.concatenate([labels for _, labels in train]),
        test_images=test_images,
        test_labels=test_labels,
        path=folder,
    )


# --------------------------------------------------------------------------- preprocessing


def standardize(images: npt.ArrayLike) -> FloatImages:
    """Per-image standardization as tf.image.per_image_standardization (NHWC batch)."""
    x = np.asarray(images, dtype=np.float32)
    axes = (1, 2, 3)
    num_pixels = np.prod(x.shape[1:])
    mean = x.mean(axis=axes, keepdims=True)
    # TF's adjusted stddev keeps uniform images from dividing by zero.
    std = np.maximum(x.std(axis=axes, keepdims=True), np.float32(1.0 / np.sqrt(num_pixels)))
    standardized: FloatImages = ((x - mean) / std).astype(np.float32)
    return standardized


def augment(images: npt.ArrayLike, rng: np.random.Generator) -> FloatImages:
    """TF reference training preprocessing: pad 4, random 32x32 crop, random flip, standardize."""
    x = np.asarray(images)
    n = len(x)
    padded = np.pad(x, ((0, 0), (PAD, PAD), (PAD, PAD), (0, 0)))
    offsets = rng.integers(0, 2 * PAD + 1, size=(n, 2))
    flips = rng.random(n) < 0.5
    out = np.empty((n, IMAGE_SIZE, IMAGE_SIZE, x.shape[3]), dtype=x.dtype)
    for i, ((dy, dx), flip) in enumerate(zip(offsets, flips, strict=True)):
        crop = padded[i, dy : dy + IMAGE_SIZE, dx : dx + IMAGE_SIZE]
        out[i] = crop[:, ::-1] if flip else crop
    return standardize(out)


# --------------------------------------------------------------------------- partitions


def iid_partition(num_samples: int, num_workers: int, seed: int) -> list[Indices]:
    """Shuffle and split into equal shares; the ``num_samples % num_workers`` rest is unused."""
    _check_workers(num_samples, num_workers)
    order = np.random.default_rng(seed).permutation(num_samples).astype(np.int64)
    share = num_samples // num_workers
    return [np.sort(order[w * share : (w + 1) * share]) for w in range(num_workers)]


def dirichlet_partition(
    labels: npt.ArrayLike,
    num_workers: int,
    alpha: float,
    seed: int,
    *,
    min_samples: int = 1,
    max_attempts: int = 100,
) -> list[Indices]:
    """Non-IID split: each class's samples go to workers in proportions drawn from Dir(alpha).

    No worker is left with fewer than ``min_samples``: the whole draw is repeated (with the next
    values of the same seeded generator) up to ``max_attempts`` times, the usual remedy in the
    NIID-Bench / FedML code; if every draw still starves someone (tiny data, many workers, small
    alpha), the starved workers take random samples from the largest share. Every sample is
    assigned exactly once.
    """
    y = np.asarray(labels, dtype=np.int64).reshape(-1)
    _check_workers(len(y), num_workers, min_samples)
    if not alpha > 0:
        raise ConfigError(
            f"Dirichlet alpha must be > 0, got {alpha}.",
            fix="use e.g. 0.1 (very skewed) to 100 (nearly IID).",
        )
    rng = np.random.default_rng(seed)
    classes = np.unique(y)
    shares: list[list[int]] = []
    for _ in range(max_attempts):
        shares = [[] for _ in range(num_workers)]
        for c in classes:
            idx = rng.permutation(np.flatnonzero(y == c))
            proportions = rng.dirichlet(np.full(num_workers, alpha))
            cuts = (np.cumsum(proportions)[:-1] * len(idx)).astype(np.int64)
            for w, part in enumerate(np.split(idx, cuts)):
                shares[w].extend(part.tolist())
        if min(len(s) for s in shares) >= min_samples:
            break
    else:
        while True:
            starved = [w for w in range(num_workers) if len(shares[w]) < min_samples]
            if not starved:
                break
            # A donor above the minimum exists because num_samples >= num_workers * min_samples.
            donor = max(range(num_workers), key=lambda i: len(shares[i]))
            count = min(min_samples - len(shares[starved[0]]), len(shares[donor]) - min_samples)
            taken = set(rng.choice(len(shares[donor]), size=count, replace=False).tolist())
            shares[starved[0]].extend(shares[donor][i] for i in sorted(taken))
            shares[donor] = [s for i, s in enumerate(shares[donor]) if i not in taken]
    return [np.sort(np.asarray(s, dtype=np.int64)) for s in shares]


def partition(
    labels: npt.ArrayLike,
    num_workers: int,
    scheme: Literal["iid", "dirichlet"] = "iid",
    *,
    alpha: float = 0.5,
    seed: int = 0,
) -> list[Indices]:
    """Per-worker sample indices by ``scheme`` ("iid" or "dirichlet"), reproducible from seed."""
    y = np.asarray(labels).reshape(-1)
    if scheme == "iid":
        return iid_partition(len(y), num_workers, seed)
    if scheme == "dirichlet":
        return dirichlet_partition(y, num_workers, alpha, seed)
    raise ConfigError(f"unknown partition scheme {scheme!r}.", fix="use 'iid' or 'dirichlet'.")


def label_histograms(
    labels: npt.ArrayLike, parts: list[Indices], num_classes: int = NUM_CLASSES
) -> npt.NDArray[np.float64]:
    """Per-worker label distributions (rows sum to 1; an empty share gives a zero row)."""
    y = np.asarray(labels, dtype=np.int64).reshape(-1)
    counts = np.stack([np.bincount(y[p], minlength=num_classes) for p in parts]).astype(float)
    totals = counts.sum(axis=1, keepdims=True)
    histograms: npt.NDArray[np.float64] = np.divide(
        counts, totals, out=np.zeros_like(counts), where=totals > 0
    )
    return histograms


def _check_workers(num_samples: int, num_workers: int, min_samples: int = 1) -> None:
    if num_workers < 1 or num_samples < num_workers * min_samples:
        raise ConfigError(
            f"cannot split {num_samples} samples among {num_workers} workers "
            f"(at least {min_samples} each).",
            fix="use at least one worker and no more workers than samples.",
        )


# --------------------------------------------------------------------------- batch stream


class BatchStream:
    """Deterministic, resumable stream of (x, y) training batches over one worker's share.

    Each epoch is a fresh permutation drawn from ``(seed, epoch)`` and each batch's augmentation
    from ``(seed, step)``, so ``batch(step)`` is the same in every process and after a restart.
    The last incomplete batch of an epoch is dropped, as in the reference input pipeline.
    """

    def __init__(
        self,
        images: Images,
        labels: Labels,
        indices: npt.ArrayLike,
        batch_size: int,
        *,
        seed: int = 0,
        augmented: bool = True,
    ) -> None:
        self._images = images
        self._labels = np.asarray(labels, dtype=np.int64)
        self._indices = np.asarray(indices, dtype=np.int64).reshape(-1)
        if batch_size < 1 or len(self._indices) < batch_size:
            raise ConfigError(
                f"batch size {batch_size} does not fit this worker's {len(self._indices)} samples.",
                fix="use a smaller batch_size, fewer workers, or a less skewed partition.",
            )
        self.batch_size = batch_size
        self.seed = seed
        self.augmented = augmented
        self.steps_per_epoch = len(self._indices) // batch_size
        self._epoch = -1
        self._order = self._indices

    def _epoch_order(self, epoch: int) -> Indices:
        if epoch != self._epoch:
            rng = np.random.default_rng([self.seed, epoch])
            self._order = self._indices[rng.permutation(len(self._indices))]
            self._epoch = epoch
        return self._order

    def batch(self, step: int) -> tuple[FloatImages, Labels]:
        """The batch for global step ``step`` (0-based)."""
        epoch, position = divmod(step, self.steps_per_epoch)
        order = self._epoch_order(epoch)
        chosen = order[position * self.batch_size : (position + 1) * self.batch_size]
        images = self._images[chosen]
        if self.augmented:
            x = augment(images, np.random.default_rng([self.seed, 1_000_003, step]))
        else:
            x = standardize(images)
        return x, self._labels[chosen]

    def __iter__(self) -> Iterator[tuple[FloatImages, Labels]]:
        return self.batches()

    def batches(self, start_step: int = 0) -> Iterator[tuple[FloatImages, Labels]]:
        """Endless batches from ``start_step`` on."""
        step = start_step
        while True:
            yield self.batch(step)
            step += 1
