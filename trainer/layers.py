"""Keras layers of the trainer's own: TensorFlow's fused batch norm behind Keras' interface."""

from __future__ import annotations

from typing import Any

from trainer.tf_runtime import import_tensorflow

import_tensorflow()

import keras  # noqa: E402
import tensorflow as tf  # noqa: E402

__all__ = ["FusedBatchNormalization"]


@keras.saving.register_keras_serializable(package="hfl_lab")
class FusedBatchNormalization(keras.layers.BatchNormalization):  # type: ignore[misc]
    """Keras' batch normalization with TensorFlow's fused kernel in training mode.

    Keras 3 normalizes with separate moments and arithmetic ops; TensorFlow's FusedBatchNormV3
    does the same in one pass and a third of a ResNet-56 step is batch norm on these CPUs. Same
    variables, same moving-average rule and the same biased batch variance as the parent (the
    kernel returns the Bessel-corrected one, undone here); inference mode is the parent's.
    """

    def call(self, inputs: Any, training: bool | None = None, mask: Any = None) -> Any:
        if (
            not (training and self.trainable)
            or mask is not None
            or self.renorm
            or self.axis not in (-1, 3)
            or len(inputs.shape) != 4
            or inputs.dtype != tf.float32
            or not (self.scale and self.center)
        ):
            return super().call(inputs, training=training, mask=mask)
        empty = tf.constant([], tf.float32)
        outputs, mean, variance, *_ = tf.raw_ops.FusedBatchNormV3(
            x=inputs, scale=self.gamma.value, offset=self.beta.value, mean=empty,
            variance=empty, epsilon=self.epsilon, exponential_avg_factor=1.0,
            data_format="NHWC", is_training=True,
        )
        count = tf.cast(tf.size(inputs) // tf.shape(inputs)[-1], tf.float32)
        variance = variance * tf.where(count > 1, (count - 1) / tf.maximum(count, 1), 1.0)
        momentum = self.momentum
        self.moving_mean.assign(self.moving_mean * momentum + mean * (1.0 - momentum))
        self.moving_variance.assign(
            self.moving_variance * momentum + variance * (1.0 - momentum)
        )
        return outputs
