"""The local backend's participant processes: launch, output, exit, signals.

Each participant (trust service, ps0, workers) is a ``python -m`` process in its own process
group. It receives its bootstrap secret (the lab platform's attestation key) as one JSON line on
stdin, never in its environment or on its command line. The owner's admin credential is not
among them: when the trust service announces ``provisioning``, the owner's side verifies its
evidence and hands it the credential over that attested channel (``_provision_trust``), after
every start of the service. Reader threads copy its stdout and stderr to
``<run_dir>/logs/<role>.log``, turn the lab events it prints into the backend's event queue and
keep the last lines for error messages; a watcher thread reports how it exited.
:class:`ParticipantProcesses` is the part of :class:`~hfl_lab.backends.local.LocalBackend` that
does this.
"""

from __future__ import annotations

import collections
import contextlib
import os
import queue
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from hfl_lab import owner
from hfl_lab._exceptions import BackendError, ConfigError, HflLabError
from hfl_lab._ports import free_listen_port
from hfl_lab.backends.base import ProgressCallback
from hfl_lab.config import LabConfig
from hfl_lab.events import LabEvent
from hfl_lab.tee.sim.platform import SimulatedPlatform
from hfl_lab.trust.enrollment import bootstrap_document

TAIL_LINES = 40
#: put on the event queue when ps0 and every worker have exited, and at teardown
END_OF_EVENTS = object()


