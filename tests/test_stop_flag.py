"""The participants' stop flag (trainer.participant.StopFlag): what the SIGTERM handler sets.

It holds no lock, unlike ``threading.Event``, whose ``set()`` called from a signal handler
blocked forever when the signal landed while the main thread held the Event's own lock inside
``wait()`` (ps0, idle in ``while not stop.wait(1.0)``, then hung at its stop until killed). Here
the handler runs while that exact lock state is held: it must return at once. And a second
SIGTERM after the first never kills the participant, not even in its interpreter's shutdown.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from trainer.participant import StopFlag

REPO = Path(__file__).resolve().parents[1]


def test_a_signal_handler_sets_the_flag_while_the_main_thread_holds_a_lock() -> None:
    flag, held = StopFlag(), threading.Lock()

    def handler(signum: int, frame: object) -> None:
        flag.set()  # must not need any lock the interrupted thread may hold
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGUSR1, handler)
    try:
        with held, pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGUSR1)
            flag.wait(30.0)
    finally:
        signal.signal(signal.SIGUSR1, previous)

    assert flag.is_set() and flag.wait(0.0)


def test_wait_returns_false_at_its_timeout_and_true_once_set() -> None:
    flag = StopFlag()

    assert flag.wait(0.01) is False
    threading.Timer(0.05, flag.set).start()
    assert flag.wait(30.0) is True


# A participant whose run is stopped by a first SIGTERM, and which gets the second one (the
# entrypoint's forward, when the pod's stop went to the process group as well) only once its
# interpreter is shutting down: the object below sends it from there.
STOPPED_TWICE = """
import os, signal, sys
import trainer.entrypoint as entrypoint

class ForwardedLate:
    def __del__(self):  # runs in the interpreter's shutdown, after main() returned
        os.kill(os.getpid(), signal.SIGTERM)
        print("second stop survived", flush=True)

def run_trust(args, args_list, emitter, stop):
    os.kill(os.getpid(), signal.SIGTERM)  # the first stop, mid-run
    raise AssertionError("the first SIGTERM did not interrupt the run")

entrypoint.run_trust = run_trust
late = ForwardedLate()
sys.exit(entrypoint.main(["trust", "--config", "unused.yaml", "--policy", "unused.yaml"]))
"""


def test_a_participant_stopped_twice_exits_0_when_the_second_stop_lands_in_its_shutdown(
    tmp_path: Path,
) -> None:
    done = subprocess.run([sys.executable, "-c", STOPPED_TWICE], cwd=REPO, capture_output=True,
                          text=True, timeout=120, check=False,
                          env={**os.environ, "PYTHONPATH": str(REPO)})

    assert done.returncode == 0, (done.returncode, done.stdout[-2000:], done.stderr[-2000:])
    assert '"state": "exited"' in done.stdout and "second stop survived" in done.stdout
