"""The lab's Jupyter side: its kernel (this environment's Python) and JupyterLab on a workspace.

JupyterLab does not serve the tracked notebooks: autosave would write outputs into the repository.
``hfl-lab lab`` serves an attendee's workspace instead (:func:`prepare_workspace`):
``workspace/notebooks/`` holds copies of the notebooks and ``workspace/runs/`` the run folders
they write (their ``run_dir`` default, ``../runs/lab``, lands there), so the file browser reaches
every plot, log and ``metrics.json``, ``git status`` stays clean, and ``hfl-lab lab --fresh``
starts again from the tracked notebooks.
"""

from __future__ import annotations

import os
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

__all__ = [
    "KERNEL_DISPLAY_NAME",
    "KERNEL_NAME",
    "NOTEBOOK_DIR",
    "WORKSPACE_DIR",
    "Workspace",
    "ensure_kernel",
    "jupyter_lab_command",
    "prepare_workspace",
]

REPO_DIR = Path(__file__).resolve().parents[2]
NOTEBOOK_DIR = REPO_DIR / "notebooks"
#: the attendee's copy of the notebooks and their run folders (not tracked: .gitignore)
WORKSPACE_DIR = REPO_DIR / "workspace"
KERNEL_NAME = "hfl-lab"
KERNEL_DISPLAY_NAME = "HFL-TDX Lab (Python 3)"


def ensure_kernel(*, force: bool = False) -> str:
    """Register this interpreter as the ``hfl-lab`` kernel in ``sys.prefix`` (the venv).

    Returns the kernel's folder. Nothing is written when it is already registered for this
    interpreter, unless ``force``.
    """
    from jupyter_client.kernelspec import KernelSpecManager, NoSuchKernel

    manager = KernelSpecManager()
    if not force:
        try:
            spec = manager.get_kernel_spec(KERNEL_NAME)
        except NoSuchKernel:
            pass
        else:
            if spec.argv and Path(spec.argv[0]) == Path(sys.executable):
                return str(spec.resource_dir)
    from ipykernel.kernelspec import install

    folder: str = install(
        kernel_name=KERNEL_NAME,
        display_name=KERNEL_DISPLAY_NAME,
        prefix=sys.prefix,
        env={"KERAS_BACKEND": "tensorflow", "PYTHONHASHSEED": "0"},
    )
    return folder


@dataclass(frozen=True)
class Workspace:
    """What ``hfl-lab lab`` serves: ``root`` with ``notebooks/`` and ``runs/`` in it."""

    root: Path
    copied: tuple[str, ...]
    kept: tuple[str, ...]

    @property
    def notebooks(self) -> Path:
        return self.root / "notebooks"

    @property
    def runs(self) -> Path:
        return self.root / "runs"


def prepare_workspace(root: Path = WORKSPACE_DIR, *, fresh: bool = False,
                      source: Path = NOTEBOOK_DIR) -> Workspace:
    """Copy the tracked notebooks into ``root/notebooks`` (those missing there; all of them,
    replacing the attendee's edits, with ``fresh``) and make ``root/runs``. With ``fresh`` the
    run folders are kept: they hold trained models; delete ``root/runs`` to drop them."""
    notebooks = root / "notebooks"
    notebooks.mkdir(parents=True, exist_ok=True)
    (root / "runs").mkdir(exist_ok=True)
    copied, kept = [], []
    for tracked in sorted(source.glob("*.ipynb")):
        target = notebooks / tracked.name
        if target.exists() and not fresh:
            kept.append(tracked.name)
            continue
        shutil.copyfile(tracked, target)
        copied.append(tracked.name)
    if fresh:
        shutil.rmtree(notebooks / ".ipynb_checkpoints", ignore_errors=True)
    return Workspace(root, tuple(copied), tuple(kept))


def jupyter_lab_command(
    *,
    notebook_dir: Path = NOTEBOOK_DIR,
    port: int = 8888,
    ip: str = "127.0.0.1",
    open_browser: bool = False,
    token: str | None = None,
) -> list[str]:
    """The JupyterLab command line serving ``notebook_dir`` with this environment."""
    argv = [
        sys.executable,
        "-m",
        "jupyterlab",
        f"--ServerApp.root_dir={notebook_dir}",
        f"--ServerApp.ip={ip}",
        f"--ServerApp.port={port}",
        "--ServerApp.port_retries=0",
        f"--ServerApp.open_browser={open_browser}",
        f"--MappingKernelManager.default_kernel_name={KERNEL_NAME}",
    ]
    if token is not None:
        argv.append(f"--IdentityProvider.token={token}")
    if hasattr(os, "geteuid") and os.geteuid() == 0:
        argv.append("--allow-root")  # containers and CI often run as root
    return argv
