"""configfs-tsm provider against a directory that behaves like the kernel interface.

The emulator serves each new report entry the way configfs does: ``inblob`` and ``outblob``
are FIFOs (a write is consumed, a read blocks until the report exists), ``generation`` counts
inblob writes. Real kernel semantics we cannot produce on a plain directory (EBUSY) are
injected at the syscall the provider makes.
"""

from __future__ import annotations

import errno
import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from hfl_lab import AttestationError
from hfl_lab.tee import ConfigfsTsmProvider, SimulatedPlatform, SimulatedTdProvider, parse_quote
from hfl_lab.tee.sim.measure import measure_workload

pytestmark = pytest.mark.timeout(60)

#: how long the provider waits for an entry's attributes where the emulator serves them: the
#: kernel makes them with the directory, the emulator's threads on a busy machine much later
#: than the provider's 2 s default allows
SERVED_WAIT_S = 30.0


class TsmEmulator:
    def __init__(self, root: Path, provider: SimulatedTdProvider, extra_generations: int = 0):
        self.root = root
        self.provider = provider
        self.extra_generations = extra_generations  # another writer racing the first request
        self.served = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> TsmEmulator:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(2)

    def _run(self) -> None:
        seen: set[str] = set()
        while not self._stop.is_set():
            for entry in list(self.root.iterdir()):
                if entry.name not in seen:
                    seen.add(entry.name)
                    threading.Thread(target=self._serve, args=(entry,), daemon=True).start()
            time.sleep(0.001)

    def _serve(self, entry: Path) -> None:
        (entry / "generation").write_text("0\n")
        (entry / "provider").write_text("tdx_guest\n")
        os.mkfifo(entry / "outblob")
        os.mkfifo(entry / "inblob")
        # held open for reading and writing until the 64 bytes came: a writer that gave up
        # (EBUSY) closes without data, and its retry's write waits in this same pipe (reopened
        # per writer, a retry that opened before the emulator closed its end lost its bytes)
        fd = os.open(entry / "inblob", os.O_RDWR)
        try:
            report_data = b""
            while len(report_data) < 64:
                report_data += os.read(fd, 64 - len(report_data))
        finally:
            os.close(fd)
        bump = 1 + (self.extra_generations if self.served == 0 else 0)
        self.served += 1
        (entry / "generation").write_text(f"{bump}\n")
        quote = self.provider.get_evidence(report_data).quote
        with open(entry / "outblob", "wb") as f:
            f.write(quote)


@pytest.fixture()
def sim() -> SimulatedTdProvider:
    return SimulatedTdProvider(SimulatedPlatform.generate(), measure_workload(role="ps0"))


@pytest.fixture()
def tsm_root(tmp_path: Path) -> Iterator[Path]:
    root = tmp_path / "tsm" / "report"
    root.mkdir(parents=True)
    yield root


def test_writes_exactly_64_bytes_and_returns_the_quote(tsm_root: Path,
                                                       sim: SimulatedTdProvider) -> None:
    with TsmEmulator(tsm_root, sim):
        evidence = ConfigfsTsmProvider(tsm_root, attribute_wait_s=SERVED_WAIT_S).get_evidence(
            b"\x07" * 32)

    quote = parse_quote(evidence.quote)
    assert quote.report_data == b"\x07" * 32 + bytes(32)
    assert evidence.provider == "configfs-tsm" and not evidence.simulated
    assert list(tsm_root.iterdir()) == []  # report entry cleaned up


def test_generation_mismatch_is_retried(tsm_root: Path, sim: SimulatedTdProvider) -> None:
    with TsmEmulator(tsm_root, sim, extra_generations=1) as emu:
        evidence = ConfigfsTsmProvider(tsm_root, attribute_wait_s=SERVED_WAIT_S).get_evidence(
            b"\x01" * 64)

    assert emu.served == 2
    assert parse_quote(evidence.quote).report_data == b"\x01" * 64
    assert list(tsm_root.iterdir()) == []


def test_ebusy_is_retried(tsm_root: Path, sim: SimulatedTdProvider,
                          monkeypatch: pytest.MonkeyPatch) -> None:
    real_write = os.write
    busy = {"left": 2}

    def write(fd: int, data: bytes) -> int:
        if busy["left"]:
            busy["left"] -= 1
            raise OSError(errno.EBUSY, "Device or resource busy")
        return real_write(fd, data)

    monkeypatch.setattr(os, "write", write)
    with TsmEmulator(tsm_root, sim):
        evidence = ConfigfsTsmProvider(tsm_root, busy_wait_s=0.001,
                                       attribute_wait_s=SERVED_WAIT_S).get_evidence(b"\x02" * 64)

    assert busy["left"] == 0
    assert parse_quote(evidence.quote).report_data == b"\x02" * 64


def test_more_than_64_bytes_of_report_data_is_refused(tsm_root: Path) -> None:
    with pytest.raises(AttestationError, match="at most 64"):
        ConfigfsTsmProvider(tsm_root).get_evidence(bytes(65))


def test_a_plain_directory_without_the_interface_gives_a_clear_error(tsm_root: Path) -> None:
    provider = ConfigfsTsmProvider(tsm_root, attribute_wait_s=0.05)

    with pytest.raises(AttestationError, match="not a configfs-tsm tree"):
        provider.get_evidence(bytes(64))
    assert list(tsm_root.iterdir()) == []


def test_missing_root_names_the_fix(tmp_path: Path) -> None:
    with pytest.raises(AttestationError, match="configfs-tsm") as err:
        ConfigfsTsmProvider(tmp_path / "absent").get_evidence(bytes(64))
    assert err.value.fix and "TDX guest" in err.value.fix
