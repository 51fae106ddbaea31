"""``hfl-lab run``: notebooks 00-06 executed with papermill into one run folder, in order.

Every notebook gets the whole validated configuration as parameters (so a profile is never
overridden by a notebook's own defaults), writes into the same ``run_dir``, and is saved there
executed. The first failing notebook stops the sequence; its name and cell are reported.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hfl_lab._exceptions import ConfigError
from hfl_lab.config import LabConfig
from hfl_lab.lab.jupyter import KERNEL_NAME, NOTEBOOK_DIR, ensure_kernel
from hfl_lab.lab.summary import write_summary
from hfl_lab.owner import ensure_owner_secret

__all__ = [
    "NOTEBOOKS",
    "WORKSHOP_NOTEBOOKS",
    "LabRun",
    "NotebookRun",
    "notebook_parameters",
    "resolve_notebooks",
    "run_lab",
]

NOTEBOOKS = (
    "00_preflight",
    "01_coco_stack",
    "02_trust_and_volume",
    "03_image",
    "04_federated_training",
    "05_model_retrieval",
    "06_attacks_and_defenses",
)
#: notebooks outside ``hfl-lab run``'s sequence: 07 hosts a run on the room's network and waits
#: for attendees (headless, joiners on this machine stand in for them); run it on its own
WORKSHOP_NOTEBOOKS = ("07_workshop",)
EXECUTED_DIR = "notebooks"
RECORD = "run.json"


@dataclass
class NotebookRun:
    """One executed notebook: where it was saved, how long it took, how it ended."""

    name: str
    output: Path
    status: str = "pending"  # pending | ok | failed | skipped
    seconds: float = 0.0
    cell: int | None = None
    error: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "output": str(self.output),
            "status": self.status,
            "seconds": round(self.seconds, 2),
            "cell": self.cell,
            "error": self.error,
        }


@dataclass
class LabRun:
    """A whole lab run: its folder, configuration and notebooks."""

    run_dir: Path
    config: LabConfig
    notebooks: list[NotebookRun] = field(default_factory=list)
    started: float = field(default_factory=time.time)
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return all(n.status == "ok" for n in self.notebooks)

    @property
    def failed(self) -> NotebookRun | None:
        return next((n for n in self.notebooks if n.status == "failed"), None)

    def failure_message(self) -> str:
        """One line: which notebook and cell failed, and why."""
        bad = self.failed
        if bad is None:
            return ""
        where = f"cell {bad.cell}" if bad.cell is not None else "before its first cell"
        return f"notebook {bad.name} failed in {where}: {bad.error} (executed copy: {bad.output})"

    def to_dict(self) -> dict[str, Any]:
        return {
            "run_dir": str(self.run_dir),
            "ok": self.ok,
            "started": self.started,
            "seconds": round(self.seconds, 2),
            "config": self.config.to_dict(),
            "notebooks": [n.to_dict() for n in self.notebooks],
            "failure": self.failure_message(),
        }


def resolve_notebooks(names: Sequence[str] | None) -> list[str]:
    """Full notebook names from prefixes (``04`` → ``04_federated_training``), in lab order."""
    if not names:
        return list(NOTEBOOKS)
    chosen = []
    for name in names:
        matches = [n for n in NOTEBOOKS if n == name or n.startswith(f"{name}_")]
        if len(matches) != 1:
            raise ConfigError(
                f"no notebook {name!r}.", fix=f"use a number or name from {', '.join(NOTEBOOKS)}."
            )
        chosen.append(matches[0])
    return [n for n in NOTEBOOKS if n in chosen]


def _absolute(config: LabConfig) -> LabConfig:
    """Path parameters made absolute, so every kernel (whatever its cwd) finds the same files."""
    changes: dict[str, Any] = {}
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        if f.metadata.get("path") and isinstance(value, str) and value:
            path = Path(value).expanduser()
            if not path.is_absolute():
                changes[f.name] = str(path.resolve())
    return config.replace(**changes) if changes else config


def notebook_parameters(config: LabConfig) -> dict[str, Any]:
    """The papermill parameters of every notebook: the whole configuration, profile by name."""
    params = config.to_dict()
    params["profile"] = params.pop("profile_name")
    return params


class _KnownParameters(logging.Filter):
    """Papermill warns about parameters a notebook's parameters cell does not list; ours are
    all LabConfig parameters, validated in the notebook, so the warning is noise here."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("Passed unknown parameter")


_FILTER = _KnownParameters()


def _error_of(exc: BaseException) -> tuple[int | None, str]:
    from papermill.exceptions import PapermillExecutionError

    if isinstance(exc, PapermillExecutionError):
        evalue = " ".join(str(exc.evalue).split())
        return exc.exec_count, f"{exc.ename}: {evalue}"
    return None, f"{type(exc).__name__}: {' '.join(str(exc).split())}"


def run_lab(
    config: LabConfig,
    *,
    notebooks: Sequence[str] | None = None,
    notebook_dir: Path = NOTEBOOK_DIR,
    kernel_name: str | None = None,
    progress: Callable[[str], None] | None = None,
    cell_progress: bool = True,
) -> LabRun:
    """Execute the notebooks in order into ``config.run_dir``; stop at the first failure."""
    import papermill

    ensure_owner_secret()  # the kernels of notebooks 04 and 05 share the owner's credential
    config = _absolute(config)
    run_dir = Path(config.run_dir)
    (run_dir / EXECUTED_DIR).mkdir(parents=True, exist_ok=True)
    config.to_yaml(run_dir / "lab_config.yaml")
    say = progress or (lambda line: print(line, file=sys.stderr, flush=True))
    names = resolve_notebooks(notebooks)
    for name in names:
        source = notebook_dir / f"{name}.ipynb"
        if not source.is_file():
            raise ConfigError(f"notebook {source} does not exist.", fix="check out notebooks/.")
    kernel = kernel_name or KERNEL_NAME
    if kernel_name is None:
        ensure_kernel()
    run = LabRun(run_dir, config)
    run.notebooks = [NotebookRun(n, run_dir / EXECUTED_DIR / f"{n}.ipynb") for n in names]
    params = notebook_parameters(config)
    logging.getLogger("papermill").addFilter(_FILTER)
    began = time.monotonic()
    for i, nb in enumerate(run.notebooks, 1):
        if run.failed is not None:
            nb.status = "skipped"
            continue
        say(f"[{i}/{len(names)}] {nb.name} ...")
        start = time.monotonic()
        try:
            papermill.execute_notebook(
                str(notebook_dir / f"{nb.name}.ipynb"),
                str(nb.output),
                parameters=params,
                kernel_name=kernel,
                cwd=str(notebook_dir),
                progress_bar=cell_progress,
                log_output=False,
            )
        except Exception as exc:  # noqa: BLE001 - any failure is reported with its notebook
            nb.status = "failed"
            nb.cell, nb.error = _error_of(exc)
        else:
            nb.status = "ok"
        nb.seconds = time.monotonic() - start
        mark = "ok" if nb.status == "ok" else f"FAILED in cell {nb.cell}: {nb.error}"
        say(f"[{i}/{len(names)}] {nb.name}: {mark} ({nb.seconds:.1f} s)")
        run.seconds = time.monotonic() - began
        _save(run)
    run.seconds = time.monotonic() - began
    _save(run)
    return run


def _save(run: LabRun) -> None:
    (run.run_dir / RECORD).write_text(json.dumps(run.to_dict(), indent=2) + "\n")
    write_summary(run)
