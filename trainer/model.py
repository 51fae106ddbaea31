"""ResNet v1 for CIFAR-10 (He et al. 2015, depth 6n+2) in Keras 3, with weights as numpy dicts."""

from __future__ import annotations

import os

# Keras 3 picks its backend once, at first import, and defaults to TensorFlow, which the lab does
# not ship: the TD image carries torch (CPU) only. setdefault keeps an explicit user choice.
os.environ.setdefault("KERAS_BACKEND", "torch")

from collections.abc import Mapping
from dataclasses import dataclass

import keras
import numpy as np
import numpy.typing as npt
import torch

from hfl_lab._exceptions import ConfigError

__all__ = [
    "DEFAULT_DEPTH",
    "NUM_CLASSES",
    "Evaluation",
    "GradientResult",
    "ResNet",
    "VariableSpec",
    "build_resnet",
    "set_torch_threads",
    "valid_depths",
]

FloatArray = npt.NDArray[np.float32]
Weights = dict[str, FloatArray]

DEFAULT_DEPTH = 56
NUM_CLASSES = 10
IMAGE_SHAPE = (32, 32, 3)
STAGE_FILTERS = (16, 32, 64)
# TF official resnet_cifar batch-norm constants (resnet_model.py: _BATCH_NORM_DECAY/_EPSILON).
BN_MOMENTUM = 0.997
BN_EPSILON = 1e-5


