"""P0: the trainer's own training step against what a Keras user gets from ``train_on_batch``.

Both sides train the same ResNet (depth, seed, initial weights) on the same CIFAR-10 batches of
128 in this process, alternating step by step. The trainer's step is what a worker and the PS do
between them without the network: ``ResNet.compute_gradients`` (one compiled ``tf.function``:
forward, loss, gradients, new BN statistics, TensorFlow's fused batch-norm kernel), the PS's
numpy ``MomentumSGD.apply`` and the weights set back into the model. The baseline is the same
architecture built with Keras' own layers and compiled as a Keras user would (SGD with momentum
0.9, sparse categorical cross-entropy), stepped with ``train_on_batch``.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

import numpy as np

from bench.registry import BenchContext, Measurement, benchmark
from bench.timing import interleaved_medians
from hfl_lab.config import LabConfig
from trainer.data import load_cifar10, standardize
from trainer.model import ResNet, build_resnet
from trainer.optim import MomentumSGD

BATCH = 128


def _batches(count: int) -> list[tuple[np.ndarray, np.ndarray]]:
    data = load_cifar10(LabConfig().require_data_path())
    return [
        (standardize(data.train_images[i * BATCH:(i + 1) * BATCH]),
         data.train_labels[i * BATCH:(i + 1) * BATCH])
        for i in range(count)
    ]


def trainer_step(depth: int, batches: list[tuple[np.ndarray, np.ndarray]],
                 *, jit_compile: bool = False) -> Callable[[], None]:
    """One step of the lab's own loop per call, cycling through ``batches``."""
    model = build_resnet(depth, seed=0, jit_compile=jit_compile)
    optimizer = MomentumSGD(model.variable_specs, 0.1)
    state: dict[str, Any] = {"weights": model.get_weights(), "index": 0}

    def step() -> None:
        x, y = batches[state["index"] % len(batches)]
        state["index"] += 1
        result = model.compute_gradients(x, y)
        weights = optimizer.apply(state["weights"], result.gradients)
        weights.update(result.non_trainable)
        model.set_weights(weights)
        state["weights"] = weights

    return step


def keras_step(depth: int, batches: list[tuple[np.ndarray, np.ndarray]]) -> Callable[[], None]:
    """One ``train_on_batch`` of the same model built with Keras' own layers."""
    import keras

    model = ResNet(depth, seed=0, fused_batch_norm=False).keras_model
    model.compile(optimizer=keras.optimizers.SGD(0.1, momentum=0.9),
                  loss="sparse_categorical_crossentropy")
    index = [0]

    def step() -> None:
        x, y = batches[index[0] % len(batches)]
        index[0] += 1
        model.train_on_batch(x, y)

    return step


_P0 = ("the trainer's single-process step of ResNet-{depth}, batch {batch} (compute_gradients: "
       "one compiled tf.function with TF's fused batch norm; MomentumSGD.apply in numpy; "
       "set_weights) ÷ Keras' own compiled train_on_batch of the same architecture with Keras' "
       "layers (SGD momentum 0.9), same initial weights and CIFAR-10 batches, alternating step "
       "by step in one process, TensorFlow default threads; median of {steps} after 2 warm-up, "
       "s")


@benchmark("P0-resnet20", what=_P0.format(depth=20, batch=BATCH, steps=10), unit="s",
           goal="<= 1.0", depth=20)
@benchmark("P0-resnet56", what=_P0.format(depth=56, batch=BATCH, steps=10), unit="s",
           goal="<= 1.0", depth=56)
def single_process_step(ctx: BenchContext, *, depth: int) -> Measurement:
    batches = _batches(4)
    fns = {"trainer": trainer_step(depth, batches), "keras": keras_step(depth, batches)}
    if not ctx.quick:  # the XLA switch, reported beside the figure (off by default)
        fns["trainer_xla"] = trainer_step(depth, batches, jit_compile=True)
    medians = interleaved_medians(fns, repeats=ctx.repeats(10, 3), warmup=2)
    print(f"  P0-resnet{depth}: medians {({k: round(v, 3) for k, v in medians.items()})} s",
          file=sys.stderr)
    return Measurement(medians["trainer"], medians["keras"])
