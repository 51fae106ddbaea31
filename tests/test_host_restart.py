"""A host restart in a hosted run (issue 23 item 4): the instructor's trust service and ps0
crash (kill -9) while a joiner is in; the host brings both back, reopens enrollment with the
same key, and the joiners carry on: the one that was in reconnects to ps0, a late one enrolls
with the link it already had, and the run completes.

The crash happens while the run holds (the host wants two live workers and has one), so no
step can complete meanwhile: nothing here depends on timing.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from hfl_lab.backends.local.joiner import JoinedWorker
from hfl_lab.events import LabEvent
from hfl_lab.lab.joining import join_run
from hfl_lab.lab.workshop import HostedRun
from tests.local_support import quick_config

HOST = "127.0.0.48"
STEPS = 20


def _until(events: Iterator[tuple[LabEvent, str | None]], lines: list[str],
           done: Callable[[list[str]], bool], label: str) -> None:
    """Read the host's events, keeping its lines, until ``done`` holds for them."""
    if done(lines):
        return
    for _, line in events:
        if line:
            lines.append(line)
            if done(lines):
                return
    raise AssertionError(f"the run's events ended before {label}:\n" + "\n".join(lines[-15:]))


@pytest.mark.slow
def test_a_crashed_trust_service_and_ps0_come_back_and_the_joiners_carry_on(
    tmp_path: Path, cifar_dir: Path
) -> None:
    config = quick_config(tmp_path, cifar_dir, steps=STEPS, vault=False, checkpoint_every=0)
    joiners: list[JoinedWorker] = []
    lines: list[str] = []
    try:
        with HostedRun(config, address=HOST, slots=2, min_workers=2) as run:
            links = run.start(timeout_s=180)
            events = run.events(idle_timeout_s=300)
            joiners.append(join_run(links[0].encode(), run_dir=tmp_path / "joiner0",
                                    data_path=str(cifar_dir)))
            _until(events, lines, lambda ls: any(x.startswith("worker0: joined") for x in ls),
                   "worker0 joined")

            # the run holds (one of the two live workers it wants): the host crashes
            pids = {role: run.backend.participants[role].pid for role in ("trust", "ps0")}
            for pid in pids.values():
                assert pid is not None
                os.killpg(pid, signal.SIGKILL)
            _until(events, lines, lambda ls: all(any(x.startswith(f"{role} is back") for x in ls)
                                                 for role in pids), "trust and ps0 back")

            # a late joiner enrolls with the link it was given before the crash
            joiners.append(join_run(links[1].encode(), run_dir=tmp_path / "joiner1",
                                    data_path=str(cifar_dir)))
            for _, line in events:
                if line:
                    lines.append(line)
            result = run.backend.result
            restarted = {role: run.backend.participants[role].starts for role in pids}
            new_pids = {role: run.backend.participants[role].pid for role in pids}
        # the run is over: each joiner ends by itself, as on a laptop (stop() is for the rest)
        for joiner in joiners:
            joiner.wait_ended(30)
    finally:
        for joiner in joiners:
            joiner.stop()

    assert result is not None and result.final_step == STEPS, "\n".join(lines[-15:])
    assert restarted == {"trust": 2, "ps0": 2} and new_pids != pids
    assert any("trust is back" in x and "enrollment open again" in x for x in lines)
    assert any(x.startswith("ps0 failed (exit code -9); restarting it") for x in lines)
    first = list(joiners[0].events(idle_timeout_s=5))
    assert joiners[0].process.returncode == 0
    # ps0 came back with a certificate from the new trust service's mesh CA: worker0 attested
    # again; and it trained after the crash, since no step completes with one live worker
    messages = [str(e.data.get("message", "")) for e in first]
    assert any("another mesh CA" in m for m in messages), messages
    assert any("re-attested" in m for m in messages), messages
    assert joiners[1].process.returncode == 0
