"""A participant that exits before it is ready is named with the last lines it wrote, however
late its reader threads run: wait_ready sees the exit from the process table, the lines arrive
through the readers."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import IO

import pytest

from hfl_lab import BackendError
from hfl_lab.backends.local import LocalBackend, ParticipantProcess
from tests.local_support import quick_config


class LateReader(ParticipantProcess):
    """A participant whose stderr reader is held until wait_ready has moved on from the exit:
    it took the last lines, or it waits for the readers."""

    moved_on: threading.Event

    def wait_output_read(self, timeout_s: float) -> None:
        self.moved_on.set()
        super().wait_output_read(timeout_s)

    def last_lines(self, n: int = 12) -> str:
        lines = super().last_lines(n)
        self.moved_on.set()
        return lines


def test_the_error_a_participant_wrote_before_it_exited_is_in_the_message(
    tmp_path: Path, cifar_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Arrange: a "trust service" that writes its error to stderr and exits at once (json.tool,
    # code 2); the other participants are never launched
    backend = LocalBackend(quick_config(tmp_path, cifar_dir, vault=False))
    backend.log_dir.mkdir(parents=True)
    missing = tmp_path / "no-such-input.json"
    p = LateReader("trust", ["json.tool", str(missing)], {})
    p.moved_on = threading.Event()
    backend.participants = {role: ParticipantProcess(role, [], {}) for role in backend.roles}
    backend.participants["trust"] = p
    read_stderr = backend._read_stderr

    def held_reader(p: ParticipantProcess, stream: IO[str], log: IO[str],
                    lock: threading.Lock) -> None:
        assert isinstance(p, LateReader)
        p.moved_on.wait(60)
        read_stderr(p, stream, log, lock)

    monkeypatch.setattr(backend, "_read_stderr", held_reader)

    # Act
    try:
        backend.restart("trust")  # its first start
        with pytest.raises(BackendError) as failed:
            backend.wait_ready(120)
    finally:
        backend.teardown()

    # Assert
    message = str(failed.value)
    assert "trust exited with code 2 before it was ready" in message, message
    assert "No such file or directory" in message and str(missing) in message, message
