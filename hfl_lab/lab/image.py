"""Notebook 03: build and measure the trainer image, and derive the policy's reference values.

On ``local`` the image is the lab's own source tree, measured the way the simulated TD measures
it (MR_TD over every trainer/hfl_lab source file), and the reference values come from that
measurement through ``hfl-lab attest policy --from-evidence``'s function, then are checked with
``hfl-lab attest verify``'s. On ``kubernetes`` the container image is built, encrypted and signed
with docker, skopeo and cosign when they are installed; otherwise each step says why it was
skipped and what to run.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hfl_lab.attestation import policy_from_evidence, policy_text, verify_evidence
from hfl_lab.backends.kubernetes import image as tools
from hfl_lab.config import LabConfig
from hfl_lab.lab.notebook import Table
from hfl_lab.lab.trust import OWNER_ROLE, VerdictView, lab_roles
from hfl_lab.tee.policy import AttestationPolicy
from hfl_lab.tee.providers.simulated import SimulatedTdProvider
from hfl_lab.tee.sim.measure import TdMeasurements, measure_workload, source_files
from hfl_lab.tee.sim.platform import SimulatedPlatform
from hfl_lab.tee.verdict import Verdict

__all__ = ["ImageReport", "ImageStep", "measure_image"]

_REPO = Path(__file__).resolve().parents[2]
LOCAL_REASON = (
    "backend=local: the participants run this source tree in SIMULATED TDs, so no container "
    "image is built, encrypted or signed"
)


@dataclass(frozen=True)
class ImageStep:
    """One step of making the image: done, skipped (with why) or planned, and its command."""

    name: str
    status: str
    detail: str
    command: str = ""


@dataclass
class ImageReport:
    """What was built and measured, the derived reference values and their check."""

    backend: str
    steps: list[ImageStep]
    measurements: dict[str, TdMeasurements]
    policy: AttestationPolicy
    policy_text: str
    verdict: Verdict | None = None
    files: dict[str, str] = field(default_factory=dict)

    def table(self) -> Table:
        table = Table(("step", "status", "detail", "command"), title="the trainer image")
        for s in self.steps:
            color = {"done": "#dafbe1", "failed": "#ffebe9"}.get(s.status, "")
            table.add(s.name, s.status.upper(), s.detail, s.command, color=color)
        return table

    def measurements_table(self) -> Table:
        table = Table(
            ("role", "MR_TD", "MR_CONFIG_ID", "RTMR0", "RTMR1", "RTMR2", "RTMR3"),
            title="measurements per role (what each TD will report)",
            note="MR_TD: the workload code (the same for every role); MR_CONFIG_ID and RTMR3: "
            "the role's configuration; RTMR0-2: virtual hardware, runtime, command line.",
        )
        for role, m in self.measurements.items():
            table.add(role, *(_short(v) for v in [m.mr_td, m.mr_config_id, *m.rtmrs]))
        return table

    def verdict_view(self) -> VerdictView | None:
        if self.verdict is None:
            return None
        return VerdictView(self.verdict, "the reference TD under the derived policy")

    def __repr__(self) -> str:
        return f"{self.table().to_text()}\n\n{self.measurements_table().to_text()}"

    def _repr_html_(self) -> str:
        return self.table()._repr_html_() + self.measurements_table()._repr_html_()

    def to_dict(self) -> dict[str, Any]:
        return {
            "backend": self.backend,
            "steps": [s.__dict__ for s in self.steps],
            "measurements": {r: m.summary() for r, m in self.measurements.items()},
            "policy": self.policy.to_dict(),
            "reference_accepted": self.verdict.accepted if self.verdict is not None else None,
            "files": self.files,
        }


def _short(value: bytes) -> str:
    text = value.hex()
    return f"{text[:12]}…{text[-4:]}"


def _tree_step() -> ImageStep:
    files = source_files(_REPO)
    size = sum(f.stat().st_size for f in files)
    return ImageStep(
        "workload image",
        "done",
        f"{len(files)} source files of trainer/ and hfl_lab/, {size / 1024:.0f} KiB, "
        "hashed into MR_TD",
    )


def _tool_steps(config: LabConfig) -> list[ImageStep]:
    tag = config.image
    name = tag.rsplit(":", 1)[0] if ":" in tag.rsplit("/", 1)[-1] else tag
    planned = [
        ("build", "docker", tools.build_command(tag, _REPO)),
        ("push", "docker", tools.push_command(tag)),
        ("digest", "skopeo", tools.digest_command(tag)),
        ("encrypt layers", "skopeo", tools.encrypt_command(
            tag, f"{name}:encrypted", Path("image.key"), "hfl-lab")),
        ("sign", "cosign", ["cosign", "sign", "--yes", "--key", "cosign.key", f"{name}@<digest>"]),
    ]
    steps = []
    for step, tool, argv in planned:
        command = " ".join(argv)
        if config.backend == "local":
            steps.append(ImageStep(step, "skipped", LOCAL_REASON, command))
        elif shutil.which(tool) is None:
            steps.append(ImageStep(step, "skipped", f"{tool} is not installed here: "
                                   f"{tools.INSTALL[tool]}", command))
        else:
            steps.append(ImageStep(step, "planned", f"run with {tool} on the build host", command))
    return steps


def measure_image(config: LabConfig, *, folder: str | Path | None = None) -> ImageReport:
    """Measure every role, derive the reference policy from the evidence, check it accepts."""
    out = Path(folder) if folder is not None else Path(config.run_dir) / "image"
    out.mkdir(parents=True, exist_ok=True)
    run = {"run_dir": str(Path(config.run_dir).resolve()), "workers": config.workers}
    roles = [*lab_roles(config), OWNER_ROLE]
    measurements = {role: measure_workload(role=role, config=run) for role in roles}
    steps = [_tree_step(), *_tool_steps(config)]

    # The reference TD: ps0, as the simulated TD reports it; the same functions as the CLI's.
    platform = SimulatedPlatform.generate()
    evidence = SimulatedTdProvider(platform, measurements["ps0"]).get_evidence(b"reference")
    policy = policy_from_evidence(evidence)
    text = policy_text(policy, origin="the simulated ps0 TD of this lab (notebook 03)")
    verdict = verify_evidence(evidence, policy, lab_root=platform.root_der)
    verdict.verifier, verdict.subject = "lab", "ps0 (reference)"

    files = {
        "reference_policy": str(out / "reference_policy.yaml"),
        "measurements": str(out / "measurements.json"),
        "event_log": str(out / "event_log.json"),
    }
    Path(files["reference_policy"]).write_text(text, encoding="utf-8")
    Path(files["measurements"]).write_text(
        json.dumps({r: m.summary() for r, m in measurements.items()}, indent=2) + "\n"
    )
    Path(files["event_log"]).write_text(
        json.dumps({r: [e.__dict__ for e in m.events] for r, m in measurements.items()},
                   indent=2) + "\n"
    )
    report = ImageReport(config.backend, steps, measurements, policy, text, verdict, files)
    (out / "image.json").write_text(json.dumps(report.to_dict(), indent=2) + "\n")
    return report
