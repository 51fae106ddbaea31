"""The participants' stop flag (trainer.participant.StopFlag): what the SIGTERM handler sets.

It holds no lock, unlike ``threading.Event``, whose ``set()`` called from a signal handler
blocked forever when the signal landed while the main thread held the Event's own lock inside
``wait()`` (ps0, idle in ``while not stop.wait(1.0)``, then hung at its stop until killed). Here
the handler runs while that exact lock state is held: it must return at once.
"""

from __future__ import annotations

import os
import signal
import threading

import pytest

from trainer.participant import StopFlag


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
