"""Notebook 00 and ``hfl-lab check``: environment, TDX detection, cluster, backend choice."""

from __future__ import annotations

import json
import os
import platform
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

from hfl_lab._exceptions import BackendError, HflLabError
from hfl_lab.backends import create_backend
from hfl_lab.backends.base import PreflightCheck
from hfl_lab.config import LabConfig
from hfl_lab.lab.notebook import Table
from hfl_lab.tee.providers.detect import detect
from hfl_lab.vault.cryptsetup import cryptsetup_binary
from hfl_lab.vault.ext4_image import e2fs_tool

__all__ = ["PreflightReport", "run_preflight"]

#: packages whose versions the report shows (what a bug report needs)
PACKAGES = (
    "tensorflow", "keras", "numpy", "grpcio", "dcap-qvl", "cryptography", "papermill",
)
_OK, _FAIL, _INFO = "#dafbe1", "#ffebe9", ""


@dataclass(frozen=True)
class Finding:
    """One line of the report: a section, a check, and whether it blocks this run."""

    section: str
    check: PreflightCheck
    blocking: bool = True


@dataclass
class PreflightReport:
    """Everything preflight found; ``ok`` when nothing blocks the chosen backend."""

    backend: str
    backend_reason: str
    evidence: str
    findings: list[Finding] = field(default_factory=list)

    def add(self, section: str, check: PreflightCheck, *, blocking: bool = True) -> None:
        self.findings.append(Finding(section, check, blocking))

    @property
    def failures(self) -> list[Finding]:
        return [f for f in self.findings if f.blocking and not f.check.ok]

    @property
    def ok(self) -> bool:
        return not self.failures

    def table(self) -> Table:
        table = Table(
            ("section", "check", "ok", "what was seen", "fix"),
            title=f"preflight: backend {self.backend} ({self.backend_reason})",
            note=f"evidence: {self.evidence}",
        )
        for f in self.findings:
            mark = "ok" if f.check.ok else ("FAIL" if f.blocking else "note")
            color = _OK if f.check.ok else (_FAIL if f.blocking else _INFO)
            fix = "" if f.check.ok else f.check.fix
            table.add(f.section, f.check.name, mark, f.check.detail, fix, color=color)
        return table

    def to_text(self) -> str:
        verdict = "READY" if self.ok else f"NOT READY ({len(self.failures)} blocking)"
        return f"{self.table().to_text()}\n{verdict}"

    def __repr__(self) -> str:
        return self.to_text()

    def _repr_html_(self) -> str:
        verdict = (
            "<b style='color:#1a7f37'>READY</b>"
            if self.ok
            else f"<b style='color:#cf222e'>NOT READY</b> ({len(self.failures)} blocking)"
        )
        return self.table()._repr_html_() + f"<div>{verdict}</div>"

    def to_dict(self) -> dict[str, Any]:
        return {
            "backend": self.backend,
            "backend_reason": self.backend_reason,
            "evidence": self.evidence,
            "ok": self.ok,
            "checks": [
                {
                    "section": f.section,
                    "name": f.check.name,
                    "ok": f.check.ok,
                    "blocking": f.blocking,
                    "detail": f.check.detail,
                    "fix": f.check.fix,
                }
                for f in self.findings
            ],
        }

    def save(self, run_dir: str | Path) -> Path:
        path = Path(run_dir) / "preflight.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_dict(), indent=2) + "\n", encoding="utf-8")
        return path

    def raise_if_failed(self) -> None:
        """``BackendError`` naming every blocking failure and its fix."""
        if self.ok:
            return
        names = ", ".join(f.check.name for f in self.failures)
        first = self.failures[0].check
        raise BackendError(
            f"the {self.backend} backend cannot run here: {names} failed "
            f"({first.name}: {first.detail.rstrip('.')})",
            fix=first.fix or "see the preflight table above.",
        )


# ---------------------------------------------------------------------- the checks


def _version(name: str) -> str:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return "not installed"


def _environment(report: PreflightReport, config: LabConfig) -> None:
    report.add(
        "environment",
        PreflightCheck(
            "machine",
            True,
            f"Python {platform.python_version()} on {platform.system()} {platform.machine()}, "
            f"{os.cpu_count() or '?'} CPU cores",
        ),
        blocking=False,
    )
    versions = {name: _version(name) for name in PACKAGES}
    missing = [n for n, v in versions.items() if v == "not installed"]
    report.add(
        "environment",
        PreflightCheck(
            "versions",
            not missing,
            ", ".join(f"{n} {v}" for n, v in versions.items()),
            "run make install (pip install -r requirements.txt into .venv).",
        ),
        blocking=False,
    )
    if config.backend == "local" and config.vault:
        _vault_tools(report)


def _vault_tools(report: PreflightReport) -> None:
    for name, find in (
        ("cryptsetup", cryptsetup_binary),
        ("mke2fs", lambda: e2fs_tool("mke2fs")),
        ("debugfs", lambda: e2fs_tool("debugfs")),
    ):
        try:
            where = find()
        except HflLabError as e:
            report.add("vault", PreflightCheck(name, False, e.message, e.fix or ""))
        else:
            report.add("vault", PreflightCheck(name, True, where))


def _tdx(report: PreflightReport, config: LabConfig) -> str:
    found = detect(allow_simulated=config.allow_simulated)
    report.add(
        "TDX",
        PreflightCheck(
            "configfs-tsm",
            found.configfs_tsm,
            "writable: this is a TDX guest" if found.configfs_tsm else "not present (not a TD)",
        ),
        blocking=False,
    )
    report.add(
        "TDX",
        PreflightCheck(
            "CoCo attestation agent",
            found.coco_agent,
            "answers" if found.coco_agent else "not reachable (not a CoCo pod)",
        ),
        blocking=False,
    )
    usable = found.chosen != "none"
    report.add(
        "TDX",
        PreflightCheck(
            "evidence provider",
            usable,
            f"{found.chosen}: {found.reason}",
            "run inside a TDX guest, or set allow_simulated=true for a lab run without TDX.",
        ),
        blocking=config.backend == "local",
    )
    return f"{found.chosen} ({found.reason})"


def _backend_reason(config: LabConfig) -> str:
    if config.backend == "local":
        return (
            "every participant is a process on this machine in a SIMULATED TD; "
            "set backend=kubernetes for CoCo pods on TDX hosts"
        )
    return (
        f"participants are pods with runtimeClassName {config.runtime_class} "
        f"(overlay {config.k8s_overlay}) in namespace {config.namespace}"
    )


def _backend_checks(report: PreflightReport, config: LabConfig) -> None:
    section = "cluster" if config.backend == "kubernetes" else "backend"
    try:
        backend = create_backend(config)
        checks = backend.preflight()
    except HflLabError as e:
        report.add(section, PreflightCheck(config.backend, False, e.message, e.fix or ""))
        return
    for check in checks:
        report.add(section, check)
    if config.backend == "local":
        report.add(
            "cluster",
            PreflightCheck("Kubernetes", True, "not needed: the local backend runs processes"),
            blocking=False,
        )


def run_preflight(config: LabConfig) -> PreflightReport:
    """Check everything the configured backend needs; starts and changes nothing."""
    report = PreflightReport(config.backend, _backend_reason(config), evidence="")
    _environment(report, config)
    report.evidence = _tdx(report, config)
    _backend_checks(report, config)
    return report