@dataclass
class ParticipantProcess:
    """One launched participant process."""

    role: str
    module_args: list[str]
    env: dict[str, str]
    process: subprocess.Popen[str] | None = None
    log_path: Path | None = None
    tail: collections.deque[str] = field(
        default_factory=lambda: collections.deque(maxlen=TAIL_LINES)
    )
    state: str = "new"
    ready: threading.Event = field(default_factory=threading.Event)
    ended: threading.Event = field(default_factory=threading.Event)
    port: int | None = None
    threads: list[threading.Thread] = field(default_factory=list)
    starts: int = 0
    #: why the owner's side gave up on it (the trust service could not be provisioned)
    problem: HflLabError | None = None

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process is not None else None

    @property
    def returncode(self) -> int | None:
        return self.process.poll() if self.process is not None else None

    def wait_output_read(self, timeout_s: float) -> None:
        """Wait until the threads that read its output (and the one that watches it) are
        through: once it has exited, that is until everything it wrote is in :attr:`tail`. At
        most ``timeout_s`` (the watcher gives up on a reader after 5 s: a child of it may hold
        its output open)."""
        deadline = time.monotonic() + timeout_s
        for t in list(self.threads):
            t.join(timeout=max(0.0, deadline - time.monotonic()))

    def last_lines(self, n: int = 12) -> str:
        lines = list(self.tail)[-n:]
        return "\n".join(f"    {line}" for line in lines) if lines else "    (no output)"


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that is free on ``host`` now, for a participant to listen on once it has
    started: outside the kernel's ephemeral range, so no connection made meanwhile takes it
    (:func:`hfl_lab._ports.free_listen_port`)."""
    return free_listen_port(host)


class ParticipantProcesses:
    """Launches, watches, signals and restarts the participant processes of a local run."""

    # set by LocalBackend
    config: LabConfig
    python: str
    workload_root: Path
    extra_env: dict[str, str]
    log_dir: Path
    platform: SimulatedPlatform | None
    participants: dict[str, ParticipantProcess]
    _queue: queue.Queue[Any]
    _torn_down: bool
    _lock: threading.Lock  # guards _torn_down against a launch on the start-up thread
    _done_event: LabEvent | None
    _training_ended: threading.Event
    #: called with the role when a restarted participant serves again; what it returns is
    #: added to the "is back" line (a hosted run reopens enrollment there)
    on_restarted: Callable[[str], str | None] | None = None

    def events(self, idle_timeout_s: float | None = None) -> Iterator[LabEvent]:
        """The participants' events until the end is queued: every training role (ps0 and the
        workers; a joiner's worker) has exited, the trust service keeps running, or the run was
        torn down; then what the readers still had. Or until none came for ``idle_timeout_s``."""
        while True:
            try:
                item = self._queue.get(timeout=idle_timeout_s)
            except queue.Empty:
                return
            if item is END_OF_EVENTS:
                self._at_end()
                while True:
                    try:
                        rest = self._queue.get_nowait()
                    except queue.Empty:
                        return
                    if rest is not END_OF_EVENTS:
                        yield rest
            yield item

    def _at_end(self) -> None:
        """What to do once the end is queued, before the last events are handed out."""
    # provided by OwnerSide: verify the trust service, hand it the owner's credential
    _provision_trust: Callable[[ParticipantProcess], None]

    #: hosted run (``hfl-lab host``): the worker slots are filled by joiners over the network,
    #: so this backend launches the trust service and ps0 only
    remote_workers: bool = False

    @property
    def roles(self) -> list[str]:
        """The participants this backend launches and waits for."""
        if self.remote_workers:
            return ["trust", "ps0"]
        return ["trust", "ps0", *(f"worker{i}" for i in range(self.config.workers))]

    @property
    def training_roles(self) -> list[str]:
        return [r for r in self.roles if r != "trust"]

    # ------------------------------------------------------------------ processes

    def _launch(self, p: ParticipantProcess) -> None:
        env = dict(os.environ)
        env.update(self.extra_env)
        env.pop(owner.OWNER_SECRET_ENV, None)  # the owner's credential stays with the owner
        env.pop("HFL_LAB_BOOTSTRAP_FILE", None)  # the pod way; here the bootstrap is the pipe
        env.update(p.env)
        pythonpath = [str(self.workload_root), env.get("PYTHONPATH", "")]
        env["PYTHONPATH"] = os.pathsep.join(x for x in pythonpath if x)
        env.setdefault("KERAS_BACKEND", "tensorflow")
        env["PYTHONUNBUFFERED"] = "1"
        threads = str(self.config.threads) if self.config.threads else ""
        if threads:
            env["OMP_NUM_THREADS"] = threads
        p.log_path = self.log_dir / f"{p.role}.log"
        p.ready.clear()
        p.ended.clear()
        p.state = "starting"
        p.starts += 1
        # teardown marks the run under the same lock before it collects the processes to stop,
        # so a start-up on its own thread either launches before (and is stopped) or not at all
        with self._lock:
            if self._torn_down:
                raise BackendError(f"the run was torn down before {p.role} could start.",
                                   fix="start a new run.")
            log = p.log_path.open("a", encoding="utf-8")
            log.write(f"--- start {p.starts}: python -m {' '.join(p.module_args)}\n")
            log.flush()
            process = subprocess.Popen(
                [self.python, "-m", *p.module_args],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                cwd=self.workload_root, env=env, text=True, bufsize=1,
                start_new_session=True,  # own process group: teardown stops it and its children
            )
            p.process = process
        # a TDX guest's participant (a joiner of a hardware run) gets an empty bootstrap
        bootstrap = bootstrap_document(self.platform)
        p.problem = None
        assert process.stdin is not None
        try:
            process.stdin.write(bootstrap + "\n")
            process.stdin.flush()
        except OSError:
            pass  # it died at once; the watcher reports it with its output
        del bootstrap
        self._put(LabEvent("lifecycle", p.role,
                           {"state": "starting", "pid": process.pid, "detail": "launched"}))
        lock = threading.Lock()
        assert process.stdout is not None and process.stderr is not None
        readers = [
            threading.Thread(target=self._read_stdout, args=(p, process.stdout, log, lock),
                             daemon=True, name=f"{p.role}-stdout"),
            threading.Thread(target=self._read_stderr, args=(p, process.stderr, log, lock),
                             daemon=True, name=f"{p.role}-stderr"),
        ]
        for t in readers:
            t.start()
        watcher = threading.Thread(target=self._watch, args=(p, process, readers, log),
                                   daemon=True, name=f"{p.role}-watch")
        watcher.start()
        p.threads = [*readers, watcher]

    def _read_stdout(self, p: ParticipantProcess, stream: IO[str], log: IO[str],
                     lock: threading.Lock) -> None:
        for line in stream:
            text = line.rstrip("\n")
            with lock:
                log.write(text + "\n")
                log.flush()
            event = _parse_event(text)
            if event is None:
                p.tail.append(text)
                if text.strip():
                    self._put(LabEvent("log", p.role, {"level": "info", "message": text}))
                continue
            if event.kind == "lifecycle":
                self._on_lifecycle(p, event)
            self._put(event)

    def _read_stderr(self, p: ParticipantProcess, stream: IO[str], log: IO[str],
                     lock: threading.Lock) -> None:
        for line in stream:
            text = line.rstrip("\n")
            p.tail.append(text)
            with lock:
                log.write(text + "\n")
                log.flush()

    def _on_lifecycle(self, p: ParticipantProcess, event: LabEvent) -> None:
        state = str(event.data.get("state", ""))
        p.state = state
        if state == "ready":
            port = event.data.get("port")
            p.port = int(port) if isinstance(port, int) else p.port
            p.ready.set()
        if state == "provisioning" and p.role == "trust":
            # the owner's side verifies it and hands it the credential, off the reader thread
            threading.Thread(target=self._provision_trust, args=(p,), daemon=True,
                             name="trust-provision").start()
        if state == "done" and p.role == "ps0":
            self._done_event = event
        if state == "ready" and p.starts > 1:
            threading.Thread(target=self._back_again, args=(p,), daemon=True,
                             name=f"{p.role}-back").start()

    def _restart_after_failure(self, p: ParticipantProcess) -> bool:
        """Whether a participant that failed is brought back at once (a hosted run's trust
        service and ps0 are: LocalBackend); here: no, the failure ends the run."""
        return False

    def _back_again(self, p: ParticipantProcess) -> None:
        """A restarted participant serves again: say so (and let the owner of the run act)."""
        message = f"{p.role} is back (start {p.starts})"
        hook = self.on_restarted
        if hook is not None:
            try:
                done = hook(p.role)
            except HflLabError as e:
                message += f"; {e}"
            else:
                message += f"; {done}" if done else ""
        self._put(LabEvent("log", "host", {"level": "warning", "message": message,
                                           "peer": p.role}))

    def _restart_failed(self, p: ParticipantProcess) -> None:
        try:
            self.restart(p.role)
        except HflLabError as e:  # torn down meanwhile, or it would not start
            self._put(LabEvent("log", "host", {"level": "error", "peer": p.role,
                                               "message": f"{p.role} not restarted: {e}"}))
            p.ended.set()
            if all(self.participants[r].ended.is_set() for r in self.training_roles):
                self._training_ended.set()
                self._queue.put(END_OF_EVENTS)

    def _watch(self, p: ParticipantProcess, process: subprocess.Popen[str],
               readers: Sequence[threading.Thread], log: IO[str]) -> None:
        code = process.wait()
        for t in readers:
            t.join(timeout=5)
        with contextlib.suppress(OSError, ValueError):
            log.write(f"--- exited with code {code}\n")
            log.close()
        if code != 0 and not self._torn_down and p.state not in ("stopping",):
            detail = (f"{p.role} exited with code {code}. Last lines of {p.log_path}:\n"
                      f"{p.last_lines()}")
            p.state = "failed"
            self._put(LabEvent("lifecycle", p.role,
                               {"state": "failed", "pid": process.pid, "exit_code": code,
                                "detail": detail}))
            if self._restart_after_failure(p):
                self._put(LabEvent("log", "host", {
                    "level": "warning", "peer": p.role,
                    "message": f"{p.role} failed (exit code {code}); restarting it: its "
                    "participants reconnect and attest again"}))
                threading.Thread(target=self._restart_failed, args=(p,), daemon=True,
                                 name=f"{p.role}-restart").start()
                return
        elif p.state not in ("exited", "failed"):
            p.state = "exited"
            self._put(LabEvent("lifecycle", p.role,
                               {"state": "exited", "pid": process.pid, "exit_code": code,
                                "detail": f"exit code {code}"}))
        p.ended.set()
        if all(self.participants[r].ended.is_set() for r in self.training_roles):
            self._training_ended.set()
            self._queue.put(END_OF_EVENTS)

    def _put(self, event: LabEvent) -> None:
        self._queue.put(event)
    # ------------------------------------------------------------------ waiting

    def _wait_roles(self, roles: Sequence[str], timeout_s: float,
                    progress: ProgressCallback | None) -> None:
        deadline = time.monotonic() + timeout_s
        reported = -1
        while True:
            ready = [r for r in roles if self.participants[r].ready.is_set()]
            if len(ready) != reported:
                reported = len(ready)
                if progress is not None:
                    progress(len(ready), len(roles), "participants ready")
            if len(ready) == len(roles):
                return
            for role in roles:
                p = self.participants[role]
                if p.problem is not None and not p.ready.is_set():
                    raise p.problem
                code = p.returncode
                if code is not None and not p.ready.is_set():
                    # the exit can be seen before its reader threads have read the last lines
                    # it wrote (its error): name them once the readers are through
                    p.wait_output_read(timeout_s=30)
                    raise BackendError(
                        f"{role} exited with code {code} before it was ready. Last lines of "
                        f"{p.log_path}:\n{p.last_lines()}",
                        fix=f"read {p.log_path}; the line above names the cause.",
                    )
            if time.monotonic() > deadline:
                waiting = [r for r in roles if r not in ready]
                lines = "\n".join(f"  {r}:\n{self.participants[r].last_lines(5)}"
                                  for r in waiting)
                raise BackendError(
                    f"not ready after {timeout_s:.0f} s: {', '.join(waiting)}.\n{lines}",
                    fix="read their logs in the run folder; raise the timeout on a busy machine.",
                )
            time.sleep(0.05)

    # ------------------------------------------------------------------ control

    def kill(self, role: str, sig: int = signal.SIGKILL) -> None:
        """Send ``sig`` to one participant (fault injection in tests and notebook 06)."""
        p = self._participant(role)
        if p.process is not None and p.process.poll() is None:
            p.state = "stopping" if sig != signal.SIGKILL else "killed"
            with contextlib.suppress(ProcessLookupError):
                os.killpg(p.process.pid, sig)
            p.process.wait(timeout=30)
            if sig == signal.SIGKILL:
                # a child forked a moment before (on its way to exec debugfs) holds copies of
                # the participant's files, the model volume's lock included, until it has
                # exited too: return only when nothing of the participant is left
                wait_for_group_exit(p.process.pid, timeout_s=30)

    def restart(self, role: str) -> None:
        """Start a participant again with the same command (after it died or was killed)."""
        p = self._participant(role)
        if p.process is not None and p.process.poll() is None:
            raise BackendError(f"{role} is still running.", fix=f"kill('{role}') first.")
        for t in p.threads:
            t.join(timeout=5)
        self._training_ended.clear()
        self._launch(p)

    def _participant(self, role: str) -> ParticipantProcess:
        if role not in self.participants:
            raise ConfigError(f"no participant {role!r} in this run.",
                              fix=f"use one of {', '.join(self.participants) or '(none yet)'}.")
        return self.participants[role]


def wait_for_group_exit(pgid: int, *, timeout_s: float) -> bool:
    """Wait until no live process (zombies aside) is in process group ``pgid``; False when
    some still is after ``timeout_s``. Reads /proc (the local backend runs on Linux)."""
    deadline = time.monotonic() + timeout_s
    while group_members(pgid):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.005)
    return True


def group_members(pgid: int) -> list[int]:
    """The pids of the live processes (zombies aside) in process group ``pgid``, from /proc."""
    members = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue  # gone meanwhile
        # pid (comm) state ppid pgrp ...: comm may hold spaces and parentheses
        fields = stat[stat.rindex(")") + 2:].split()
        if fields[0] != "Z" and int(fields[2]) == pgid:
            members.append(int(entry.name))
    return members


def _parse_event(text: str) -> LabEvent | None:
    if not text.startswith("{"):
        return None
    try:
        event = LabEvent.from_json(text)
    except (ValueError, KeyError, TypeError):
        return None
    return event if isinstance(event.data, dict) else None
