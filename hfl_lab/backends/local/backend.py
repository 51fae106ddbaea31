"""The ``local`` backend: trust service, ps0 and N workers as processes on this machine.

Each participant is its own process with its own simulated TD: it measures the code it runs
(MR_TD), its role and configuration (MR_CONFIG_ID) and its command line (RTMR2), and signs its
quotes with the lab platform's attestation key, which it receives over a pipe from this backend.
The reference values in the run's policy are derived here, the owner's side, from the same code
and configuration: a participant that runs anything else is refused.

Ports are chosen automatically on 127.0.0.1; logs go to ``<run_dir>/logs/<role>.log``; the lab
events that participants print are one queue, read by :meth:`LocalBackend.events`. Teardown
stops every process group; a participant whose launcher dies exits by itself (its stdin closes).

With ``vault=True`` (the default) the model is sealed: once the trust service is up, this
backend, as the lab owner, creates the LUKS volume ``<run_dir>/vault/model.luks`` and registers
its random passphrase in the key broker with a release policy naming ps0's measurements, then
starts ps0, which obtains the passphrase by attested key release and writes every checkpoint
into the volume, signed. The trust service seals its state (the passphrase included) into
``<run_dir>/trust/state.sealed`` under a key derived from the owner's admin credential
(:mod:`hfl_lab.owner`), so the owner's trusted node can open the volume after the run. The
public parts the trusted node needs to check provenance offline (the lab platform's root and
collateral, the volume's release policy) are in ``<run_dir>/trust/``.
"""

from __future__ import annotations

import atexit
import collections
import contextlib
import importlib.util
import json
import os
import queue
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from hfl_lab import owner
from hfl_lab._exceptions import BackendError, ConfigError, HflLabError
from hfl_lab.backends.base import PreflightCheck, ProgressCallback
from hfl_lab.config import LabConfig
from hfl_lab.events import LabEvent
from hfl_lab.tee.policy import AttestationPolicy
from hfl_lab.tee.sim.measure import TdMeasurements, measure_workload
from hfl_lab.tee.sim.platform import SimulatedPlatform

__all__ = ["LocalBackend", "Participant", "TrainingResult"]

WORKLOAD_ROOT = Path(__file__).resolve().parents[3]
TAIL_LINES = 40
_END = object()


@dataclass(frozen=True)
class TrainingResult:
    """How a run ended, from ps0's ``done`` event and the processes' exit codes."""

    final_step: int
    evaluation: Mapping[str, float]
    checkpoint_step: int | None
    seconds: float
    exit_codes: Mapping[str, int | None]
    details: Mapping[str, Any] = field(default_factory=dict)

    @property
    def test_accuracy(self) -> float | None:
        value = self.evaluation.get("accuracy")
        return float(value) if value is not None else None


@dataclass
class Participant:
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

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process is not None else None

    @property
    def returncode(self) -> int | None:
        return self.process.poll() if self.process is not None else None

    def last_lines(self, n: int = 12) -> str:
        lines = list(self.tail)[-n:]
        return "\n".join(f"    {line}" for line in lines) if lines else "    (no output)"


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that is free on ``host`` right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


