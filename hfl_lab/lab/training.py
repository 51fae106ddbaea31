"""Notebook 04: launch the trust service, ps0 and the workers, and watch them train, live.

The backend's event stream drives the dashboard (loss and accuracy, step time, attestation
matrix, progress bar); nothing is read from logs. The run's record is in ``run_dir``:
loss.png, step_time.png, attestation_matrix.png, metrics.json, events.jsonl and training.json.
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hfl_lab._exceptions import BackendError, ConfigError, HflLabError
from hfl_lab.backends import Backend, create_backend
from hfl_lab.config import LabConfig
from hfl_lab.dashboard import Dashboard
from hfl_lab.dashboard._files import jsonable
from hfl_lab.events import LabEvent
from hfl_lab.lab.notebook import Table, TableReport
from hfl_lab.lab.session import missing_training, record_current_run
from hfl_lab.lab.watch import RunWatch
from trainer.data import load_cifar10

__all__ = ["TrainingOutcome", "ensure_trained", "run_training", "total_steps"]

TRAINING_RECORD = "training.json"
READY_TIMEOUT_S = 300.0


def total_steps(config: LabConfig) -> int:
    """Parameter-server steps of this run (``epochs`` converted with the training-set size)."""
    if config.steps is not None:
        return config.steps
    data = load_cifar10(config.require_data_path(), sha256=config.data_sha256)
    return config.total_steps(len(data.train_labels))


@dataclass(repr=False)  # shown as its table (TableReport)
class TrainingOutcome(TableReport):
    """How the run went: the backend's result, the curves' ends, where everything is."""

    run_dir: Path
    total_steps: int
    seconds: float
    result: dict[str, Any]
    losses: dict[str, tuple[float, float]] = field(default_factory=dict)
    attestations: int = 0
    refused: int = 0
    simulated: bool = False
    #: the LabConfig of the run (retrieval rebuilds the model from it)
    config: dict[str, Any] = field(default_factory=dict)
    #: where the sealed model and the owner's credential are (see ``VAULT_ATTRIBUTES``)
    vault: dict[str, Any] = field(default_factory=dict)

    @property
    def test_accuracy(self) -> float | None:
        value = (self.result.get("evaluation") or {}).get("accuracy")
        return float(value) if isinstance(value, int | float) else None

    def table(self) -> Table:
        table = Table(("", "value"), title="federated training: result")
        table.add("steps", f"{self.result.get('final_step', '?')} of {self.total_steps}")
        for role, (first, last) in sorted(self.losses.items()):
            table.add(f"{role} loss", f"{first:.3f} → {last:.3f}")
        accuracy = self.test_accuracy
        table.add("test accuracy (global model)", "n/a" if accuracy is None else f"{accuracy:.1%}")
        table.add("checkpoint step", self.result.get("checkpoint_step"))
        table.add("attestations", f"{self.attestations} ({self.refused} refused)")
        table.add("wall time", f"{self.seconds:.0f} s")
        table.add("run folder", self.run_dir)
        if self.simulated:
            table.note = "SIMULATED TDs: the verdicts prove what ran, not that it ran on TDX."
        return table

    def to_dict(self) -> dict[str, Any]:
        return {
            "run_dir": str(self.run_dir),
            "total_steps": self.total_steps,
            "seconds": self.seconds,
            "result": self.result,
            "losses": {r: list(v) for r, v in self.losses.items()},
            "attestations": self.attestations,
            "refused": self.refused,
            "simulated": self.simulated,
            "config": self.config,
            "vault": self.vault,
        }

    def save(self) -> Path:
        path = self.run_dir / TRAINING_RECORD
        path.write_text(json.dumps(jsonable(self.to_dict()), indent=2) + "\n", encoding="utf-8")
        return path

    @classmethod
    def load(cls, run_dir: str | Path) -> TrainingOutcome | None:
        """The record a finished training left in ``run_dir``, or None."""
        path = Path(run_dir) / TRAINING_RECORD
        if not path.is_file():
            return None
        raw = json.loads(path.read_text(encoding="utf-8"))
        return cls(
            Path(raw["run_dir"]), raw["total_steps"], raw["seconds"], raw["result"],
            {r: (v[0], v[1]) for r, v in raw.get("losses", {}).items()},
            raw.get("attestations", 0), raw.get("refused", 0), raw.get("simulated", False),
            raw.get("config", {}), raw.get("vault", {}),
        )


def _result_dict(result: Any) -> dict[str, Any]:
    if result is None:
        return {}
    if dataclasses.is_dataclass(result) and not isinstance(result, type):
        raw = {f.name: getattr(result, f.name) for f in dataclasses.fields(result)}
    elif isinstance(result, Mapping):
        raw = dict(result)
    else:
        raw = dict(vars(result))
    out: dict[str, Any] = jsonable(raw)
    return out


#: backend attributes that say where the sealed model is and what the owner's trusted node needs:
#: the trust service's sealed state, the run's public owner salt (the owner credential derives
#: from it and the session's owner secret, see hfl_lab.owner) and the public ``trust/`` folder
#: that verifies ps0's provenance signatures offline
VAULT_ATTRIBUTES = ("vault_path", "trust_state_path", "owner_salt_path", "trust_dir")


def _vault_record(backend: Backend) -> dict[str, Any]:
    """Where the backend left the sealed model and what opens and verifies it (paths only,
    never a key)."""
    record: dict[str, Any] = {}
    for name in VAULT_ATTRIBUTES:
        value = getattr(backend, name, None)
        if value and (name != "vault_path" or Path(value).exists()):
            record[name] = str(value)
    return record


def run_training(
    config: LabConfig, *, backend: Backend | None = None, keep_running: bool = False
) -> tuple[TrainingOutcome, Backend]:
    """Start the run, show it live, and return its outcome (training.json in ``run_dir``).

    The backend is torn down at the end unless ``keep_running`` (then the caller tears it down,
    e.g. after retrieving the model from the still-running trust service).
    """
    steps = total_steps(config)
    run_dir = Path(config.run_dir)
    previous = TrainingOutcome.load(run_dir)
    if previous is not None:  # its checkpoints would make ps0 resume a run that has ended
        raise ConfigError(
            f"{run_dir} already holds a finished training "
            f"({previous.result.get('final_step', '?')} steps).",
            fix="set run_dir to a new folder (e.g. ../runs/lab-2), or delete this one to train "
            "again.",
        )
    run_dir.mkdir(parents=True, exist_ok=True)
    backend = backend or create_backend(config)
    failed = [c for c in backend.preflight() if not c.ok]
    if failed:
        first = failed[0]
        raise BackendError(
            f"the {backend.name} backend cannot start: {first.name}: {first.detail}",
            fix=first.fix or "run notebook 00 (preflight) for every check.",
        )
    began = time.monotonic()
    dashboard = Dashboard(run_dir, total_steps=steps)
    try:
        watch = RunWatch(backend, dashboard, config)  # events shown from the first second
        watch.start(READY_TIMEOUT_S)
        done = watch.until_done()
        result = _result_dict(getattr(backend, "result", None)) or {"details": done}
        final = result.get("final_step") or done.get("version") or steps
        dashboard.feed(
            LabEvent("progress", "ps0", {"done": final, "total": steps, "unit": "steps",
                                         "label": "training"})
        )
    except BaseException:
        dashboard.close()
        backend.teardown()
        raise
    dashboard.close()
    collect = getattr(backend, "collect_sealed_model", None)
    if callable(collect):  # the volume and the sealed state to the owner's node (and its counter)
        try:
            collect()
        except HflLabError as error:  # no teardown: it would delete the only copy
            raise BackendError(
                f"training finished, but the sealed model could not be copied to "
                f"{run_dir}: {error.message}",
                fix="the run stays deployed so nothing is lost: fix the cause, then call "
                "collect_sealed_model() and teardown() on the backend (or kubectl cp the "
                "volume and delete the namespace).",
            ) from None
    vault = _vault_record(backend)
    if not keep_running:
        backend.teardown()
    state = dashboard.state
    losses = {}
    for role, series in state.workers.items():
        values = [v for v in series["loss"] if v is not None]
        if values:
            losses[role] = (values[0], values[-1])
    outcome = TrainingOutcome(
        run_dir, steps, time.monotonic() - began, result, losses,
        len(state.attestations), len(state.refused), state.simulated, config.to_dict(), vault,
    )
    outcome.save()
    record_current_run(config)  # notebooks 05 and 06 open this run by default
    return outcome, backend


def ensure_trained(config: LabConfig, *, train_if_missing: bool = False) -> TrainingOutcome:
    """The finished training in ``run_dir`` (notebook 04's). When there is none: train one with
    ``train_if_missing``, else a ``ConfigError`` naming the run folders that have one (a
    mistyped ``run_dir`` must not silently evaluate a model that is not the user's)."""
    found = TrainingOutcome.load(config.run_dir)
    if found is not None:
        print(f"opening the training in {Path(config.run_dir).resolve()}: "
              f"{found.result.get('final_step')} steps")
        return found
    if not train_if_missing:
        raise missing_training(config)
    print(f"no finished training in {config.run_dir}: training one first (train_if_missing)")
    outcome, _ = run_training(config)
    return outcome
