"""Helpers for tests that run the local backend: configs, the process table, event summaries."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hfl_lab.backends.local import LocalBackend, TrainingResult
from hfl_lab.config import LabConfig
from hfl_lab.events import LabEvent
from tests.vault_support import FAST_KDF

#: `hfl-lab run --profile quick`, small enough for 2 cores: ResNet-8, a few steps, an 8 MB volume
#: whose key slot takes PBKDF2 at the LUKS minimum (no calibration: seconds per open saved)
SMALL_LAB_RUN: dict[str, Any] = {
    "depth": 8,
    "steps": 8,
    "batch_size": 16,
    "eval_every": 4,
    "checkpoint_every": 4,
    "vault_size_mb": 8,
    "vault_kdf_iterations": FAST_KDF,
}


def quick_config(tmp_path: Path, cifar_dir: Path, **overrides: Any) -> LabConfig:
    """A small local run. Without the workload-image pull unless a test asks for it
    (``workload_image="on"``/``"auto"``): the pull is the subject of
    tests/test_image_local_backend.py, and the whole-lab run (``hfl-lab run``, its default
    ``auto``) does it too; elsewhere it would only add a registry, a publish and an extra
    interpreter start per participant to every run of a suite that must fit 2 cores. The
    volume's key slot takes PBKDF2 at the LUKS minimum, as in the vault tests: cryptsetup's
    calibration and a 500 ms unlock at each open cost seconds on every run's critical path,
    and no test here is about the count."""
    values: dict[str, Any] = {
        "workload_image": "off",
        "depth": 8, "workers": 2, "steps": 50, "batch_size": 32, "learning_rate": 0.02,
        "eval_every": 0, "checkpoint_every": 25, "data_path": str(cifar_dir),
        "run_dir": str(tmp_path / "run"), "timeout_s": 600.0, "vault_kdf_iterations": FAST_KDF,
    }
    values.update(overrides)
    return LabConfig.profile("quick", **values)


def processes_mentioning(text: str) -> list[tuple[int, str]]:
    """(pid, command line) of every live process whose command line contains ``text``."""
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            state = next((line for line in (proc / "status").read_text().splitlines()
                          if line.startswith("State:")), "")
        except OSError:
            continue
        if text in cmdline and "zombie" not in state:
            found.append((int(proc.name), cmdline.strip()))
    return found


def parent_of(pid: int) -> int | None:
    """The parent pid of process ``pid`` (from /proc), None once it is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # pid (comm) state ppid ...: comm may hold spaces and parentheses
    return int(stat[stat.rindex(")") + 2:].split()[1])


def mean_loss_by_step(events: Iterable[LabEvent]) -> list[float]:
    """Mean worker loss of each step, in step order."""
    by_step: dict[int, list[float]] = defaultdict(list)
    for e in events:
        if e.kind == "metrics":
            by_step[int(e.data["step"])].append(float(e.data["loss"]))
    return [sum(v) / len(v) for _, v in sorted(by_step.items())]


def started(backend: LocalBackend) -> Iterator[LabEvent]:
    """Start ``backend``, wait until every participant is ready; its event stream."""
    backend.start()
    backend.wait_ready(180)
    return backend.events(idle_timeout_s=120)


def read_until(
    events: Iterator[LabEvent], seen: list[LabEvent], until: Callable[[LabEvent], bool]
) -> None:
    """Append events to ``seen`` up to and including the first one ``until`` accepts."""
    for event in events:
        seen.append(event)
        if until(event):
            return


@dataclass(frozen=True)
class FinishedRun:
    """A local run trained to its end and torn down, with what was seen of it."""

    backend: LocalBackend
    result: TrainingResult
    events: list[LabEvent]
    #: hex of the run's secrets (the owner's admin credential, the platform's signing key), to
    #: look for in its files
    secrets: list[str]

    @property
    def config(self) -> LabConfig:
        return self.backend.config


def run_to_the_end(config: LabConfig) -> FinishedRun:
    """Train ``config`` on the local backend to its end, every event kept; torn down after."""
    events: list[LabEvent] = []
    with LocalBackend(config) as backend:
        result = backend.run_training(on_event=events.append)
        assert backend.platform is not None
        secrets = [backend.admin_token.hex(), backend.platform.export_secret().hex()]
    return FinishedRun(backend, result, events, secrets)