class LocalBackend:
    """Runs a lab on this machine; the notebooks and ``hfl-lab run`` drive it."""

    name = "local"

    def __init__(
        self,
        config: LabConfig,
        *,
        python: str | None = None,
        workload_root: Path | None = None,
        env: Mapping[str, str] | None = None,
        connect_timeout_s: float = 120.0,
    ) -> None:
        if config.backend != "local":
            raise ConfigError(
                f"LocalBackend got a config for the {config.backend!r} backend.",
                fix="use hfl_lab.backends.create_backend(config), which picks the backend.",
            )
        self.config = config
        self.run_dir = Path(config.run_dir).expanduser().resolve()
        self.python = python or sys.executable
        self.workload_root = workload_root or WORKLOAD_ROOT
        self.extra_env = dict(env or {})
        self.connect_timeout_s = connect_timeout_s
        self.platform: SimulatedPlatform | None = None
        #: the owner's admin credential for the trust service (memory only), derived from the
        #: session's owner secret and this run's public salt (see hfl_lab.owner) in prepare()
        self.admin_token = b""
        self.policy: AttestationPolicy | None = None
        self.measurements: dict[str, TdMeasurements] = {}
        self.trust_address = ""
        self.ps_address = ""
        self.config_path = self.run_dir / "config.yaml"
        self.policy_path = self.run_dir / "policy.yaml"
        self.checkpoint_dir = self.run_dir / "checkpoints"
        self.log_dir = self.run_dir / "logs"
        self.trust_dir = self.run_dir / "trust"
        #: the sealed model (None without the vault) and the trust service's sealed state
        self.vault_path: Path | None = (
            self.run_dir / "vault" / "model.luks" if config.vault else None
        )
        self.trust_state_path = self.trust_dir / "state.sealed"
        self.owner_salt_path = self.trust_dir / "owner.json"
        self.platform_path = self.trust_dir / "platform.json"
        self.volume_policy_path = self.trust_dir / "volume_policy.yaml"
        self.vault_info: Any = None
        self.participants: dict[str, Participant] = {}
        self.result: TrainingResult | None = None
        self._queue: queue.Queue[Any] = queue.Queue()
        self._lock = threading.Lock()
        self._started_at = 0.0
        self._torn_down = False
        self._done_event: LabEvent | None = None
        self._training_ended = threading.Event()
        atexit.register(self.teardown)

    def __repr__(self) -> str:
        return f"LocalBackend(run_dir={str(self.run_dir)!r}, <secrets in memory>)"

    def __enter__(self) -> LocalBackend:
        return self

    def __exit__(self, *exc: object) -> None:
        self.teardown()

    @property
    def roles(self) -> list[str]:
        return ["trust", "ps0", *(f"worker{i}" for i in range(self.config.workers))]

    @property
    def training_roles(self) -> list[str]:
        return [r for r in self.roles if r != "trust"]

    # ------------------------------------------------------------------ preflight

    def preflight(self) -> list[PreflightCheck]:
        checks = [
            PreflightCheck(
                "python", sys.version_info >= (3, 11),
                f"{sys.version.split()[0]} at {self.python}", "use Python 3.11 or newer"),
        ]
        missing = [m for m in ("grpc", "torch", "keras", "cryptography", "dcap_qvl")
                   if importlib.util.find_spec(m) is None]
        checks.append(PreflightCheck(
            "packages", not missing,
            "all installed" if not missing else f"missing: {', '.join(missing)}",
            "run `make install` (it installs requirements.txt into .venv)"))
        checks.append(self._data_check())
        try:
            free_port()
            checks.append(PreflightCheck("loopback", True, "127.0.0.1 accepts listeners"))
        except OSError as e:
            checks.append(PreflightCheck("loopback", False, f"cannot listen on 127.0.0.1: {e}",
                                         "allow loopback TCP in this container"))
        writable = _writable(self.run_dir)
        checks.append(PreflightCheck(
            "run folder", writable, str(self.run_dir),
            "choose a writable run_dir (parameter run_dir)"))
        cpus = os.cpu_count() or 1
        processes = len(self.roles)
        checks.append(PreflightCheck(
            "cpu", True,
            f"{cpus} cores for {processes} participant processes"
            + (" (they will share cores; training is slower)" if cpus < processes else "")))
        checks.append(PreflightCheck(
            "evidence", self.config.allow_simulated,
            "SIMULATED TDs (no TDX on this backend): real quote format, lab-local keys, "
            "NOT secure" if self.config.allow_simulated else "simulated TDs are not allowed",
            "set allow_simulated=True for the local backend, or use the kubernetes backend"))
        return checks

    def _data_check(self) -> PreflightCheck:
        try:
            from trainer.data import BATCHES_DIR, TEST_FILE, TRAIN_FILES

            root = self.config.require_data_path()
            folder = root if root.name == BATCHES_DIR else root / BATCHES_DIR
            absent = [n for n in (*TRAIN_FILES, TEST_FILE) if not (folder / n).is_file()]
        except HflLabError as e:
            return PreflightCheck("data", False, e.message, e.fix or "")
        if absent:
            return PreflightCheck("data", False, f"{folder} lacks {', '.join(absent)}",
                                  "point data_path at the CIFAR-10 python version")
        return PreflightCheck("data", True, f"CIFAR-10 at {folder}")

    # ------------------------------------------------------------------ preparation

    def prepare(self) -> None:
        """Write the run's config and policy; derive the reference measurements."""
        try:
            self._prepare()
        except OSError as e:
            raise BackendError(
                f"cannot write the run folder {self.run_dir}: {e.strerror or e} "
                f"({e.filename or self.run_dir}).",
                fix="choose a writable run_dir with free space (-p run_dir=...), or fix the "
                "folder's permissions; nothing was started.",
            ) from None

    def _prepare(self) -> None:
        from trainer.settings import Deployment, ParticipantConfig

        if not self.config.allow_simulated:
            raise ConfigError(
                "the local backend runs simulated TDs, and allow_simulated is False.",
                fix="set allow_simulated=True, or run on a TDX cluster with backend=kubernetes.",
            )
        self.config.require_data_path()
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.log_dir.mkdir(exist_ok=True)
        self.trust_dir.mkdir(exist_ok=True)
        self.platform = self.platform or SimulatedPlatform.generate()
        self.admin_token = owner.admin_token(self._owner_salt())
        # public: what the owner's trusted node needs to verify ps0's evidence offline
        self.platform_path.write_text(json.dumps({
            "root_der": self.platform.root_der.hex(),
            "collateral_json": self.platform.collateral_json,
        }) + "\n")
        trust_port, ps_port = free_port(), free_port()
        while ps_port == trust_port:
            ps_port = free_port()
        self.trust_address = f"127.0.0.1:{trust_port}"
        self.ps_address = f"127.0.0.1:{ps_port}"
        deployment = Deployment(
            trust_address=self.trust_address,
            ps_address=self.ps_address,
            workers=self.config.workers,
            evidence="simulated",
            overlay="local",
            checkpoint_dir="" if self.vault_path else str(self.checkpoint_dir),
            vault_path=str(self.vault_path or ""),
            policy_path=str(self.policy_path),
            data_dir=self.config.data_path,
            connect_timeout_s=self.connect_timeout_s,
        )
        ParticipantConfig.write(self.config_path, deployment, self.config)
        document = ParticipantConfig.load(self.config_path).measured()
        config = str(self.config_path)
        commands = {
            "trust": ["hfl_lab.trust", "serve", "--config", config, "--policy",
                      str(self.policy_path), "--port", str(trust_port),
                      "--state", str(self.trust_state_path)],
            "ps0": ["trainer", "ps", "--config", config, "--exit-when-done"],
        }
        for i in range(self.config.workers):
            commands[f"worker{i}"] = ["trainer", "worker", "--index", str(i), "--config", config]
        for role, args in commands.items():
            self.measurements[role] = measure_workload(
                role=role, config=document, argv=["python", "-m", *args],
                root=self.workload_root,
            )
            env = {"HFL_LAB_ROLE": role, "HFL_LAB_EVIDENCE": "simulated"}
            self.participants[role] = Participant(role, args, env)
        if self.config.policy_path:
            self.policy = AttestationPolicy.load(self.config.policy_path)
        else:
            self.policy = self.reference_policy()
        self.policy.save(self.policy_path)
        if self.vault_path is not None:
            self.volume_release_policy().save(self.volume_policy_path)

    def _owner_salt(self) -> bytes:
        """This run's public salt (kept, so a resumed run keeps its admin credential)."""
        with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
            return bytes.fromhex(json.loads(self.owner_salt_path.read_text())["salt"])
        salt = owner.new_salt()
        self.owner_salt_path.write_text(json.dumps({"salt": salt.hex()}) + "\n")
        return salt

    def volume_release_policy(self) -> AttestationPolicy:
        """Who may receive the volume passphrase by attested release: ps0's TD (this code, its
        configuration), nobody else. The owner's node uses the sealed state instead."""
        from hfl_lab.vault.keyrelease import volume_release_policy

        assert self.policy is not None
        return volume_release_policy(self.measurements["ps0"], base=self.policy)

    def owner_credential(self) -> Any:
        """The owner's authorized way to the volume passphrase after the run (sealed state)."""
        from hfl_lab.vault.keyrelease import SealedBrokerState

        return SealedBrokerState(self.trust_state_path, owner.sealing_key(self.admin_token))

    @contextlib.contextmanager
    def model_store(self) -> Iterator[Any]:
        """The run's checkpoints, read-only, as the owner sees them: the volume opened with the
        owner's credential, or the plain checkpoint folder of a run without the vault. Both
        have ``load_latest()``; the volume also ``list_checkpoints()`` and
        ``verify_provenance(...)``. Nothing is written."""
        from hfl_lab.vault import DirectoryCheckpointStore
        from hfl_lab.vault.keyrelease import open_as_owner

        if self.vault_path is None:
            yield DirectoryCheckpointStore(self.checkpoint_dir, durable=False)
            return
        with open_as_owner(self.owner_credential(), self.vault_path) as vault:
            yield vault


    def reference_policy(self) -> AttestationPolicy:
        """The owner's policy for this run: this code (MR_TD), each role's configuration."""
        mr_td = {m.mr_td.hex() for m in self.measurements.values()}
        return AttestationPolicy.from_dict({
            "tee_type": "TDX",
            "mr_td": sorted(mr_td),
            "allow_simulated": self.config.allow_simulated,
            "allow_debug": False,
            "report_data_binding": "key+nonce",
            "roles": {role: {"mr_config_id": m.mr_config_id.hex()}
                      for role, m in self.measurements.items()},
        })

    # ------------------------------------------------------------------ processes

    def start(self) -> None:
        if self._torn_down:
            raise BackendError("this backend was torn down.", fix="create a new LocalBackend.")
        if self.participants and any(p.process for p in self.participants.values()):
            raise BackendError("the run is already started.", fix="call teardown() first.")
        self.prepare()
        self._started_at = time.monotonic()
        self._launch(self.participants["trust"])
        if self.vault_path is not None:
            self._provision_vault(self.vault_path)
        for role in self.training_roles:
            self._launch(self.participants[role])

    def _provision_vault(self, path: Path) -> None:
        """As the owner: create the volume and register its passphrase (or keep the volume a
        resumed run made: the restarted trust service unsealed its passphrase)."""
        from hfl_lab.vault.keyrelease import provision_vault

        self._wait_roles(["trust"], self.connect_timeout_s, None)
        path.parent.mkdir(parents=True, exist_ok=True)
        with self.trust_client() as client:
            self.vault_info = provision_vault(
                client, self.admin_token, path, size_mb=self.config.vault_size_mb,
                release_policy=self.volume_release_policy(), reuse=path.exists(),
            )
        info = self.vault_info
        self._put(LabEvent("log", "owner", {
            "level": "info",
            "message": f"model volume {path.name}: LUKS{info.luks_version}, {info.size_mb} MB, "
            f"{info.data_path_kind} data path, "
            + ("created; its passphrase is registered in the key broker for ps0 only"
               if info.created else "kept from the earlier start of this run"),
        }))

    def _launch(self, p: Participant) -> None:
        assert self.platform is not None
        env = dict(os.environ)
        env.update(self.extra_env)
        env.pop(owner.OWNER_SECRET_ENV, None)  # the owner's credential stays with the owner
        env.pop("HFL_LAB_BOOTSTRAP_FILE", None)  # the pod way; here the bootstrap is the pipe
        env.update(p.env)
        pythonpath = [str(self.workload_root), env.get("PYTHONPATH", "")]
        env["PYTHONPATH"] = os.pathsep.join(x for x in pythonpath if x)
        env.setdefault("KERAS_BACKEND", "torch")
        env["PYTHONUNBUFFERED"] = "1"
        threads = str(self.config.threads) if self.config.threads else ""
        if threads:
            env["OMP_NUM_THREADS"] = threads
        p.log_path = self.log_dir / f"{p.role}.log"
        p.ready.clear()
        p.ended.clear()
        p.state = "starting"
        p.starts += 1
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
        bootstrap = {"platform": self.platform.export_secret().hex()}
        if p.role == "trust":
            bootstrap["admin_token"] = self.admin_token.hex()
        assert process.stdin is not None
        try:
            process.stdin.write(json.dumps(bootstrap) + "\n")
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

    def _read_stdout(self, p: Participant, stream: IO[str], log: IO[str],
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

    def _read_stderr(self, p: Participant, stream: IO[str], log: IO[str],
                     lock: threading.Lock) -> None:
        for line in stream:
            text = line.rstrip("\n")
            p.tail.append(text)
            with lock:
                log.write(text + "\n")
                log.flush()

    def _on_lifecycle(self, p: Participant, event: LabEvent) -> None:
        state = str(event.data.get("state", ""))
        p.state = state
        if state == "ready":
            port = event.data.get("port")
            p.port = int(port) if isinstance(port, int) else p.port
            p.ready.set()
        if state == "done" and p.role == "ps0":
            self._done_event = event

    def _watch(self, p: Participant, process: subprocess.Popen[str],
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
        elif p.state not in ("exited", "failed"):
            p.state = "exited"
            self._put(LabEvent("lifecycle", p.role,
                               {"state": "exited", "pid": process.pid, "exit_code": code,
                                "detail": f"exit code {code}"}))
        p.ended.set()
        if all(self.participants[r].ended.is_set() for r in self.training_roles):
            self._training_ended.set()
            self._queue.put(_END)

    def _put(self, event: LabEvent) -> None:
        self._queue.put(event)

    # ------------------------------------------------------------------ waiting and events

    def wait_ready(self, timeout_s: float, progress: ProgressCallback | None = None) -> None:
        self._wait_roles(self.roles, timeout_s, progress)

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
                code = p.returncode
                if code is not None and not p.ready.is_set():
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

    def events(self, idle_timeout_s: float | None = None) -> Iterator[LabEvent]:
        """Events until ps0 and every worker have exited (the trust service keeps running)."""
        while True:
            try:
                item = self._queue.get(timeout=idle_timeout_s)
            except queue.Empty:
                return
            if item is _END:
                self._finish_result()
                # what the readers still had
                while True:
                    try:
                        rest = self._queue.get_nowait()
                    except queue.Empty:
                        return
                    if rest is not _END:
                        yield rest
            yield item

    def run_training(
        self,
        on_event: Any = None,
        *,
        ready_timeout_s: float = 300.0,
        progress: ProgressCallback | None = None,
    ) -> TrainingResult:
        """start → wait_ready → consume events until the end; raises if the training failed."""
        if not any(p.process for p in self.participants.values()):
            self.start()
        self.wait_ready(ready_timeout_s, progress)
        deadline = time.monotonic() + self.config.timeout_s
        for event in self.events(idle_timeout_s=self.config.timeout_s):
            if on_event is not None:
                on_event(event)
            if time.monotonic() > deadline:
                raise BackendError(f"the run exceeded timeout_s={self.config.timeout_s:.0f} s.",
                                   fix="raise timeout_s or train fewer steps.")
        result = self._finish_result()
        if result is None or self._done_event is None:
            failed = [r for r in self.training_roles if self.participants[r].state == "failed"]
            details = "\n".join(
                f"  {r} (exit {self.participants[r].returncode}):\n"
                f"{self.participants[r].last_lines(8)}" for r in failed)
            raise BackendError(
                "training did not finish: "
                + (f"{', '.join(failed)} failed.\n{details}" if failed else "ps0 never said done."),
                fix="read the participants' logs in " + str(self.log_dir),
            )
        return result

    def _finish_result(self) -> TrainingResult | None:
        if self.result is not None:
            return self.result
        done = self._done_event
        if done is None:
            return None
        data = done.data
        self.result = TrainingResult(
            final_step=int(data.get("version", 0)),
            evaluation=dict(data.get("evaluation") or {}),
            checkpoint_step=data.get("checkpoint_step"),
            seconds=time.monotonic() - self._started_at,
            exit_codes={r: p.returncode for r, p in self.participants.items()},
            details=dict(data),
        )
        return self.result

    # ------------------------------------------------------------------ control

    def kill(self, role: str, sig: int = signal.SIGKILL) -> None:
        """Send ``sig`` to one participant (fault injection in tests and notebook 06)."""
        p = self._participant(role)
        if p.process is not None and p.process.poll() is None:
            p.state = "stopping" if sig != signal.SIGKILL else "killed"
            with contextlib.suppress(ProcessLookupError):
                os.killpg(p.process.pid, sig)
            p.process.wait(timeout=30)

    def restart(self, role: str) -> None:
        """Start a participant again with the same command (after it died or was killed)."""
        p = self._participant(role)
        if p.process is not None and p.process.poll() is None:
            raise BackendError(f"{role} is still running.", fix=f"kill('{role}') first.")
        for t in p.threads:
            t.join(timeout=5)
        self._training_ended.clear()
        self._launch(p)

    def _participant(self, role: str) -> Participant:
        if role not in self.participants:
            raise ConfigError(f"no participant {role!r} in this run.",
                              fix=f"use one of {', '.join(self.participants) or '(none yet)'}.")
        return self.participants[role]

    def trust_client(self) -> Any:
        """A client of this run's trust service, after its attestation was verified."""
        from hfl_lab.trust.client import TrustClient

        if self.policy is None or self.platform is None:
            raise BackendError("the run is not started.", fix="call start() first.")
        return TrustClient.connect(self.trust_address, self.policy,
                                   lab_root_der=self.platform.root_der, role="trust",
                                   verifier_name="owner")

    def fetch_vault(self, dest: Path) -> Path:
        """Copy the run's model store out of ps0's reach to ``dest``."""
        source = self.vault_path or self.run_dir / "vault" / "model.luks"
        if not source.exists():
            raise BackendError(
                f"this run has no model volume at {source}; its checkpoints are in "
                f"{self.checkpoint_dir}.",
                fix="run with vault=True so ps0 writes into the LUKS volume.",
            )
        dest = Path(dest)
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source, dest)
        return dest

    def teardown(self) -> None:
        """Stop every participant (SIGTERM, then SIGKILL after a grace period); idempotent."""
        with self._lock:
            if self._torn_down:
                return
            self._torn_down = True
        running = [p for p in self.participants.values()
                   if p.process is not None and p.process.poll() is None]
        for p in running:
            p.state = "stopping"
            assert p.process is not None
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(p.process.pid, signal.SIGTERM)
        deadline = time.monotonic() + 10
        for p in running:
            assert p.process is not None
            try:
                p.process.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(p.process.pid, signal.SIGKILL)
                p.process.wait(timeout=10)
        for p in self.participants.values():
            if p.process is not None:
                # the process group may hold children (e.g. a compiler) that outlived the leader
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(p.process.pid, signal.SIGKILL)
                for stream in (p.process.stdin, p.process.stdout, p.process.stderr):
                    with contextlib.suppress(OSError, ValueError):
                        if stream is not None:
                            stream.close()
            for t in p.threads:
                t.join(timeout=5)
        self._queue.put(_END)
        atexit.unregister(self.teardown)


def _parse_event(text: str) -> LabEvent | None:
    if not text.startswith("{"):
        return None
    try:
        event = LabEvent.from_json(text)
    except (ValueError, KeyError, TypeError):
        return None
    return event if isinstance(event.data, dict) else None


def _writable(folder: Path) -> bool:
    probe = folder
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    return os.access(probe, os.W_OK)

