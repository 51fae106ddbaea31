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

With ``workload_image`` on, ps0 and the workers run the encrypted, signed workload image they
pulled, with the layer key released to their attested TDs (:mod:`.image_side`,
:mod:`trainer.image_boot`); the trust service runs this checkout.

This module prepares a run (its config, policy and reference measurements), starts it, turns the
participants' events into a :class:`TrainingResult` and tears it down. :mod:`.processes` launches
and watches the participant processes, :mod:`.owner_side` does the owner's part of the vault,
:mod:`.image_side` the owner's part of the workload image, and :mod:`.preflight` checks the
machine.
"""

from __future__ import annotations

import atexit
import contextlib
import ipaddress
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hfl_lab import owner
from hfl_lab._exceptions import BackendError, ConfigError
from hfl_lab.backends.base import PreflightCheck, ProgressCallback
from hfl_lab.backends.local.image_side import WorkloadImageSide
from hfl_lab.backends.local.owner_side import OwnerSide
from hfl_lab.backends.local.preflight import local_checks
from hfl_lab.backends.local.processes import (
    END_OF_EVENTS,
    ParticipantProcess,
    ParticipantProcesses,
    free_port,
    wait_for_group_exit,
)
from hfl_lab.config import LabConfig
from hfl_lab.events import LabEvent, startup_event
from hfl_lab.image import LabRegistry, LayerKey, PublishedImage
from hfl_lab.tee.policy import AttestationPolicy
from hfl_lab.tee.sim.measure import TdMeasurements, measure_workload
from hfl_lab.tee.sim.platform import SimulatedPlatform
from hfl_lab.vault.attested_signers import AttestedSigners
from trainer.participant_config import Deployment, ParticipantConfig

__all__ = ["LocalBackend", "ParticipantProcess", "TrainingResult", "free_port"]

WORKLOAD_ROOT = Path(__file__).resolve().parents[3]
#: how many times a hosted run brings a crashed trust service or ps0 back before it gives up
HOSTED_RESTARTS = 3


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


class LocalBackend(ParticipantProcesses, OwnerSide, WorkloadImageSide):
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
        listen_host: str = "127.0.0.1",
        remote_workers: bool = False,
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
        #: the address the trust service and ps0 listen on and are reached at; a hosted run
        #: (``hfl-lab host``) names one that joiners on other machines reach
        self.listen_host = _check_listen_host(listen_host)
        self.remote_workers = remote_workers
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
        #: the workload image (workload_image): the run's registry, what was published, and
        #: the layer key until the key broker holds it (memory only)
        self.registry: LabRegistry | None = None
        self.published_image: PublishedImage | None = None
        self._layer_key: LayerKey | None = None
        self.participants: dict[str, ParticipantProcess] = {}
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

    # ------------------------------------------------------------------ preflight

    def preflight(self) -> list[PreflightCheck]:
        return local_checks(self.config, python=self.python, run_dir=self.run_dir,
                             processes=len(self.roles))

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
        self.admin_token = owner.admin_token(owner.run_salt(self.owner_salt_path))
        # public: what the owner's trusted node needs to verify ps0's evidence offline
        AttestedSigners.write_platform(self.trust_dir, self.platform.root_der,
                                       self.platform.collateral_json)
        host = self.listen_host
        trust_port, ps_port = free_port(host), free_port(host)
        while ps_port == trust_port:
            ps_port = free_port(host)
        self.trust_address = f"{host}:{trust_port}"
        self.ps_address = f"{host}:{ps_port}"
        image = {}
        if self.image_enabled():
            self._put(startup_event("publishing the workload image (build, encrypt, sign, push)"))
            image = self._publish_image()
        deployment = Deployment(
            trust_address=self.trust_address,
            ps_address=self.ps_address,
            workers=self.config.workers,
            evidence="simulated",
            overlay="local",
            checkpoint_dir="" if self.vault_path else str(self.checkpoint_dir),
            vault_path=str(self.vault_path or ""),
            policy_path=str(self.policy_path),
            policy_key=owner.policy_key(self.admin_token),
            data_dir=self.config.data_path,
            connect_timeout_s=self.connect_timeout_s,
            **image,
        )
        ParticipantConfig.write(self.config_path, deployment, self.config)
        document = ParticipantConfig.load(self.config_path).measured()
        config = str(self.config_path)
        commands = {
            "trust": ["trainer", "trust", "--config", config, "--policy",
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
            if role in self.roles:  # a hosted run's worker slots are measured, not launched
                self.participants[role] = ParticipantProcess(role, args, env)
        if self.config.policy_path:
            self.policy = AttestationPolicy.load(self.config.policy_path)
        else:
            self.policy = self.reference_policy()
        # signed by the owner: participants take no policy but the one the owner signed
        signer = owner.policy_signing_key(self.admin_token)
        self.policy.save_signed(self.policy_path, signer)
        if self.vault_path is not None:
            self.volume_release_policy().save_signed(self.volume_policy_path, signer)

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
        # up, attested by the owner and provisioned before anyone else starts
        self._wait_roles(["trust"], self.connect_timeout_s, None)
        if self.vault_path is not None:
            self._put(startup_event("the owner creates the model's LUKS volume"))
            self._provision_vault(self.vault_path)
        if self.published_image is not None:
            self._put(startup_event("the owner registers the image's layer key"))
            self._register_layer_key()
        for role in self.training_roles:
            self._launch(self.participants[role])

    # ------------------------------------------------------------------ waiting and events

    def wait_ready(self, timeout_s: float, progress: ProgressCallback | None = None) -> None:
        self._wait_roles(self.roles, timeout_s, progress)

    def _at_end(self) -> None:
        self._finish_result()

    def _restart_after_failure(self, p: ParticipantProcess) -> bool:
        """A hosted run (``remote_workers``) brings its crashed trust service or ps0 back, up
        to HOSTED_RESTARTS times, while training is not done: the joiners are on other
        machines and reconnect (ps0) or attest again (the trust service) on their own."""
        return (self.remote_workers and p.role in ("trust", "ps0")
                and self._done_event is None and p.starts <= HOSTED_RESTARTS)

    def run_training(
        self,
        on_event: Callable[[LabEvent], None] | None = None,
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
                wait_for_group_exit(p.process.pid, timeout_s=5)  # their copies of its files too
                for stream in (p.process.stdin, p.process.stdout, p.process.stderr):
                    with contextlib.suppress(OSError, ValueError):
                        if stream is not None:
                            stream.close()
            for t in p.threads:
                t.join(timeout=5)
        self._stop_registry()
        self._queue.put(END_OF_EVENTS)
        atexit.unregister(self.teardown)


def _check_listen_host(host: str) -> str:
    """An IPv4 address to listen on and to be reached at (it goes into every join link)."""
    try:
        address = ipaddress.IPv4Address(host)
    except ValueError:
        raise ConfigError(
            f"the listen address must be an IPv4 address, got {host!r}.",
            fix="name this machine's address on the network the joiners use, e.g. "
            "--address 192.168.1.20 (`ip -4 addr` lists them).",
        ) from None
    if address.is_unspecified:
        raise ConfigError(
            f"the listen address {host} is not an address a joiner can reach.",
            fix="name this machine's address on the joiners' network (`ip -4 addr` lists "
            "them); the join links carry it.",
        )
    return str(address)
