"""Measurements of what a simulated TD runs: MR_TD, MR_CONFIG_ID and RTMRs, with an event log."""

from __future__ import annotations

import hashlib
import json
import platform
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ZERO48 = bytes(48)
# The workload image of a simulated TD is the lab's own source code (what the process runs).
WORKLOAD_PACKAGES = ("trainer", "hfl_lab")
_SOURCE_SUFFIXES = (".py", ".proto")


def sha384(data: bytes) -> bytes:
    return hashlib.sha384(data).digest()


def extend(register: bytes, digest: bytes) -> bytes:
    """RTMR extension as TDG.MR.RTMR.EXTEND does it: new = SHA-384(old || digest)."""
    return sha384(register + digest)


def measured_json(value: Any) -> bytes:
    """The bytes a configuration document is measured as: sorted keys, no spaces, ASCII."""
    return json.dumps(value, sort_keys=True, separators=(",", ":")).encode()


def source_files(root: Path, packages: Sequence[str] = WORKLOAD_PACKAGES) -> list[Path]:
    """Source files of the workload image, in a stable order (generated stubs excluded)."""
    files: list[Path] = []
    for pkg in packages:
        for path in sorted((root / pkg).rglob("*")):
            if (
                path.is_file()
                and path.suffix in _SOURCE_SUFFIXES
                and "_pb2" not in path.name
                and "__pycache__" not in path.parts
            ):
                files.append(path)
    return files


def workload_digest(root: Path | None = None, files: Iterable[Path] | None = None) -> bytes:
    """SHA-384 over (relative path, length, content) of every workload source file."""
    root = root or Path(__file__).resolve().parents[3]
    h = hashlib.sha384()
    for path in files if files is not None else source_files(root):
        data = path.read_bytes()
        rel = path.resolve().relative_to(root.resolve()).as_posix().encode()
        h.update(len(rel).to_bytes(4, "little") + rel + len(data).to_bytes(8, "little") + data)
    return h.digest()


@dataclass(frozen=True)
class MeasuredEvent:
    """One extend operation: which register, the digest extended, and what it measured."""

    register: str
    digest: str
    description: str


@dataclass
class TdMeasurements:
    """The measurement registers of one simulated TD and the event log that produced them."""

    mr_td: bytes
    mr_config_id: bytes
    rtmrs: list[bytes] = field(default_factory=lambda: [ZERO48] * 4)
    events: list[MeasuredEvent] = field(default_factory=list)

    def extend_rtmr(self, index: int, data: bytes, description: str) -> None:
        digest = sha384(data)
        self.rtmrs[index] = extend(self.rtmrs[index], digest)
        self.events.append(MeasuredEvent(f"rtmr{index}", digest.hex(), description))

    def summary(self) -> dict[str, str]:
        out = {"mr_td": self.mr_td.hex(), "mr_config_id": self.mr_config_id.hex()}
        out.update({f"rtmr{i}": r.hex() for i, r in enumerate(self.rtmrs)})
        return out


def measure_workload(
    *,
    role: str,
    config: dict[str, Any] | None = None,
    argv: Sequence[str] | None = None,
    root: Path | None = None,
    virtual_hardware: dict[str, Any] | None = None,
) -> TdMeasurements:
    """Measure a participant the way its TD would be measured at launch.

    - MR_TD: the TD image = the lab's workload code (one changed byte changes it);
    - MR_CONFIG_ID: the initdata-like role configuration (role + run config), as CoCo binds it;
    - RTMR0: virtual hardware / TD configuration; RTMR1: the runtime (interpreter);
      RTMR2: the command line; RTMR3: the role configuration again, as a runtime event.
    """
    image = workload_digest(root)
    initdata = measured_json({"role": role, "config": config or {}})
    m = TdMeasurements(
        mr_td=sha384(b"hfl-lab/simulated-td/mr_td/v1" + image), mr_config_id=sha384(initdata)
    )
    m.events.append(MeasuredEvent("mr_td", image.hex(), "workload image (trainer + hfl_lab)"))
    hw = virtual_hardware or {"vcpus": 1, "memory": "host", "tdx_module": "simulated"}
    m.extend_rtmr(0, measured_json(hw), "TD virtual hardware configuration")
    runtime = f"{platform.python_implementation()} {sys.version.split()[0]}".encode()
    m.extend_rtmr(1, runtime, f"runtime {runtime.decode()}")
    cmdline = "\0".join(argv if argv is not None else ["python", "-m", "trainer", role]).encode()
    m.extend_rtmr(2, cmdline, "command line")
    m.extend_rtmr(3, initdata, f"role configuration ({role})")
    return m
