"""kill -9 during a checkpoint write leaves the previous checkpoint loadable."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from hfl_lab.vault import ModelVault, new_passphrase
from tests.vault_support import make_vault, needs_cryptsetup, weights

pytestmark = needs_cryptsetup

REPO = Path(__file__).resolve().parents[1]

# The writer announces the moment it reaches a chosen point of the write and then stalls there,
# so the parent's SIGKILL lands exactly mid-write.
WRITER = textwrap.dedent("""
    import os, sys, time
    from pathlib import Path
    from hfl_lab.vault import ModelVault
    from hfl_lab.vault import journal

    point, volume, passphrase = sys.argv[1], Path(sys.argv[2]), sys.stdin.buffer.read()

    def stop_here():
        print("AT", point, flush=True)
        time.sleep(60)

    real_write_sectors, real_commit, real_os_write = (
        journal.write_sectors, journal.commit, os.write)
    calls = []

    def write_sectors(fd, runs):
        calls.append(1)
        if point == "in-place-data" and len(calls) == 1:
            # half of the new checkpoint's encrypted data reaches its (free) blocks
            run = runs[0]
            half = journal.SectorRun(run.offset, bytes(run.data)[: len(run.data) // 2])
            real_write_sectors(fd, [half])
            stop_here()
        if point == "after-commit" and len(calls) == 2:
            # the journal is committed; half of it has been copied into the volume
            real_write_sectors(fd, runs[: max(1, len(runs) // 2)])
            stop_here()
        real_write_sectors(fd, runs)

    def torn_write(fd, data):
        if len(data) >= 512:  # the journal's sector data: half of it, then the crash
            real_os_write(fd, bytes(data)[: len(data) // 2])
            stop_here()
        return real_os_write(fd, data)

    def commit(*args, **kwargs):
        if point == "before-commit":
            stop_here()
        if point == "journal-torn":
            os.write = torn_write
        real_commit(*args, **kwargs)

    journal.write_sectors = write_sectors
    journal.commit = commit
    vault = ModelVault.open(volume, passphrase, path_kind="userspace")
    vault.write_checkpoint(2, os.urandom(2_000_000), {"metrics": {"loss": 0.1}})
    print("DONE", flush=True)
""")


@pytest.mark.parametrize(
    "point", ["in-place-data", "journal-torn", "before-commit", "after-commit"]
)
def test_sigkill_mid_write_keeps_previous_checkpoint(tmp_path: Path, point: str) -> None:
    # Arrange
    volume, passphrase = tmp_path / "v.luks", new_passphrase()
    first = weights(1)
    with make_vault(volume, passphrase) as vault:
        vault.write_checkpoint(1, first, {"metrics": {"loss": 1.0}})
    writer = subprocess.Popen(
        [sys.executable, "-c", WRITER, point, str(volume)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    assert writer.stdin is not None and writer.stdout is not None
    writer.stdin.write(passphrase)
    writer.stdin.close()

    # Act: kill -9 once the writer is mid-write
    line = writer.stdout.readline().decode()
    writer.send_signal(signal.SIGKILL)
    writer.wait(timeout=30)

    # Assert
    assert line.startswith("AT"), line
    with ModelVault.open(volume, passphrase, path_kind="userspace") as vault:
        steps = [info.step for info in vault.list_checkpoints()]
        assert vault.checkpoint(1).payload == first
        latest = vault.latest_checkpoint()
    # before the commit point the new checkpoint never happened; after it, it is complete
    expected = [1, 2] if point == "after-commit" else [1]
    assert steps == expected
    assert latest.step == expected[-1]
    assert not (tmp_path / "v.luks.journal").exists()
