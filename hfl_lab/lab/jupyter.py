"""The lab's Jupyter side: its kernel (this environment's Python) and JupyterLab on notebooks/."""

from __future__ import annotations

import os
import sys
from pathlib import Path

__all__ = [
    "KERNEL_DISPLAY_NAME",
    "KERNEL_NAME",
    "NOTEBOOK_DIR",
    "ensure_kernel",
    "jupyter_lab_command",
]

NOTEBOOK_DIR = Path(__file__).resolve().parents[2] / "notebooks"
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
