"""Preflight of the local backend: what this machine needs to run a lab as local processes."""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

from hfl_lab._exceptions import HflLabError
from hfl_lab.backends.base import PreflightCheck
from hfl_lab.backends.local.processes import free_port
from hfl_lab.config import LabConfig
from hfl_lab.image import PIPELINE_TOOLS, SYSTEM_DEPS_FIX, missing_tools
from hfl_lab.image.container import tool_inventory, tool_summary
from trainer.data import BATCHES_DIR, TEST_FILE, TRAIN_FILES


def local_checks(
    config: LabConfig, *, python: str, run_dir: Path, processes: int
) -> list[PreflightCheck]:
    """Python, packages, data, loopback, run folder, cores, the workload image's tools and
    evidence for a local run."""
    checks = [
        PreflightCheck(
            "python", sys.version_info >= (3, 11),
            f"{sys.version.split()[0]} at {python}", "use Python 3.11 or newer"),
    ]
    missing = [m for m in ("grpc", "tensorflow", "keras", "cryptography", "dcap_qvl")
               if importlib.util.find_spec(m) is None]
    checks.append(PreflightCheck(
        "packages", not missing,
        "all installed" if not missing else f"missing: {', '.join(missing)}",
        "run `make install` (it installs requirements.txt into .venv)"))
    checks.append(_data_check(config))
    try:
        free_port()
        checks.append(PreflightCheck("loopback", True, "127.0.0.1 accepts listeners"))
    except OSError as e:
        checks.append(PreflightCheck("loopback", False, f"cannot listen on 127.0.0.1: {e}",
                                     "allow loopback TCP in this container"))
    writable = _writable(run_dir)
    checks.append(PreflightCheck(
        "run folder", writable, str(run_dir),
        "choose a writable run_dir (parameter run_dir)"))
    cpus = os.cpu_count() or 1
    checks.append(PreflightCheck(
        "cpu", True,
        f"{cpus} cores for {processes} participant processes"
        + (" (they will share cores; training is slower)" if cpus < processes else "")))
    checks.append(_image_tools_check(config))
    checks.append(PreflightCheck(
        "container tools", True,
        tool_summary(tool_inventory()) + " (local runs need skopeo and umoci; buildah or "
        "docker build the cluster's image, cosign adds a sigstore signature)"))
    checks.append(PreflightCheck(
        "evidence", config.allow_simulated,
        "SIMULATED TDs (no TDX on this backend): real quote format, lab-local keys, "
        "NOT secure" if config.allow_simulated else "simulated TDs are not allowed",
        "set allow_simulated=True for the local backend, or use the kubernetes backend"))
    return checks


def _image_tools_check(config: LabConfig) -> PreflightCheck:
    """Which of the workload image's tools are here; a failure only when the run needs them
    (``workload_image=on``); otherwise notebook 03 says which step it skipped."""
    missing = missing_tools()
    found = [name for name in PIPELINE_TOOLS if name not in missing]
    detail = (f"found {', '.join(found) or 'none'}"
              + (f"; missing {', '.join(missing)}" if missing else "")
              + f" (workload_image={config.workload_image})")
    return PreflightCheck("image tools", not (missing and config.workload_image == "on"),
                          detail, SYSTEM_DEPS_FIX)


def _data_check(config: LabConfig) -> PreflightCheck:
    try:
        root = config.require_data_path()
        folder = root if root.name == BATCHES_DIR else root / BATCHES_DIR
        absent = [n for n in (*TRAIN_FILES, TEST_FILE) if not (folder / n).is_file()]
    except HflLabError as e:
        return PreflightCheck("data", False, e.message, e.fix or "")
    if absent:
        return PreflightCheck("data", False, f"{folder} lacks {', '.join(absent)}",
                              "point data_path at the CIFAR-10 python version")
    return PreflightCheck("data", True, f"CIFAR-10 at {folder}")


def _writable(folder: Path) -> bool:
    probe = folder
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    return os.access(probe, os.W_OK)
