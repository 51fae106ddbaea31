"""ResNet v1 for CIFAR-10 (He et al. 2015, depth 6n+2) in Keras 3 on TensorFlow, with weights as
numpy dicts and one compiled gradient step per model."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from hfl_lab._exceptions import ConfigError
from trainer.tf_runtime import import_tensorflow, set_threads

import_tensorflow()  # the backend checked, TensorFlow loaded quietly, before Keras loads it

import keras  # noqa: E402
import numpy as np  # noqa: E402
import numpy.typing as npt  # noqa: E402
import tensorflow as tf  # noqa: E402

from trainer.flat import FlatLayout, FlatTensors, flat_layout  # noqa: E402
from trainer.layers import FusedBatchNormalization  # noqa: E402

__all__ = [
    "DEFAULT_DEPTH",
    "NUM_CLASSES",
    "Evaluation",
    "GradientResult",
    "ResNet",
    "VariableSpec",
    "build_resnet",
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
    #: the gradients and statistics as one buffer in the model's flat layout, when it has one
    #: (``gradients`` and ``non_trainable`` are views of it)
    flat: FlatTensors | None = None


@dataclass(frozen=True)
class Evaluation:
    """Inference-mode metrics over a set of images."""

    loss: float
    accuracy: float
    predictions: npt.NDArray[np.int64]
    num_samples: int

    @classmethod
    def of_log_probabilities(
        cls, log_probs: npt.NDArray[np.float64], labels: npt.NDArray[np.int64]
    ) -> Evaluation:
        """Mean cross-entropy, accuracy and predicted classes from per-class log-probabilities
        (the trainer's logits, or the owner's model's probabilities, in log space)."""
        if len(labels) == 0:
            return cls(0.0, 0.0, np.zeros(0, np.int64), 0)
        predictions = log_probs.argmax(axis=1).astype(np.int64)
        return cls(
            loss=float(-log_probs[np.arange(len(labels)), labels].mean()),
            accuracy=float(np.mean(predictions == labels)),
            predictions=predictions,
            num_samples=len(labels),
        )


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
        jit_compile: bool = False,
        fused_batch_norm: bool = True,
    ) -> None:
        self.depth = depth
        self.blocks_per_stage = _check_depth(depth)
        self.batch_norm = batch_norm
        self.seed = seed
        self.num_classes = num_classes
        self._bn_momentum = bn_momentum
        #: TensorFlow's fused batch-norm kernel in training (the exported model has Keras' own)
        self.fused_batch_norm = fused_batch_norm
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
        #: compile the gradient step with XLA (off by default: slower on these CPUs, see bench/)
        self.jit_compile = jit_compile
        #: how often the gradient step was traced (once per model, whatever the data)
        self.trace_count = 0
        self._step_layout = self._layout(
            [*self._trainable_order, *self._non_trainable_order],
            [*self._trainable, *self._non_trainable],
        )
        self._step_fn = self._compile_step()
        self._predict_fn = self._compile_predict()
        self._assign_fn = self._compile_assign()
        #: the variables as one flat float32 buffer, trainable first (trainer.flat)
        self.flat_layout: FlatLayout | None = flat_layout(self._specs)
        by_name = dict(self._named)
        self._flat_assign_fn = (
            self._compile_assign([by_name[name] for name, _, _, _ in self.flat_layout.entries])
            if self.flat_layout is not None else None
        )
        #: compute_gradients' vector is laid out as flat_layout: hand it on as it is
        self._step_is_flat = self.flat_layout is not None and [
            (name, start, end, shape) for name, start, end, shape in self._step_layout
        ] == list(self.flat_layout.entries)

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
        norm = FusedBatchNormalization if self.fused_batch_norm else keras.layers.BatchNormalization
        return norm(momentum=self._bn_momentum, epsilon=BN_EPSILON, name=name)(x)

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
        """Assign variables from a name → array mapping; all names are required unless partial.

        A :class:`~trainer.flat.FlatTensors` in this model's layout goes to TensorFlow as its
        one buffer, without a copy on the way."""
        if (isinstance(weights, FlatTensors) and self._flat_assign_fn is not None
                and self.flat_layout is not None and weights.layout.same_as(self.flat_layout)):
            self._flat_assign_fn(weights.buffer)
            return
        named = self._named
        known = {name for name, _ in named}
        unknown = sorted(set(weights) - known)
        if unknown:
            raise ConfigError(
                f"weights for unknown variables {unknown[:3]} (model {self.keras_model.name}).",
                fix="load weights saved from a model of the same depth and batch_norm setting.",
            )
        missing = [name for name, _ in named if name not in weights]
        if missing and not partial:
            raise ConfigError(
                f"{len(missing)} variables missing from the weights, e.g. {missing[0]!r}.",
                fix="pass a complete weights dict (ResNet.get_weights()) or partial=True.",
            )
        values: list[tuple[keras.Variable, FloatArray]] = []
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
            values.append((var, value))
        if missing:
            for var, value in values:
                var.assign(value)
        else:  # every variable: one flat vector, one call into TensorFlow
            self._assign_fn(np.concatenate([value.reshape(-1) for _, value in values]))

    # ----------------------------------------------------------------- compiled functions

    def _compile_step(self) -> Callable[..., Any]:
        """Forward, loss, gradients and new BN statistics as one ``tf.function``.

        The variables' current values are read inside the graph and passed to Keras' stateless
        call, so the pass writes no variable (the new BN statistics are returned); reading them
        there instead of passing ~300 tensors in saves the per-call argument handling. The
        signature fixes every shape but the batch, so the step is traced once per model.
        Gradients and statistics leave as one flat float32 vector: one copy out of TensorFlow
        instead of one per variable.
        """
        model = self._logits_model
        trainable_vars, non_trainable_vars = self._trainable, self._non_trainable
        signature = [
            tf.TensorSpec((None, *IMAGE_SHAPE), tf.float32),
            tf.TensorSpec((None,), tf.int32),
        ]

        def step(images: tf.Tensor, labels: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor]:
            self.trace_count += 1  # Python runs only while tracing
            trainable = [tf.identity(v.value) for v in trainable_vars]
            non_trainable = [tf.identity(v.value) for v in non_trainable_vars]
            with tf.GradientTape() as tape:
                tape.watch(trainable)
                logits, new_stats = model.stateless_call(
                    trainable, non_trainable, images, training=True
                )
                loss = tf.reduce_mean(
                    tf.nn.sparse_softmax_cross_entropy_with_logits(labels=labels, logits=logits)
                )
            grads = tape.gradient(loss, trainable)
            grads = [
                tf.zeros_like(t) if g is None else g for g, t in zip(grads, trainable, strict=True)
            ]
            hits = tf.equal(tf.argmax(logits, axis=1, output_type=tf.int32), labels)
            correct = tf.reduce_sum(tf.cast(hits, tf.int32))
            flat = tf.concat([tf.reshape(t, (-1,)) for t in [*grads, *new_stats]], axis=0)
            return loss, correct, flat

        compiled: Callable[..., Any] = tf.function(
            step, input_signature=signature, jit_compile=self.jit_compile
        )
        return compiled

    def _compile_predict(self) -> Callable[..., Any]:
        model = self._logits_model

        def predict(images: tf.Tensor) -> tf.Tensor:
            return model(images, training=False)

        compiled: Callable[..., Any] = tf.function(
            predict, input_signature=[tf.TensorSpec((None, *IMAGE_SHAPE), tf.float32)]
        )
        return compiled

    def _compile_assign(self, variables: list[Any] | None = None) -> Callable[..., Any]:
        """Assign every variable (in this order) from one flat float32 vector in one call."""
        if variables is None:
            variables = [var for _, var in self._named]
        sizes = self._flat_sizes(variables)

        def assign(flat: tf.Tensor) -> None:
            for var, piece in zip(variables, tf.split(flat, sizes), strict=True):
                var.assign(tf.reshape(piece, var.shape))

        compiled: Callable[..., Any] = tf.function(
            assign, input_signature=[tf.TensorSpec((int(sum(sizes)),), tf.float32)]
        )
        return compiled

    @classmethod
    def _layout(
        cls, names: list[str], variables: list[Any]
    ) -> list[tuple[str, int, int, tuple[int, ...]]]:
        """(name, start, end, shape) of each variable in a flat vector of them, in order."""
        ends = np.cumsum(cls._flat_sizes(variables), dtype=np.int64)
        starts = [0, *ends[:-1].tolist()]
        return [
            (name, int(start), int(end), tuple(int(d) for d in var.shape))
            for name, var, start, end in zip(names, variables, starts, ends, strict=True)
        ]

    @staticmethod
    def _flat_sizes(variables: list[Any]) -> list[int]:
        return [int(np.prod(tuple(v.shape), dtype=np.int64)) for v in variables]

    # ----------------------------------------------------------------- training & inference

    def compute_gradients(self, x: npt.ArrayLike, y: npt.ArrayLike) -> GradientResult:
        """Loss, accuracy and gradients of the mean cross-entropy over one batch.

        Runs in training mode (batch statistics); the model's own variables are left untouched,
        the BN moving statistics that the pass would have produced are returned instead.
        """
        images, labels = _as_batch(x, y, self.num_classes)
        loss, correct, flat = self._step_fn(images, labels.astype(np.int32))
        # One writable float32 copy; every gradient and statistic is a view into it.
        values = np.array(flat.numpy(), dtype=np.float32, copy=True)
        pieces = {
            name: values[start:end].reshape(shape) for name, start, end, shape in self._step_layout
        }
        # Hand both back in variable_specs order.
        return GradientResult(
            loss=float(loss),
            accuracy=float(correct) / len(labels),
            num_samples=len(labels),
            gradients={name: pieces[name] for name in self.trainable_names},
            non_trainable={name: pieces[name] for name in self.non_trainable_names},
            flat=(FlatTensors(values, self.flat_layout)
                  if self._step_is_flat and self.flat_layout is not None else None),
        )

    def predict_logits(self, x: npt.ArrayLike, batch_size: int = 256) -> FloatArray:
        """Inference-mode logits (BN uses moving statistics), computed in batches."""
        images = np.ascontiguousarray(x, dtype=np.float32)
        _check_images(images)
        out: list[FloatArray] = []
        for start in range(0, len(images), batch_size):
            logits = self._predict_fn(images[start : start + batch_size])
            out.append(logits.numpy().astype(np.float32, copy=False))
        if not out:
            return np.zeros((0, self.num_classes), np.float32)
        return np.concatenate(out)

    def evaluate(self, x: npt.ArrayLike, y: npt.ArrayLike, batch_size: int = 256) -> Evaluation:
        """Mean cross-entropy, accuracy and predicted classes over ``x`` in inference mode."""
        images, labels = _as_batch(x, y, self.num_classes)
        logits = self.predict_logits(images, batch_size).astype(np.float64)
        shifted = logits - logits.max(axis=1, keepdims=True)
        log_probs = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
        return Evaluation.of_log_probabilities(log_probs, labels)

    # ----------------------------------------------------------------- the owner's model

    def serving_model(self) -> keras.Model:
        """The published model for raw CIFAR images: uint8 NHWC 32x32x3 in, class probabilities
        out, with the training preprocessing (per-image standardization) inside.

        Built only from Keras' own layers and ``keras.ops`` (batch norm included), so
        ``keras.models.load_model`` of its ``.keras`` file needs nothing but TensorFlow and
        Keras. It holds a copy of this model's current weights.
        """
        twin = ResNet(
            self.depth, batch_norm=self.batch_norm, seed=self.seed,
            num_classes=self.num_classes, bn_momentum=self._bn_momentum,
            fused_batch_norm=False,
        )
        twin.set_weights(self.get_weights())
        raw = keras.Input(shape=IMAGE_SHAPE, dtype="uint8", name="image")
        x = keras.ops.cast(raw, "float32")
        mean = keras.ops.mean(x, axis=(1, 2, 3), keepdims=True)
        std = keras.ops.std(x, axis=(1, 2, 3), keepdims=True)
        # tf.image.per_image_standardization's floor keeps uniform images from dividing by 0.
        std = keras.ops.maximum(std, float(1.0 / np.sqrt(np.prod(IMAGE_SHAPE))))
        probs = twin.keras_model(keras.ops.divide(keras.ops.subtract(x, mean), std))
        return keras.Model(raw, probs, name=f"resnet{self.depth}_v1_cifar10")


def build_resnet(
    depth: int = DEFAULT_DEPTH,
    *,
    batch_norm: bool = True,
    seed: int = 0,
    num_threads: int | None = None,
    bn_momentum: float = BN_MOMENTUM,
    jit_compile: bool = False,
) -> ResNet:
    """Build ResNet-``depth`` v1 for CIFAR-10, initialised deterministically from ``seed``."""
    set_threads(num_threads)
    return ResNet(
        depth, batch_norm=batch_norm, seed=seed, bn_momentum=bn_momentum, jit_compile=jit_compile
    )


def _to_numpy(value: Any) -> FloatArray:
    # A float32 copy that no later update of the variable can alter.
    return np.array(value.numpy(), dtype=np.float32, copy=True)


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