def valid_depths(limit: int = 110) -> list[int]:
    """ResNet-v1 CIFAR depths 6n+2 up to ``limit`` (8, 14, 20, 26, 32, ...)."""
    return [6 * n + 2 for n in range(1, (limit - 2) // 6 + 1)]


def _check_depth(depth: int) -> int:
    if isinstance(depth, bool) or not isinstance(depth, int) or depth < 8 or (depth - 2) % 6:
        raise ConfigError(
            f"ResNet depth {depth!r} is not of the form 6n+2 (3 stages of n basic blocks).",
            fix="use one of 8, 14, 20, 32, 44, 56, 110 (any 6n+2, n >= 1); 56 is the reference.",
        )
    return (depth - 2) // 6


def set_torch_threads(num_threads: int | None) -> int:
    """Set torch's intra-op CPU threads (``None`` keeps torch's default); returns the count used.

    A TD usually has few vCPUs shared with gRPC threads, so workers pass their vCPU budget here
    instead of letting torch size its pool from the host.
    """
    if num_threads is not None:
        if num_threads < 1:
            raise ConfigError(
                f"num_threads must be >= 1, got {num_threads}.",
                fix="pass a positive thread count or None for torch's default.",
            )
        torch.set_num_threads(num_threads)
    return int(torch.get_num_threads())


@dataclass(frozen=True)
class VariableSpec:
    """One model variable: a name stable across processes for the same depth and options."""

    name: str
    shape: tuple[int, ...]
    dtype: str
    trainable: bool
    batch_norm: bool


@dataclass(frozen=True)
class GradientResult:
    """What one training-mode forward/backward pass over a batch produced."""

    loss: float
    accuracy: float
    num_samples: int
    gradients: Weights
    non_trainable: Weights


@dataclass(frozen=True)
class Evaluation:
    """Inference-mode metrics over a set of images."""

    loss: float
    accuracy: float
    predictions: npt.NDArray[np.int64]
    num_samples: int


class ResNet:
    """A built ResNet v1 for CIFAR with numpy-dict access to its weights and gradients.

    Not thread-safe: one model per thread (a worker computes one batch at a time anyway).
    """

    def __init__(
        self,
        depth: int = DEFAULT_DEPTH,
        *,
        batch_norm: bool = True,
        seed: int = 0,
        num_classes: int = NUM_CLASSES,
        bn_momentum: float = BN_MOMENTUM,
    ) -> None:
        self.depth = depth
        self.blocks_per_stage = _check_depth(depth)
        self.batch_norm = batch_norm
        self.seed = seed
        self.num_classes = num_classes
        self._bn_momentum = bn_momentum
        self._layer_seed = seed * 1000
        inputs = keras.Input(shape=IMAGE_SHAPE, name="image")
        logits = self._backbone(inputs)
        probs = keras.layers.Activation("softmax", name="softmax")(logits)
        #: the published model (softmax outputs), e.g. for ``keras_model.save``
        self.keras_model = keras.Model(inputs, probs, name=f"resnet{depth}_v1")
        # Same layers, so same variables: the loss is computed from logits for numerical
        # stability (log-softmax) instead of from clipped probabilities.
        self._logits_model = keras.Model(inputs, logits, name=f"resnet{depth}_v1_logits")
        self._specs = self._collect_specs()
        self._named = self._named_variables()
        # stateless_call takes values in the model's own variable order; keep names alongside.
        name_of = {id(var): name for name, var in self._named}
        self._trainable = list(self._logits_model.trainable_variables)
        self._non_trainable = list(self._logits_model.non_trainable_variables)
        self._trainable_order = [name_of[id(v)] for v in self._trainable]
        self._non_trainable_order = [name_of[id(v)] for v in self._non_trainable]

    # ----------------------------------------------------------------- architecture

    def _next_seed(self) -> int:
        self._layer_seed += 1
        return self._layer_seed

    def _conv(self, x: object, filters: int, kernel: int, strides: int, name: str) -> object:
        return keras.layers.Conv2D(
            filters,
            kernel,
            strides=strides,
            padding="same",
            use_bias=not self.batch_norm,  # a bias before BN is cancelled by BN's mean
            kernel_initializer=keras.initializers.HeNormal(seed=self._next_seed()),
            name=name,
        )(x)

    def _norm(self, x: object, name: str) -> object:
        if not self.batch_norm:
            return x
        return keras.layers.BatchNormalization(
            momentum=self._bn_momentum, epsilon=BN_EPSILON, name=name
        )(x)

    def _block(self, x: object, filters: int, strides: int, prefix: str) -> object:
        shortcut = x
        if strides != 1 or int(x.shape[-1]) != filters:  # type: ignore[attr-defined]
            # Projection shortcut (He et al. option B, as in TF official resnet v1).
            shortcut = self._conv(x, filters, 1, strides, f"{prefix}_proj_conv")
            shortcut = self._norm(shortcut, f"{prefix}_proj_bn")
        y = self._conv(x, filters, 3, strides, f"{prefix}_conv1")
        y = self._norm(y, f"{prefix}_bn1")
        y = keras.layers.Activation("relu", name=f"{prefix}_relu1")(y)
        y = self._conv(y, filters, 3, 1, f"{prefix}_conv2")
        y = self._norm(y, f"{prefix}_bn2")
        y = keras.layers.Add(name=f"{prefix}_add")([shortcut, y])
        return keras.layers.Activation("relu", name=f"{prefix}_relu2")(y)

    def _backbone(self, inputs: object) -> object:
        x = self._conv(inputs, STAGE_FILTERS[0], 3, 1, "stem_conv")
        x = self._norm(x, "stem_bn")
        x = keras.layers.Activation("relu", name="stem_relu")(x)
        for stage, filters in enumerate(STAGE_FILTERS, start=1):
            for block in range(1, self.blocks_per_stage + 1):
                strides = 2 if stage > 1 and block == 1 else 1
                x = self._block(x, filters, strides, f"stage{stage}_block{block}")
        x = keras.layers.GlobalAveragePooling2D(name="avg_pool")(x)
        return keras.layers.Dense(
            self.num_classes,
            kernel_initializer=keras.initializers.GlorotUniform(seed=self._next_seed()),
            name="logits",
        )(x)

    def _collect_specs(self) -> list[VariableSpec]:
        specs: list[VariableSpec] = []
        for layer in self._logits_model.layers:
            is_bn = isinstance(layer, keras.layers.BatchNormalization)
            for var in layer.weights:
                specs.append(
                    VariableSpec(
                        name=f"{layer.name}/{var.name}",
                        shape=tuple(int(d) for d in var.shape),
                        dtype=str(var.dtype),
                        trainable=bool(var.trainable),
                        batch_norm=is_bn,
                    )
                )
        names = [s.name for s in specs]
        if len(set(names)) != len(names):  # pragma: no cover - guards the naming scheme
            raise RuntimeError(f"duplicate variable names in {self.keras_model.name}")
        return specs

    # ----------------------------------------------------------------- variables

    @property
    def variable_specs(self) -> list[VariableSpec]:
        """All variables in a stable order: trainable and non-trainable (BN moving stats)."""
        return list(self._specs)

    @property
    def trainable_names(self) -> list[str]:
        return [s.name for s in self._specs if s.trainable]

    @property
    def non_trainable_names(self) -> list[str]:
        return [s.name for s in self._specs if not s.trainable]

    @property
    def num_params(self) -> int:
        return int(sum(np.prod(s.shape, dtype=np.int64) for s in self._specs))

    def _named_variables(self) -> list[tuple[str, keras.Variable]]:
        by_id: dict[str, keras.Variable] = {}
        for layer in self._logits_model.layers:
            for var in layer.weights:
                by_id[f"{layer.name}/{var.name}"] = var
        return [(s.name, by_id[s.name]) for s in self._specs]

    def get_weights(self) -> Weights:
        """A float32 copy of every variable, keyed by :attr:`VariableSpec.name`."""
        return {name: _to_numpy(var.value) for name, var in self._named}

    def set_weights(self, weights: Mapping[str, npt.ArrayLike], *, partial: bool = False) -> None:
        """Assign variables from a name → array mapping; all names are required unless partial."""
        named = self._named
        known = {name for name, _ in named}
        unknown = sorted(set(weights) - known)
        if unknown:
            raise ConfigError(
                f"weights for unknown variables {unknown[:3]} (model {self.keras_model.name}).",
                fix="load weights saved from a model of the same depth and batch_norm setting.",
            )
        missing = [name for name in known if name not in weights]
        if missing and not partial:
            raise ConfigError(
                f"{len(missing)} variables missing from the weights, e.g. {missing[0]!r}.",
                fix="pass a complete weights dict (ResNet.get_weights()) or partial=True.",
            )
        for name, var in named:
            if name not in weights:
                continue
            value = np.asarray(weights[name], dtype=np.float32)
            if tuple(value.shape) != tuple(var.shape):
                raise ConfigError(
                    f"weight {name!r} has shape {value.shape}, "
                    f"the model expects {tuple(var.shape)}.",
                    fix="load weights saved from a model of the same depth.",
                )
            var.assign(value)

    # ----------------------------------------------------------------- training & inference

    def compute_gradients(self, x: npt.ArrayLike, y: npt.ArrayLike) -> GradientResult:
        """Loss, accuracy and gradients of the mean cross-entropy over one batch.

        Runs in training mode (batch statistics); the model's own variables are left untouched,
        the BN moving statistics that the pass would have produced are returned instead.
        """
        images, labels = _as_batch(x, y, self.num_classes)
        # Fresh leaf tensors (sharing storage with the variables) collect this batch's grads
        # without touching the variables' own .grad fields.
        trainable = [v.value.detach().requires_grad_(True) for v in self._trainable]
        non_trainable = [v.value.detach() for v in self._non_trainable]
        logits, new_non_trainable = self._logits_model.stateless_call(
            trainable, non_trainable, torch.from_numpy(images), training=True
        )
        target = torch.from_numpy(labels)
        loss = torch.nn.functional.cross_entropy(logits, target)
        loss.backward()  # type: ignore[no-untyped-call]
        with torch.no_grad():
            correct = (logits.argmax(dim=1) == target).sum().item()
        grads: Weights = {}
        for name, tensor in zip(self._trainable_order, trainable, strict=True):
            grad = tensor.grad
            grads[name] = (
                np.zeros(tuple(tensor.shape), np.float32) if grad is None else _to_numpy(grad)
            )
        updated = {
            name: _to_numpy(value)
            for name, value in zip(self._non_trainable_order, new_non_trainable, strict=True)
        }
        # Hand both back in variable_specs order.
        grads = {name: grads[name] for name in self.trainable_names}
        updated = {name: updated[name] for name in self.non_trainable_names}
        return GradientResult(
            loss=float(loss.item()),
            accuracy=float(correct) / len(labels),
            num_samples=len(labels),
            gradients=grads,
            non_trainable=updated,
        )

    def predict_logits(self, x: npt.ArrayLike, batch_size: int = 256) -> FloatArray:
        """Inference-mode logits (BN uses moving statistics), computed in batches."""
        images = np.ascontiguousarray(x, dtype=np.float32)
        _check_images(images)
        out: list[FloatArray] = []
        with torch.no_grad():
            for start in range(0, len(images), batch_size):
                chunk = torch.from_numpy(images[start : start + batch_size])
                logits = self._logits_model(chunk, training=False)
                out.append(logits.detach().cpu().numpy().astype(np.float32))
        if not out:
            return np.zeros((0, self.num_classes), np.float32)
        return np.concatenate(out)

    def evaluate(self, x: npt.ArrayLike, y: npt.ArrayLike, batch_size: int = 256) -> Evaluation:
        """Mean cross-entropy, accuracy and predicted classes over ``x`` in inference mode."""
        images, labels = _as_batch(x, y, self.num_classes)
        logits = self.predict_logits(images, batch_size)
        with torch.no_grad():
            loss = torch.nn.functional.cross_entropy(
                torch.from_numpy(logits), torch.from_numpy(labels)
            )
        predictions = logits.argmax(axis=1).astype(np.int64)
        return Evaluation(
            loss=float(loss.item()),
            accuracy=float(np.mean(predictions == labels)),
            predictions=predictions,
            num_samples=len(labels),
        )


def build_resnet(
    depth: int = DEFAULT_DEPTH,
    *,
    batch_norm: bool = True,
    seed: int = 0,
    num_threads: int | None = None,
    bn_momentum: float = BN_MOMENTUM,
) -> ResNet:
    """Build ResNet-``depth`` v1 for CIFAR-10, initialised deterministically from ``seed``."""
    set_torch_threads(num_threads)
    return ResNet(depth, batch_norm=batch_norm, seed=seed, bn_momentum=bn_momentum)


def _to_numpy(tensor: torch.Tensor) -> FloatArray:
    # A float32 copy that no later in-place update of the variable can alter.
    array: FloatArray = tensor.detach().cpu().numpy().astype(np.float32, copy=True)
    return array


def _check_images(images: npt.NDArray[np.float32]) -> None:
    if images.ndim != 4 or tuple(images.shape[1:]) != IMAGE_SHAPE:
        raise ConfigError(
            f"images have shape {images.shape}, expected (N, 32, 32, 3) NHWC float32.",
            fix="pass CIFAR-10 images as produced by trainer.data (channels last).",
        )


def _as_batch(
    x: npt.ArrayLike, y: npt.ArrayLike, num_classes: int
) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.int64]]:
    images = np.ascontiguousarray(x, dtype=np.float32)
    labels = np.ascontiguousarray(y, dtype=np.int64).reshape(-1)
    _check_images(images)
    if len(images) != len(labels) or len(labels) == 0:
        raise ConfigError(
            f"a batch needs as many labels as images (got {len(images)} images, "
            f"{len(labels)} labels), and at least one of each.",
            fix="pass matching non-empty (x, y) arrays.",
        )
    if labels.min() < 0 or labels.max() >= num_classes:
        raise ConfigError(
            f"labels must lie in 0..{num_classes - 1}, got {labels.min()}..{labels.max()}.",
            fix="pass integer CIFAR-10 class ids.",
        )
    return images, labels
