"""What the fault, disk and load cases share: seeded fault points, checkpoint audits, /proc views.

Nothing here guesses a moment with a sleep: a worker "in a push" is seen in the kernel's TCP
queues (``/proc/net/tcp``), a checkpoint "being written" is seen with inotify on the folder
that holds the checkpoints.
"""

from __future__ import annotations

import ctypes
import os
import random
import re
import select
import signal
import struct
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from hfl_lab._exceptions import VaultError
from hfl_lab.backends.local import LocalBackend
from hfl_lab.events import LabEvent
from hfl_lab.vault import Checkpoint, CheckpointInfo
from hfl_lab.vault.archive import CHECKPOINTS, CheckpointArchive
from hfl_lab.vault.files import DirectoryFiles
from hfl_lab.vault.keyrelease import open_as_owner
from trainer.checkpoint import decode_state

#: the seed of every fault point; set HFL_LAB_FAULT_SEED to replay or vary a run
SEED = int(os.environ.get("HFL_LAB_FAULT_SEED", "9"))

_RESUMED = re.compile(r"resumed from the checkpoint of step (\d+)")
_WRITTEN = re.compile(r"checkpoint at step (\d+) written")


def seeded(case: str) -> random.Random:
    return random.Random(f"{SEED}/{case}")


def fault_step(case: str, low: int, high: int) -> int:
    """The step at which ``case`` injects its fault, from the suite's seed; logged."""
    step = seeded(case).randint(low, high)
    print(f"[{case}] HFL_LAB_FAULT_SEED={SEED}: fault at step {step}")
    return step


# --------------------------------------------------------------------------- checkpoints


@dataclass
class CheckpointAudit:
    """Every checkpoint of a run, each read back and verified."""

    intact: list[int] = field(default_factory=list)
    corrupt: list[str] = field(default_factory=list)
    #: files in the store that belong to no committed checkpoint (an interrupted write)
    leftovers: list[str] = field(default_factory=list)

    @property
    def newest(self) -> int | None:
        return max(self.intact) if self.intact else None


def audit_checkpoints(backend: LocalBackend) -> CheckpointAudit:
    """Read back and verify every checkpoint of ``backend``'s run (payload hash and decoding).

    The one place of the suite that knows where a run keeps its checkpoints: the model vault
    (opened read-only as the owner, with the trust service's sealed state) or the plain
    checkpoint folder. It never writes: opening a store for writing would clean up leftovers,
    which are evidence.
    """
    audit = CheckpointAudit()
    volume = backend.vault_path
    if volume is not None:
        if not volume.exists():
            return audit
        with open_as_owner(backend.owner_credential(), volume) as vault:
            _audit(audit, vault.list_checkpoints(), vault.checkpoint,
                   vault.files.list_dir(CHECKPOINTS))
        return audit
    folder = backend.checkpoint_dir
    if not folder.is_dir():
        return audit
    archive = CheckpointArchive(DirectoryFiles(folder, durable=False), mac_key=None,
                                genesis="", data_path="directory")
    infos = archive.infos()
    by_step = {info.step: info for info in infos}
    present = {p.name: 0 for p in (folder / CHECKPOINTS).glob("*")} if (
        folder / CHECKPOINTS).is_dir() else {}
    _audit(audit, infos, lambda step: archive.load(by_step[step]), present)
    return audit


def _audit(audit: CheckpointAudit, infos: list[CheckpointInfo],
           load: Callable[[int], Checkpoint], present: Mapping[str, int]) -> None:
    committed: set[str] = set()
    for info in infos:
        committed |= {f"{info.name}.json", f"{info.name}.bin"}
        try:
            version = decode_state(load(info.step).payload).version
        except VaultError as e:
            audit.corrupt.append(f"step {info.step}: {e.message}")
            continue
        if version != info.step:
            audit.corrupt.append(f"step {info.step}: its payload holds step {version}")
            continue
        audit.intact.append(info.step)
    audit.leftovers = sorted(name for name in present if name not in committed)
    audit.intact.sort()


def resumed_steps(events: Iterable[LabEvent]) -> list[int]:
    """The checkpoint steps ps0 said it resumed from, in order."""
    return [int(m.group(1)) for e in events if e.kind == "log" and e.source == "ps0"
            and (m := _RESUMED.search(str(e.data.get("message", ""))))]


def written_steps(events: Iterable[LabEvent]) -> list[int]:
    return [int(m.group(1)) for e in events if e.kind == "log" and e.source == "ps0"
            and (m := _WRITTEN.search(str(e.data.get("message", ""))))]


def metric_steps(events: Iterable[LabEvent], *, before: float | None = None,
                 source: str | None = None) -> set[int]:
    return {int(e.data["step"]) for e in events if e.kind == "metrics"
            and (before is None or e.time < before) and (source is None or e.source == source)}


def steps_lost(events: list[LabEvent], killed_at: float, resumed: int) -> int:
    """Steps trained before the PS died that had to be trained again after it resumed."""
    return len({s for s in metric_steps(events, before=killed_at) if s >= resumed})


