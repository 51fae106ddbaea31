"""The owner's model on the trusted node: plain Keras and TensorFlow load what retrieval exported.

Notebook 05 hands the owner ``trusted-node/model.keras`` and ``trusted-node/saved_model/``. They
take raw CIFAR images (uint8 NHWC) and standardize them inside, so a Python with nothing but
tensorflow, keras and numpy gets the accuracy ``retrieval.json`` reports.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from hfl_lab.config import LabConfig

# Runs in a fresh interpreter in which the lab's own packages cannot be imported at all.
LOAD_SCRIPT = """
import sys
for package in ("hfl_lab", "trainer"):
    sys.modules[package] = None  # any import of the lab's code now fails
import json
import numpy as np
import keras
import tensorflow as tf

if int(sys.argv[4]):  # the evaluating process's thread count: the same kernels, the same sums
    tf.config.threading.set_intra_op_parallelism_threads(int(sys.argv[4]))
folder, images, labels = sys.argv[1], np.load(sys.argv[2]), np.load(sys.argv[3])
model = keras.models.load_model(f"{folder}/model.keras")
probs = model.predict(images, batch_size=256, verbose=0)
reloaded = tf.saved_model.load(f"{folder}/saved_model")
served = reloaded.serve(tf.constant(images[:64]))
third_party = sorted({m.split(".")[0] for m, module in sys.modules.items()
                      if module is not None and m.split(".")[0] in (
                          "hfl_lab", "trainer", "torch", "grpc", "cryptography")})
print(json.dumps({
    "accuracy": float(np.mean(probs.argmax(axis=1) == labels)),
    "served_max_diff": float(np.abs(np.asarray(served) - probs[:64]).max()),
    "input_dtype": str(model.input.dtype),
    "foreign_modules": third_party,
}))
"""


def _train_a_few_steps(config: LabConfig, steps: int) -> dict[str, np.ndarray]:
    from trainer.data import load_cifar10, standardize
    from trainer.model import build_resnet
    from trainer.optim import MomentumSGD
    from trainer.reference import train_reference

    data = load_cifar10(config.require_data_path())
    model = build_resnet(config.depth, seed=config.seed, bn_momentum=config.bn_momentum)
    batches = [[(standardize(data.train_images[i * 64:(i + 1) * 64]),
                 data.train_labels[i * 64:(i + 1) * 64])] for i in range(steps)]
    run = train_reference(model, model.get_weights(), batches,
                          MomentumSGD(model.variable_specs, 0.05))
    return run.weights


@pytest.mark.slow
def test_plain_keras_loads_the_owner_model_and_gets_the_reported_accuracy(
    tmp_path: Path, cifar_dir: Path
) -> None:
    # Arrange: a run whose checkpoint folder holds a model trained for 8 steps.
    from hfl_lab.lab.retrieval import retrieve_and_evaluate
    from hfl_lab.lab.training import TrainingOutcome
    from hfl_lab.vault import DirectoryCheckpointStore
    from trainer.checkpoint import TrainingState, encode_state
    from trainer.data import load_cifar10

    run = tmp_path / "run"
    config = LabConfig(run_dir=str(run), depth=8, steps=8, vault=False, data_path=str(cifar_dir))
    weights = _train_a_few_steps(config, 8)
    store = DirectoryCheckpointStore(run / "checkpoints")
    store.save(8, encode_state(TrainingState(8, weights)), {})
    TrainingOutcome(run, 8, 1.0, {"final_step": 8, "evaluation": {}},
                    config=config.to_dict()).save()

    # Act: the trusted node's retrieval, then a fresh Python with only TF, Keras and numpy.
    report = retrieve_and_evaluate(config)
    data = load_cifar10(cifar_dir)
    np.save(tmp_path / "images.npy", data.test_images)
    np.save(tmp_path / "labels.npy", data.test_labels)
    import tensorflow as tf

    threads = tf.config.threading.get_intra_op_parallelism_threads()
    result = subprocess.run(
        [sys.executable, "-I", "-c", LOAD_SCRIPT, str(run / "trusted-node"),
         str(tmp_path / "images.npy"), str(tmp_path / "labels.npy"), str(threads)],
        cwd=tmp_path, capture_output=True, text=True, timeout=300, check=False,
    )

    # Assert
    assert result.returncode == 0, result.stderr[-3000:]
    loaded = json.loads(result.stdout.strip().splitlines()[-1])
    reported = json.loads((run / "retrieval.json").read_text())
    assert reported["num_samples"] == len(data.test_labels) > 0
    assert loaded["accuracy"] == reported["accuracy"] == report.accuracy
    assert reported["accuracy"] > 0.12, "8 steps of training beat chance on the test set"
    assert loaded["served_max_diff"] < 1e-5, "the SavedModel serves what model.keras predicts"
    assert loaded["input_dtype"] == "uint8"
    assert loaded["foreign_modules"] == []
    files = reported["model_files"]
    assert Path(files["keras"]) == run / "trusted-node" / "model.keras"
    assert (run / "trusted-node" / "saved_model" / "saved_model.pb").is_file()
    assert np.load(files["sample_images"]).dtype == np.uint8
    assert not list(run.glob("trusted-node/.*partial*")), "no staging files are left behind"
