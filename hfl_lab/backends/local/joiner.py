"""One worker TD that joins a hosted run from this machine (``hfl-lab join``).

The documents come from the host's trust service (its enrollment desk, after the joiner verified
it against the join link): the run's config document and signed policy are written into this
joiner's own folder byte for byte, so the worker's MR_CONFIG_ID is the one the host's policy
names, and the worker is launched with the local backend's process code (its own process group,
the bootstrap on stdin, events on the queue). The worker measures the code it runs here: a joiner
whose worker code differs from the host's is refused at attestation.
"""

from __future__ import annotations

import queue
import signal
import subprocess
import sys
import threading
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

from hfl_lab._exceptions import BackendError, ConfigError
from hfl_lab.backends.local.processes import (
    END_OF_EVENTS,
    ParticipantProcess,
    ParticipantProcesses,
)
from hfl_lab.config import LabConfig
from hfl_lab.events import LabEvent
from hfl_lab.tee.policy import SIGNATURE_SUFFIX
from hfl_lab.tee.providers.configfs_tsm import DEFAULT_ROOT as TSM_ROOT
from hfl_lab.tee.providers.configfs_tsm import ConfigfsTsmProvider
from hfl_lab.trust.enrollment import RunDocuments, bootstrap_platform

__all__ = ["JoinedWorker"]

WORKLOAD_ROOT = Path(__file__).resolve().parents[3]


class JoinedWorker(ParticipantProcesses):
    """The worker process of one slot of a hosted run, on this machine."""

    def __init__(self, slot: str, documents: RunDocuments, *, run_dir: Path,
                 data_path: str | None = None, python: str | None = None,
                 workload_root: Path | None = None, env: Mapping[str, str] | None = None,
                 configfs_root: Path = TSM_ROOT) -> None:
        self.slot = slot
        self.index = int(slot.removeprefix("worker"))
        self.run_dir = Path(run_dir).expanduser().resolve()
        self.log_dir = self.run_dir / "logs"
        self.config_path = self.run_dir / "config.yaml"
        self.policy_path = self.run_dir / "policy.yaml"
        self.data_path = data_path
        self.python = python or sys.executable
        self.workload_root = workload_root or WORKLOAD_ROOT
        self.extra_env = dict(env or {})
        self.config = _lab_config(documents.config_yaml)
        if self.index >= self.config.workers:
            raise ConfigError(f"the hosted run has {self.config.workers} slots, not {slot}.",
                              fix="use a link the host printed for this run.")
        self.platform = bootstrap_platform(documents.bootstrap)
        #: simulated: the slot's keys from the host; hardware: this TDX guest's own quotes
        self.evidence = "simulated" if self.platform is not None else "configfs-tsm"
        if self.platform is None and not ConfigfsTsmProvider.available(configfs_root):
            raise ConfigError(
                "the hosted run takes hardware TDX evidence (its host sent no simulated keys), "
                f"and this machine is no TDX guest: {configfs_root} (configfs-tsm, Linux 6.7+) "
                "is missing or not writable.",
                fix="join from a TDX guest (a TD with configfs-tsm mounted), or ask the host "
                "for a simulated run (allow_simulated: true) to join from a laptop.")
        self._documents = documents
        self.participants: dict[str, ParticipantProcess] = {}
        self._queue: queue.Queue[Any] = queue.Queue()
        self._lock = threading.Lock()
        self._torn_down = False
        self._done_event: LabEvent | None = None
        self._training_ended = threading.Event()

    def __repr__(self) -> str:
        keys = "<slot keys in memory>" if self.platform is not None else "configfs-tsm"
        return f"JoinedWorker({self.slot}, {str(self.run_dir)!r}, {keys})"

    @property
    def roles(self) -> list[str]:
        return [self.slot]

    @property
    def training_roles(self) -> list[str]:
        return [self.slot]

    def _provision_trust(self, p: ParticipantProcess) -> None:  # no trust service here
        raise BackendError("a joiner runs no trust service.", fix="this is a bug in hfl-lab.")

    def start(self) -> None:
        """Write the run's documents into this joiner's folder and launch the worker TD."""
        self.log_dir.mkdir(parents=True, exist_ok=True)
        documents = self._documents
        self.config_path.write_text(documents.config_yaml, encoding="utf-8")
        self.policy_path.write_text(documents.policy_yaml, encoding="utf-8")
        signature = self.policy_path.with_name(self.policy_path.name + SIGNATURE_SUFFIX)
        signature.write_text(documents.policy_signature + "\n", encoding="utf-8")
        args = ["trainer", "worker", "--index", str(self.index), "--config",
                str(self.config_path), "--policy", str(self.policy_path)]
        if self.data_path:
            args += ["--data", str(self.data_path)]
        p = ParticipantProcess(self.slot, args, {"HFL_LAB_ROLE": self.slot,
                                                 "HFL_LAB_EVIDENCE": self.evidence})
        self.participants[self.slot] = p
        self._launch(p)

    @property
    def process(self) -> ParticipantProcess:
        return self.participants[self.slot]

    def wait_ended(self, timeout_s: float) -> bool:
        """Whether the worker ended by itself within ``timeout_s``: once the run is over it
        reads the final model, says how it ended and exits (:meth:`stop` then has nothing
        to do; stopped earlier, it may be caught in its interpreter's shutdown, where the
        SIGTERM handler is gone, and end with -15)."""
        return self.process.ended.wait(timeout_s)

    def stop(self) -> None:
        """Leave: SIGTERM to the worker (it exits cleanly), SIGKILL if it does not."""
        with self._lock:
            if self._torn_down:
                return
        p = self.participants.get(self.slot)
        if p is not None and p.process is not None and p.process.poll() is None:
            try:
                self.kill(self.slot, signal.SIGTERM)
            except subprocess.TimeoutExpired:
                self.kill(self.slot, signal.SIGKILL)
        with self._lock:
            self._torn_down = True
        self._queue.put(END_OF_EVENTS)


def _lab_config(config_yaml: str) -> LabConfig:
    try:
        document = yaml.safe_load(config_yaml)
        lab = document["lab"]
        return LabConfig.from_dict(lab)
    except (yaml.YAMLError, TypeError, KeyError):
        raise ConfigError("the host sent a config document without a 'lab' section.",
                          fix="the host and this joiner must run the same hfl-lab version.") \
            from None
