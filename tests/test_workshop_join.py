"""Joining a hosted run (issue 23 item 3): a joiner verifies the host, enrolls with its link,
trains its shard and the loss falls; a joiner whose worker code was edited is refused at
attestation, with MR_TD named on the host's board and in its own output; a tampered link gets
nothing from the host."""

from __future__ import annotations

import dataclasses
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from hfl_lab import PolicyViolation
from hfl_lab.cli import main
from hfl_lab.events import LabEvent
from hfl_lab.lab.joining import connect_host, join_run
from hfl_lab.lab.workshop import HostedRun
from tests.local_support import quick_config

HOST = "127.0.0.23"
REPO = Path(__file__).resolve().parents[1]


def _edited_checkout(tmp_path: Path) -> Path:
    """A copy of the workload whose worker code differs by one comment line."""
    root = tmp_path / "edited"
    for package in ("hfl_lab", "trainer"):
        shutil.copytree(REPO / package, root / package,
                        ignore=shutil.ignore_patterns("__pycache__"))
    with (root / "trainer" / "worker.py").open("a") as f:
        f.write("# an attendee's edit\n")
    return root


def _drain(events, until=lambda e: False) -> list[LabEvent]:
    seen = []
    for event in events:
        seen.append(event)
        if until(event):
            break
    return seen


@pytest.mark.slow
def test_a_joiner_trains_and_a_joiner_with_edited_code_is_refused(
    tmp_path: Path, cifar_dir: Path
) -> None:
    config = quick_config(tmp_path, cifar_dir, steps=40, vault=False, checkpoint_every=0)
    with HostedRun(config, address=HOST, slots=2) as run:
        links = run.start(timeout_s=180)

        # a tampered link: the host's trust service hands it nothing
        forged = dataclasses.replace(links[1], slot="worker0")
        with connect_host(forged) as trust, pytest.raises(PolicyViolation,
                                                           match="altered or was not issued"):
            trust.enroll(forged.encode())

        # edited worker code: enrolled (the link is valid) but refused at attestation
        bad = join_run(links[1].encode(), run_dir=tmp_path / "joiner1",
                       data_path=str(cifar_dir), workload_root=_edited_checkout(tmp_path))
        bad_events = _drain(bad.events(idle_timeout_s=180))
        assert bad.process.returncode not in (0, None)
        assert "mr_td" in bad.process.last_lines(40)

        # an honest joiner trains alone (K of the live workers) until the run is done
        good = join_run(links[0].encode(), run_dir=tmp_path / "joiner0",
                        data_path=str(cifar_dir))
        worker_events = _drain(good.events(idle_timeout_s=300))
        host_lines = [line for _, line in run.events(idle_timeout_s=120) if line]
        result = run.backend.result
        board = {s["slot"]: s for s in run.board.rows()}
        good.stop()
        bad.stop()

    assert result is not None and result.final_step == 40
    assert good.process.returncode == 0
    losses = [e.data["loss"] for e in worker_events if e.kind == "metrics"]
    assert len(losses) >= 30
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert last < first, f"the loss did not fall: {first:.3f} -> {last:.3f}"
    assert board["worker0"]["state"] in ("joined", "training", "done")
    assert board["worker1"]["state"] == "refused" and "mr_td" in board["worker1"]["detail"]
    assert any(line.startswith("worker1: refused") for line in host_lines)
    assert not [e for e in bad_events if e.kind == "metrics"], "the refused joiner trained"


def test_join_refuses_a_malformed_link_with_exit_code_2(capsys) -> None:
    code = main(["join", "hfl-join:eyJ2IjoxLCJ0cnVzdCI6"])

    assert code == 2
    assert "fresh link" in capsys.readouterr().err


@pytest.mark.slow
def test_a_joiner_leaves_on_ctrl_c_and_a_late_joiner_finishes_the_run(
    tmp_path: Path, cifar_dir: Path
) -> None:
    config = quick_config(tmp_path, cifar_dir, steps=60, vault=False, checkpoint_every=0)
    with HostedRun(config, address=HOST, slots=2) as run:
        links = run.start(timeout_s=180)
        env = {**os.environ, "PYTHONPATH": str(REPO)}
        cli = subprocess.Popen(
            [sys.executable, "-m", "hfl_lab.cli", "join", links[0].encode(),
             "--data", str(cifar_dir), "--run-dir", str(tmp_path / "joiner0")],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
        try:
            assert cli.stdout is not None
            steps = []
            for line in cli.stdout:
                if " step " in line:
                    steps.append(line)
                if len(steps) >= 5:
                    break
            cli.send_signal(signal.SIGINT)
            _, err = cli.communicate(timeout=120)
        finally:
            if cli.poll() is None:
                cli.kill()
        late = join_run(links[1].encode(), run_dir=tmp_path / "joiner1",
                        data_path=str(cifar_dir))
        late_events = _drain(late.events(idle_timeout_s=300))
        _drain(run.events(idle_timeout_s=120))
        result = run.backend.result
        late.stop()

    assert len(steps) == 5, err
    assert cli.returncode == 0, err
    assert "leaving the run" in err
    assert result is not None and result.final_step == 60
    late_steps = [e.data["step"] for e in late_events if e.kind == "metrics"]
    assert late_steps and min(late_steps) > 1, "the late joiner started from the run's step"
    assert late.process.returncode == 0
