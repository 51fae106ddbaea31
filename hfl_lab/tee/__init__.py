"""Attestation core: TDX quotes, evidence providers, the verifier and the policy."""

from hfl_lab.tee.collateral import Collateral, fetch_collateral, load_collateral
from hfl_lab.tee.evidence import Evidence, EvidenceProvider, pad_report_data
from hfl_lab.tee.policy import AttestationPolicy, baseline_policy
from hfl_lab.tee.providers.coco_agent import CocoAgentProvider
from hfl_lab.tee.providers.configfs_tsm import ConfigfsTsmProvider
from hfl_lab.tee.providers.detect import Detection, choose_provider, detect
from hfl_lab.tee.providers.simulated import SimulatedTdProvider
from hfl_lab.tee.quote import Quote, parse_quote
from hfl_lab.tee.reports import TdReport10, TdReport15, TdReportStruct
from hfl_lab.tee.sim.measure import TdMeasurements, measure_workload
from hfl_lab.tee.sim.platform import SimulatedPlatform
from hfl_lab.tee.verdict import Check, Verdict
from hfl_lab.tee.verifier import Verifier

__all__ = [
    "AttestationPolicy",
    "Check",
    "CocoAgentProvider",
    "Collateral",
    "ConfigfsTsmProvider",
    "Detection",
    "Evidence",
    "EvidenceProvider",
    "Quote",
    "SimulatedPlatform",
    "SimulatedTdProvider",
    "TdMeasurements",
    "TdReport10",
    "TdReport15",
    "TdReportStruct",
    "Verdict",
    "Verifier",
    "baseline_policy",
    "choose_provider",
    "detect",
    "fetch_collateral",
    "load_collateral",
    "measure_workload",
    "pad_report_data",
    "parse_quote",
]
