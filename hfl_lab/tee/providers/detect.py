"""Pick the evidence provider: real TDX interfaces first, the simulated TD only if allowed."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from hfl_lab._exceptions import AttestationError
from hfl_lab.tee.evidence import EvidenceProvider
from hfl_lab.tee.providers.coco_agent import DEFAULT_ENDPOINT, CocoAgentProvider
from hfl_lab.tee.providers.configfs_tsm import DEFAULT_ROOT, ConfigfsTsmProvider
from hfl_lab.tee.providers.simulated import SimulatedTdProvider


@dataclass(frozen=True)
class Detection:
    """What was found on this machine, and which provider will be used and why."""

    configfs_tsm: bool
    coco_agent: bool
    chosen: str
    reason: str


def detect(
    *,
    allow_simulated: bool,
    configfs_root: Path = DEFAULT_ROOT,
    agent_endpoint: str = DEFAULT_ENDPOINT,
) -> Detection:
    tsm = ConfigfsTsmProvider.available(configfs_root)
    agent = CocoAgentProvider(agent_endpoint).available()
    if tsm:
        return Detection(tsm, agent, "configfs-tsm", f"{configfs_root} is writable (TDX guest)")
    if agent:
        return Detection(tsm, agent, "coco-attestation-agent", f"agent answers on {agent_endpoint}")
    if allow_simulated:
        return Detection(
            tsm, agent, "simulated-td",
            "no TDX interface here; the configuration allows the SIMULATED TD (not secure)",
        )
    return Detection(tsm, agent, "none", "no TDX interface here and simulated TDs are not allowed")


def choose_provider(
    detection: Detection, simulated: SimulatedTdProvider | None = None
) -> EvidenceProvider:
    """The provider ``detection`` chose; the simulated one must be handed in ready-made."""
    if detection.chosen == "configfs-tsm":
        return ConfigfsTsmProvider()
    if detection.chosen == "coco-attestation-agent":
        return CocoAgentProvider()
    if detection.chosen == "simulated-td" and simulated is not None:
        return simulated
    raise AttestationError(
        f"no evidence provider: {detection.reason}",
        check="evidence",
        fix="run inside a TDX guest, or set allow_simulated: true for a lab run without TDX",
    )
