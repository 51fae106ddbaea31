"""Shared fixtures: where the read-only fixtures in ../shared live; a simulated TD per module."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from hfl_lab.tee import SimulatedPlatform, SimulatedTdProvider, TdMeasurements
    from tests.local_support import FinishedRun

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session", autouse=True)
def shared_bytecode_cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """One bytecode cache for every Python process the tests start, where the environment
    forbids writing bytecode beside the sources (PYTHONDONTWRITEBYTECODE=1, as in CI, whose
    venv is installed with pip --no-compile).

    Without it each of the suite's processes that imports TensorFlow (every ps0 and worker of
    every end-to-end run, each restart, each notebook kernel) compiled TensorFlow's and Keras'
    sources again: ~6 of its ~10 CPU seconds of start-up. With PYTHONPYCACHEPREFIX the first
    process writes the bytecode into this session's temporary folder, not into the venv or the
    checkout (whose files the simulated TDs measure), and the others read it."""
    if not os.environ.get("PYTHONDONTWRITEBYTECODE") or os.environ.get("PYTHONPYCACHEPREFIX"):
        yield  # bytecode is written (beside the sources, or where the environment says)
        return
    saved = os.environ.pop("PYTHONDONTWRITEBYTECODE")
    os.environ["PYTHONPYCACHEPREFIX"] = str(tmp_path_factory.mktemp("bytecode"))
    try:
        yield
    finally:
        os.environ.pop("PYTHONPYCACHEPREFIX", None)
        os.environ["PYTHONDONTWRITEBYTECODE"] = saved


@pytest.fixture(scope="session", autouse=True)
def owner_session() -> None:
    """One lab session for the whole test run: every notebook kernel a test starts inherits
    the owner secret, as under `hfl-lab run` (see hfl_lab.owner)."""
    from hfl_lab.owner import ensure_owner_secret

    ensure_owner_secret()
SHARED = Path(os.environ.get("HFL_LAB_SHARED", REPO.parent / "shared"))


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    if not SHARED.is_dir():
        pytest.skip(f"fixtures folder {SHARED} not found: put ../shared beside the clone")
    return SHARED


@pytest.fixture(scope="session")
def attestation_dir(shared_dir: Path) -> Path:
    return shared_dir / "attestation"


@pytest.fixture(scope="session")
def cifar_dir(shared_dir: Path) -> Path:
    return shared_dir / "data" / "cifar-10-subset"


def read_evidence_file(path: Path) -> bytes:
    """A fixture quote: raw bytes, or hex text with or without 0x."""
    data = path.read_bytes()
    if path.suffix == ".hex":
        text = data.decode().strip().removeprefix("0x")
        return bytes.fromhex(text)
    return data


@pytest.fixture(scope="session")
def lab_run(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """`hfl-lab run --profile quick` with small overrides: the whole lab, headless, once per test
    session. The tests that use it only read its run folder (the notebooks' outputs, the R6
    secret scan), so one run serves them all."""
    from tests.local_support import SMALL_LAB_RUN

    run_dir = tmp_path_factory.mktemp("lab") / "run"
    argv = [sys.executable, "-m", "hfl_lab.cli", "run", "--profile", "quick", "-q"]
    for name, value in {**SMALL_LAB_RUN, "run_dir": run_dir}.items():
        argv += ["-p", f"{name}={value}"]
    env = {**os.environ, "KERAS_BACKEND": "tensorflow", "MPLBACKEND": "agg",
           "PYTHONHASHSEED": "0"}
    done = subprocess.run(argv, cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=900, check=False)
    assert done.returncode == 0, f"hfl-lab run failed:\n{done.stderr[-4000:]}"
    yield run_dir


@pytest.fixture(scope="session")
def sync_run(tmp_path_factory: pytest.TempPathFactory, cifar_dir: Path) -> FinishedRun:
    """One sync run of ``quick_config`` (ResNet-8, the trust service, ps0 and 2 workers, the
    model sealed in its volume) for the whole session. tests/test_local_backend.py checks the
    training and the mesh on it, tests/test_local_vault.py the sealed model; both only read
    what it left, and each run of its own cost ~25 s of a 2-core CI."""
    from tests.local_support import quick_config, run_to_the_end

    tmp = tmp_path_factory.mktemp("sync")
    return run_to_the_end(quick_config(tmp, cifar_dir, aggregation="sync", vault_size_mb=16))


# Times inside / outside the collateral windows in ../shared/attestation/README.md
TDX_QUOTE_IN_WINDOW = 1750329147 + 3600
TDX_QUOTE_AFTER_WINDOW = 1752919234 + 3600
OUTDATED_IN_WINDOW = 1771412331 + 3600  # 2026-02-18T10:58:51Z + 1 h
SGX_IN_WINDOW = 1750330571 + 3600  # 2025-06-19T10:56:11Z + 1 h


# -- a simulated TD for the requesting module's ROLE (helpers in tests/td_support.py) ----------


@pytest.fixture(scope="module")
def platform() -> SimulatedPlatform:
    """The lab's simulated platform (``td_support.PLATFORM``)."""
    from tests.td_support import PLATFORM

    return PLATFORM


@pytest.fixture(scope="module")
def measurements(request: pytest.FixtureRequest) -> TdMeasurements:
    """The measurements of the TD of the role the test module names in ``ROLE``."""
    from tests.td_support import measured

    return measured(request.module.ROLE)


@pytest.fixture(scope="module")
def provider(platform: SimulatedPlatform, measurements: TdMeasurements) -> SimulatedTdProvider:
    """Evidence from that TD, signed by the lab's platform."""
    from hfl_lab.tee import SimulatedTdProvider

    return SimulatedTdProvider(platform, measurements)
