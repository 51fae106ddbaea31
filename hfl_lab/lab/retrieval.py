"""Notebook 05: move the model to the owner's trusted node, open it, evaluate it.

The sealed model is the LUKS volume ps0 checkpointed into. The owner's trusted node obtains its
passphrase with :func:`hfl_lab.vault.retrieve_as_owner`: from the run's trust service as an
attested owner, or, after that service stopped (notebook 05 in another kernel than 04), as the
*authorized* owner from the service's sealed state and the owner key the backend left for it
(``training.json`` records where). The provenance chain is verified when the backend named the
parameter server's attested key.

A run without a volume (``vault=False``, or a backend that keeps checkpoints in a folder) is
retrieved from its checkpoint folder and reported as NOT sealed.

What the owner gets is a model plain Keras loads: ``trusted-node/model.keras`` and the TensorFlow
SavedModel ``trusted-node/saved_model/`` take raw CIFAR images (uint8 NHWC 32x32x3) and standardize
them inside; the accuracy in ``retrieval.json`` is that model's. Both exist only in the trusted
node's folder: in the cluster the weights never leave the sealed volume.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from hfl_lab import owner
from hfl_lab._exceptions import BackendError, VaultError
from hfl_lab.config import LabConfig
from hfl_lab.dashboard import render_confusion_matrix, render_sample_predictions
from hfl_lab.lab.notebook import Table, TableReport
from hfl_lab.lab.training import TrainingOutcome
from hfl_lab.vault import (
    AttestedSigners,
    DirectoryCheckpointStore,
    SealedBrokerState,
    owner_counter_path,
    retrieve_as_owner,
)
from trainer.checkpoint import decode_state
from trainer.data import load_cifar10

if TYPE_CHECKING:
    from hfl_lab.backends import Backend

__all__ = [
    "RetrievalReport",
    "evaluate_checkpoint",
    "export_owner_model",
    "move_to_trusted_node",
    "owner_credential",
    "provenance_signers",
    "retrieve_and_evaluate",
]

TRUSTED_NODE = "trusted-node"
VOLUME_NAME = "model.luks"
#: the owner's model files, written only on the trusted node
MODEL_FILE = "model.keras"
SAVED_MODEL_DIR = "saved_model"
SAMPLE_IMAGES = "sample_images.npy"
CLASS_NAMES = (
    "airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck",
)


@dataclass(repr=False)  # shown as its table (TableReport)
class RetrievalReport(TableReport):
    """What the trusted node received, whether it was sealed and opened, and the evaluation."""

    location: Path
    sealed: bool
    opened: bool
    step: int
    provenance: str
    loss: float
    accuracy: float
    num_samples: int
    training_accuracy: float | None
    figures: dict[str, str] = field(default_factory=dict)
    #: the attestation of each key that signed the provenance (ps0's mesh keys)
    signed_by: list[dict[str, Any]] = field(default_factory=list)
    #: the owner's model files: "keras" (model.keras) and "saved_model" (a SavedModel folder)
    model_files: dict[str, str] = field(default_factory=dict)

    def table(self) -> Table:
        table = Table(("", "value"), title="model retrieval on the owner's trusted node")
        table.add("model", self.location)
        table.add("sealed in a LUKS volume", self.sealed)
        table.add("volume opened with the released key", self.opened if self.sealed else "n/a")
        if self.sealed:
            table.add("how the owner got the volume's key",
                      "unsealed from the trust service's sealed state with the owner's key "
                      "(authorized, not an attested release: not in the service's audit log)")
        table.add("checkpoint step", self.step)
        table.add("provenance", self.provenance)
        for signer in self.signed_by:
            kind = "SIMULATED TD" if signer.get("simulated") else "TDX"
            table.add(
                f"signed by {signer.get('role')} key {str(signer.get('signer_sha256'))[:16]}",
                f"attested ({kind}, TCB {signer.get('tcb_status')}), "
                f"MR_TD {str(signer.get('mr_td'))[:16]}…",
            )
        table.add("test accuracy", f"{self.accuracy:.1%} on {self.num_samples} images")
        table.add("test loss", f"{self.loss:.4f}")
        if self.training_accuracy is not None:
            table.add("ps0's own evaluation", f"{self.training_accuracy:.1%}")
        if self.model_files:
            table.add("Keras model (raw uint8 images in)", self.model_files.get("keras", ""))
            table.add("TensorFlow SavedModel", self.model_files.get("saved_model", ""))
        if not self.sealed:
            table.note = "NOT SEALED: this run kept its checkpoints in a plain folder."
        return table

    def to_dict(self) -> dict[str, Any]:
        return {
            "location": str(self.location),
            "sealed": self.sealed,
            "opened": self.opened,
            "step": self.step,
            "provenance": self.provenance,
            "loss": self.loss,
            "accuracy": self.accuracy,
            "num_samples": self.num_samples,
            "training_accuracy": self.training_accuracy,
            "figures": self.figures,
            "signed_by": self.signed_by,
            "model_files": self.model_files,
        }


def _trusted_dir(config: LabConfig) -> Path:
    return Path(config.run_dir) / TRUSTED_NODE


def owner_credential(vault: dict[str, Any]) -> SealedBrokerState:
    """The owner's authorized credential: the trust service's sealed state and the key that
    unseals it, derived from this session's owner secret and the run's public salt, checked
    against the owner's copy of the state's counter (beside the state; see
    :class:`hfl_lab.vault.OwnerCounter`)."""
    state, salt_file = vault.get("trust_state_path"), vault.get("owner_salt_path")
    if not state or not salt_file:
        raise VaultError(
            "the run's model is sealed, but its backend recorded no way for the owner to obtain "
            "the key (no trust_state_path / owner_salt_path in training.json).",
            fix="re-run notebook 04 with a backend that keeps the trust service's sealed state "
            "for the owner, then run this notebook again.",
        )
    salt = owner.read_run_salt(Path(salt_file))
    return SealedBrokerState(Path(state), owner.sealing_key(owner.admin_token(salt)),
                             owner_counter_path(Path(state)))


def provenance_signers(vault: dict[str, Any]) -> Any:
    """Whom the trusted node trusts as provenance signers: ps0's attested keys (verified from
    the evidence in each signer certificate), or nobody when the run left no policy."""
    folder = vault.get("trust_dir")
    if folder and (Path(folder) / "volume_policy.yaml").is_file():
        return AttestedSigners.from_folder(folder)
    return None


def move_to_trusted_node(
    config: LabConfig, backend: Backend | None = None, volume: str | None = None
) -> tuple[Path, bool]:
    """Copy the sealed volume (or, without one, the checkpoint folder) to the trusted node.

    Returns the location there and whether it is a sealed volume.
    """
    dest = _trusted_dir(config)
    dest.mkdir(parents=True, exist_ok=True)
    source = Path(volume) if volume else Path(config.run_dir) / "vault" / VOLUME_NAME
    if backend is not None:
        try:
            return Path(backend.fetch_vault(dest / VOLUME_NAME)), True
        except BackendError:
            pass  # no volume in this run: the checkpoint folder below
    if source.is_file():
        shutil.copyfile(source, dest / VOLUME_NAME)
        return dest / VOLUME_NAME, True
    folder = Path(config.run_dir) / "checkpoints"
    if not folder.is_dir():
        raise VaultError(
            f"the run folder {config.run_dir} holds neither a model volume nor checkpoints/.",
            fix="run notebook 04 (training) with this run_dir first.",
        )
    target = dest / "checkpoints"
    if target.exists():
        shutil.rmtree(target)
    shutil.copytree(folder, target)
    return target, False


def _open(
    location: Path, sealed: bool, vault: dict[str, Any]
) -> tuple[Any, str, bool, list[dict[str, Any]]]:
    """The newest checkpoint, a provenance summary, whether a volume was opened, and the
    attestation of each provenance signer."""
    if sealed:
        signers = provenance_signers(vault)
        retrieved = retrieve_as_owner(
            None, owner_credential(vault), location, signers if signers is not None else [],
            require_provenance=signers is not None,
        )
        summary = retrieved.provenance.summary()
        if signers is None:
            summary = f"not verified (the run named no policy for the PS's key): {summary}"
        return retrieved.checkpoint, summary, True, retrieved.provenance.signer_evidence
    checkpoint = DirectoryCheckpointStore(location, durable=False).load_latest()
    if checkpoint is None:
        raise VaultError(
            f"{location} holds no intact checkpoint.",
            fix="train until the first checkpoint (checkpoint_every) is written.",
        )
    return checkpoint, "not signed (plain checkpoint folder)", False, []


def evaluate_checkpoint(config: LabConfig, payload: bytes) -> tuple[Any, Any, Any]:
    """Load the weights into the owner's model and evaluate it on the raw test images.

    Returns (evaluation, data, model): ``model`` is the Keras model the owner receives (raw uint8
    CIFAR images in, per-image standardization inside, class probabilities out), and the
    evaluation is that very model's, so the files exported from it give the same accuracy.
    """
    # lazy: TensorFlow/Keras load only when the model is rebuilt, not with `from hfl_lab import`
    from trainer.model import Evaluation, build_resnet

    state = decode_state(payload)
    # The owner's node uses its own cores: ``threads`` is the participants' budget in their TDs.
    model = build_resnet(
        config.depth, seed=config.seed, bn_momentum=getattr(config, "bn_momentum", 0.9)
    )
    model.set_weights(state.weights)
    owner_model = model.serving_model()
    data = load_cifar10(config.require_data_path(), sha256=config.data_sha256)
    probs = np.asarray(owner_model.predict(data.test_images, batch_size=256, verbose=0),
                       dtype=np.float64)
    labels = np.asarray(data.test_labels, dtype=np.int64)
    evaluation = Evaluation.of_log_probabilities(np.log(np.clip(probs, 1e-12, 1.0)), labels)
    return evaluation, data, owner_model


def export_owner_model(
    owner_model: Any, folder: Path, sample_images: np.ndarray | None = None
) -> dict[str, str]:
    """Write the owner's model as ``model.keras`` (Keras) and ``saved_model/`` (TensorFlow
    SavedModel with a ``serve`` endpoint, for TF Serving) into the trusted node's folder, and
    ``sample_images.npy`` (raw uint8 test images, what a client sends) when given.

    Each is written beside its final name first and then renamed, so an interrupted export
    leaves the previous files or none, never half a model.
    """
    folder.mkdir(parents=True, exist_ok=True)
    keras_file = folder / MODEL_FILE
    staging = folder / f".{MODEL_FILE}.partial.keras"
    owner_model.save(staging)
    staging.replace(keras_file)
    saved_model = folder / SAVED_MODEL_DIR
    staging_dir = folder / f".{SAVED_MODEL_DIR}.partial"
    if staging_dir.exists():
        shutil.rmtree(staging_dir)
    owner_model.export(str(staging_dir), format="tf_saved_model", verbose=False)
    if saved_model.exists():
        shutil.rmtree(saved_model)
    staging_dir.replace(saved_model)
    files = {"keras": str(keras_file), "saved_model": str(saved_model)}
    if sample_images is not None:
        samples = folder / SAMPLE_IMAGES
        np.save(samples, np.asarray(sample_images, dtype=np.uint8))
        files["sample_images"] = str(samples)
    return files


def retrieve_and_evaluate(config: LabConfig, *, backend: Backend | None = None) -> RetrievalReport:
    """Move, open, evaluate; write retrieval.json, confusion_matrix.png, sample_predictions.png."""
    training = TrainingOutcome.load(config.run_dir)
    vault = training.vault if training is not None else {}
    location, sealed = move_to_trusted_node(config, backend, vault.get("vault_path"))
    checkpoint, provenance, opened, signed_by = _open(location, sealed, vault)
    trained = LabConfig.from_dict(training.config) if training and training.config else config
    evaluation, data, owner_model = evaluate_checkpoint(trained, checkpoint.payload)
    out = Path(config.run_dir)
    picks = np.arange(min(16, len(data.test_labels)))
    exported = export_owner_model(owner_model, _trusted_dir(config), data.test_images[picks])
    figures = {
        "confusion_matrix": str(out / "confusion_matrix.png"),
        "sample_predictions": str(out / "sample_predictions.png"),
    }
    render_confusion_matrix(
        data.test_labels, evaluation.predictions, CLASS_NAMES, figures["confusion_matrix"],
        title=f"global model, step {checkpoint.step}",
    )
    render_sample_predictions(
        data.test_images[picks], data.test_labels[picks], evaluation.predictions[picks],
        CLASS_NAMES, figures["sample_predictions"],
    )
    report = RetrievalReport(
        location, sealed, opened, checkpoint.step, provenance, evaluation.loss,
        evaluation.accuracy, evaluation.num_samples,
        training.test_accuracy if training is not None else None, figures, signed_by,
        exported,
    )
    (out / "retrieval.json").write_text(json.dumps(report.to_dict(), indent=2) + "\n")
    return report
