"""R5: a full model volume and a read-only run folder give clear errors (one sentence naming the
problem and the fix), and no partial checkpoint ever replaces a good one.

No root-only trick: the volume fills up because it is small (the lab's 8 MB minimum against
~0.6 MB checkpoints every 2 steps); the run folder is made read-only with ``chmod`` when the
tests run as a user, and with the immutable attribute (``chattr +i``, which stops root too) when
they run as root, as they may in CI.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from hfl_lab import HflLabError
from hfl_lab.backends.local import LocalBackend
from hfl_lab.events import LabEvent
from tests.local_support import quick_config
from tests.reliability.fault_support import audit_checkpoints, written_steps
from tests.reliability_report import record

pytestmark = pytest.mark.slow


def test_a_full_model_volume_is_named_and_keeps_every_good_checkpoint(
    tmp_path: Path, cifar_dir: Path
) -> None:
    config = quick_config(tmp_path, cifar_dir, steps=40, checkpoint_every=2, vault=True,
                          vault_size_mb=8)
    events: list[LabEvent] = []
    with LocalBackend(config) as backend:
        result = backend.run_training(on_event=events.append)
        audit = audit_checkpoints(backend)

    failures = [str(e.data["message"]) for e in events if e.kind == "log"
                and e.source == "ps0" and e.data.get("level") == "error"
                and "checkpoint" in str(e.data.get("message", ""))]
    written = written_steps(events)
    clear = bool(failures) and all("full" in m and "Fix:" in m for m in failures)
    held = (result.final_step == config.steps and bool(failures) and clear
            and not audit.corrupt and audit.intact == sorted(written)
            and result.checkpoint_step == audit.newest)
    record("R5", "model volume full", tried=1, held=int(held), lost=len(audit.corrupt),
           failed_writes=len(failures), checkpoints_intact=len(audit.intact),
           newest_intact=audit.newest, message=failures[0] if failures else None)

    assert result.final_step == config.steps, "training went on without its checkpoints"
    assert failures, "an 8 MB volume cannot hold 20 checkpoints: some writes must fail"
    assert clear, f"not one clear sentence naming the problem and the fix: {failures[0]}"
    assert not audit.corrupt, audit.corrupt
    assert audit.intact == sorted(written), "exactly the checkpoints reported written are there"
    assert result.checkpoint_step == audit.newest, "done names the newest checkpoint on disk"


@contextlib.contextmanager
def read_only(folder: Path) -> Iterator[str]:
    """Make ``folder`` read-only for this process, whoever it runs as; yields how."""
    if os.geteuid() != 0:
        folder.chmod(0o555)
        try:
            yield "chmod 0555"
        finally:
            folder.chmod(0o755)
        return
    chattr = shutil.which("chattr")
    if chattr is None or subprocess.run([chattr, "+i", str(folder)],
                                        capture_output=True).returncode != 0:
        pytest.skip("running as root where chattr +i is not available: no way to make a "
                    "folder read-only for root without mounting")
    try:
        yield "chattr +i"
    finally:
        subprocess.run([chattr, "-i", str(folder)], check=True)


def test_a_read_only_run_folder_is_refused_with_the_fix_before_anything_starts(
    tmp_path: Path, cifar_dir: Path
) -> None:
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    config = quick_config(tmp_path, cifar_dir)
    error: Exception | None = None
    with read_only(run_dir) as how:
        backend = LocalBackend(config)
        try:
            checks = {c.name: c for c in backend.preflight()}
            backend.start()
        except Exception as e:  # which exception it is, is the finding
            error = e
        finally:
            backend.teardown()
    message = f"{type(error).__name__}: {error}"
    held = (not checks["run folder"].ok and isinstance(error, HflLabError)
            and "Fix:" in message and str(run_dir) in message)
    record("R5", "read-only run folder", tried=1, held=int(held), lost=0, mechanism=how,
           preflight=str(checks["run folder"]), message=message)
    assert not checks["run folder"].ok, "preflight names the read-only run folder"
    assert isinstance(error, HflLabError), f"not a clear error: {message}"
    assert str(run_dir) in message and "Fix:" in message, message
