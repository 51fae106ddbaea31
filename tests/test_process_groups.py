"""The local backend's kill returns only when a participant's whole process group is gone: a
child forked a moment before holds copies of its files (the model volume's lock) until then."""

from __future__ import annotations

import os
import signal
import subprocess

from hfl_lab.backends.local.processes import group_members, wait_for_group_exit


def test_a_killed_group_is_waited_for_children_included() -> None:
    leader = subprocess.Popen(["sh", "-c", "sleep 60 & sleep 60 & wait"], start_new_session=True)
    try:
        assert not wait_for_group_exit(leader.pid, timeout_s=0.2)  # alive: not gone
        assert leader.pid in group_members(leader.pid)
    finally:
        os.killpg(leader.pid, signal.SIGKILL)
        leader.wait(timeout=30)
    assert wait_for_group_exit(leader.pid, timeout_s=30)
    assert group_members(leader.pid) == []
