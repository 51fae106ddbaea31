"""The session's current run: the run folder notebook 04 trained in, as 05 and 06's default.

Each notebook has its own ``run_dir`` parameter, so a run folder changed in 04 used to be unseen
by 05 and 06, and 05 with a mistyped ``run_dir`` trained a new model silently. Now the run a
training notebook uses is recorded in ``current_run.json`` beside the run folders
(``<run_dir>/../current_run.json``, no secret in it), and a notebook whose ``run_dir`` is still the
notebooks' default (:data:`NOTEBOOK_RUN_DIR`) opens the recorded run instead, saying so. A
``run_dir`` set by hand (or by ``hfl-lab run``) is always used as given.
"""

from __future__ import annotations

import json
from pathlib import Path

from hfl_lab._exceptions import ConfigError
from hfl_lab.config import LabConfig

__all__ = ["NOTEBOOK_RUN_DIR", "known_runs", "record_current_run", "session_run"]

#: the ``run_dir`` every notebook's parameters cell starts with
NOTEBOOK_RUN_DIR = "../runs/lab"
CURRENT_FILE = "current_run.json"
#: what a finished training leaves in its run folder (hfl_lab.lab.training)
_TRAINING_RECORD = "training.json"


def _current_file(run_dir: str | Path) -> Path:
    return Path(run_dir).resolve().parent / CURRENT_FILE


def record_current_run(config: LabConfig) -> Path:
    """Make ``config.run_dir`` the session's current run (notebook 04 calls this)."""
    path = _current_file(config.run_dir)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"run_dir": str(Path(config.run_dir).resolve())}) + "\n",
                    encoding="utf-8")
    return path


def session_run(config: LabConfig) -> LabConfig:
    """``config`` with the session's current run when its ``run_dir`` is the notebooks'
    default; as given otherwise. Prints which run it is."""
    chosen = config
    if str(config.run_dir) == NOTEBOOK_RUN_DIR:
        try:
            recorded = json.loads(_current_file(config.run_dir).read_text(encoding="utf-8"))
            current = Path(str(recorded["run_dir"]))
        except (OSError, ValueError, KeyError, TypeError):
            current = None
        if current is not None and current.is_dir() and \
                current != Path(config.run_dir).resolve():
            chosen = config.replace(run_dir=str(current))
            print(f"run_dir: the session's current run {current} (set by notebook 04); set "
                  "run_dir to open another")
            return chosen
    print(f"run_dir: {Path(chosen.run_dir).resolve()}")
    return chosen


def known_runs(run_dir: str | Path) -> list[Path]:
    """Run folders beside ``run_dir`` that hold a finished training, newest first."""
    parent = Path(run_dir).resolve().parent
    if not parent.is_dir():
        return []
    runs = [p for p in parent.iterdir() if (p / _TRAINING_RECORD).is_file()]
    return sorted(runs, key=lambda p: (p / _TRAINING_RECORD).stat().st_mtime, reverse=True)


def missing_training(config: LabConfig) -> ConfigError:
    """The error for a ``run_dir`` that holds no finished training, naming the ones there are."""
    runs = known_runs(config.run_dir)
    listed = ", ".join(str(p) for p in runs[:8]) if runs else "none beside it"
    return ConfigError(
        f"{Path(config.run_dir).resolve()} holds no finished training (no {_TRAINING_RECORD}); "
        f"runs that do: {listed}.",
        fix="set run_dir to one of them, run notebook 04 with this run_dir first, or set "
        "train_if_missing=True to train one here.",
    )