def steps_during_write(events: list[LabEvent], killed_at: float, resumed: int,
                       every: int) -> int:
    """Of those, the steps trained while the next checkpoint (``resumed + every``) was being
    written: ps0 writes checkpoints in the background and trains on meanwhile, so a kill
    during that write loses them too. Zero when that checkpoint's write had not begun."""
    pending = resumed + every
    if pending in written_steps(e for e in events if e.time < killed_at):
        raise AssertionError(f"checkpoint {pending} was written before the kill, yet ps0 "
                             f"resumed from {resumed}")
    return len({s for s in metric_steps(events, before=killed_at) if s >= pending})


# --------------------------------------------------------------------------- processes


def _tcp_rows() -> list[tuple[int, int, int, int, int]]:
    """(local port, remote port, tx queue, rx queue, inode) of every IPv4/IPv6 TCP socket."""
    rows = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            parts = line.split()
            local, remote, queues, inode = parts[1], parts[2], parts[4], parts[9]
            tx, rx = (int(x, 16) for x in queues.split(":"))
            rows.append((int(local.rsplit(":", 1)[1], 16), int(remote.rsplit(":", 1)[1], 16),
                         tx, rx, int(inode)))
    return rows


def socket_inodes(pid: int) -> set[int]:
    found = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        if target.startswith("socket:["):
            found.add(int(target[8:-1]))
    return found


def bytes_in_flight_to(ps_port: int, pid: int) -> int:
    """Bytes ``pid`` sent to the PS port that the PS has not read yet (both sides' queues)."""
    inodes = socket_inodes(pid)
    rows = _tcp_rows()
    mine = {(local, tx) for local, remote, tx, _, inode in rows
            if inode in inodes and remote == ps_port}
    ports = {local for local, _ in mine}
    unread = sum(rx for local, remote, _, rx, _ in rows if local == ps_port and remote in ports)
    return unread + sum(tx for _, tx in mine)


def count_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def count_threads_named(pid: int, prefix: str) -> tuple[int, int]:
    """(threads of process ``pid`` with a kernel name ``<prefix>_<n>``, every other thread); of
    several threads with the same such name (one started by the named one inherits its name) the
    first counts as named and the rest as other. A thread that ends while it is read counts as
    neither."""
    names: set[str] = set()
    other = 0
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            comm = Path(f"/proc/{pid}/task/{tid}/comm").read_text().strip()
        except OSError:
            continue
        if comm.startswith(f"{prefix}_") and comm not in names:
            names.add(comm)
        else:
            other += 1
    return len(names), other


# --------------------------------------------------------------------------- inotify

IN_MODIFY = 0x2
IN_CREATE = 0x100
_EVENT = struct.Struct("iIII")


class CreationWatch:
    """inotify on a folder (names of files created in it) or a file (its modifications, with
    an empty name), as they happen."""

    def __init__(self, path: Path, mask: int = IN_CREATE) -> None:
        self._libc = ctypes.CDLL(None, use_errno=True)
        self.fd = self._libc.inotify_init1(os.O_NONBLOCK | os.O_CLOEXEC)
        if self.fd < 0:
            raise OSError(ctypes.get_errno(), "inotify_init1 failed")
        if self._libc.inotify_add_watch(self.fd, os.fsencode(path), mask) < 0:
            os.close(self.fd)
            raise OSError(ctypes.get_errno(), f"cannot watch {path}")
        self._pending: list[str] = []

    def next_name(self, timeout_s: float) -> str | None:
        if not self._pending:
            ready, _, _ = select.select([self.fd], [], [], timeout_s)
            if not ready:
                return None
            data = os.read(self.fd, 65536)
            offset = 0
            while offset < len(data):
                _, _, _, length = _EVENT.unpack_from(data, offset)
                start = offset + _EVENT.size
                self._pending.append(data[start:start + length].rstrip(b"\0").decode())
                offset = start + length
        return self._pending.pop(0)

    def close(self) -> None:
        os.close(self.fd)


class FreezeOnWrite(threading.Thread):
    """SIGSTOP ``pid`` the moment a file whose name contains ``marker`` appears in ``folder``
    (a plain checkpoint folder), or the moment the file ``folder`` is modified (``marker`` "",
    the model volume).

    A stopped process does nothing more, so what the test then sees on disk is the state of an
    interrupted write; a SIGKILL that follows is a kill during that write.
    """

    def __init__(self, folder: Path, pid: int, marker: str, timeout_s: float = 120.0) -> None:
        super().__init__(daemon=True, name="freeze-on-write")
        self.watch = CreationWatch(folder, IN_MODIFY if folder.is_file() else IN_CREATE)
        self.pid = pid
        self.marker = marker
        self.timeout_s = timeout_s
        self.frozen = threading.Event()
        self.name_seen = ""
        self.frozen_at = 0.0

    def run(self) -> None:
        deadline = time.monotonic() + self.timeout_s
        try:
            while time.monotonic() < deadline:
                name = self.watch.next_name(max(0.0, deadline - time.monotonic()))
                if name is not None and self.marker in name:
                    os.kill(self.pid, signal.SIGSTOP)
                    self.frozen_at = time.time()
                    self.name_seen = name
                    self.frozen.set()
                    return
        finally:
            self.watch.close()
