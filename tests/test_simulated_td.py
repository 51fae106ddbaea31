"""The simulated TD: real quote layout, same verifier path, refused whenever it should be."""

from __future__ import annotations

import hashlib
import shutil
import time
from pathlib import Path

import pytest

from hfl_lab.tee import (
    SimulatedPlatform,
    SimulatedTdProvider,
    TdMeasurements,
    Verifier,
    measure_workload,
    parse_quote,
)
from hfl_lab.tee.sim.measure import WORKLOAD_PACKAGES
from tests.td_support import policy_for, verifier_for

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def measurements() -> TdMeasurements:
    """worker0 with a run configuration (overrides the conftest fixture; platform is its)."""
    return measure_workload(role="worker0", config={"depth": 8})


def _binding() -> bytes:
    return hashlib.sha256(b"spki").digest() + hashlib.sha256(b"nonce").digest()


def test_simulated_quote_has_the_real_v4_layout(platform: SimulatedPlatform,
                                                measurements: TdMeasurements) -> None:
    evidence = SimulatedTdProvider(platform, measurements).get_evidence(_binding())

    quote = parse_quote(evidence.quote)

    assert quote.header.version == 4 and quote.is_tdx
    assert quote.to_bytes() == evidence.quote
    assert quote.td_report.mr_td == measurements.mr_td
    assert quote.fmspc() == "00AB1AB00000"
    assert evidence.simulated


def test_accepted_under_its_own_measurements_when_simulation_is_allowed(
    platform: SimulatedPlatform, measurements: TdMeasurements
) -> None:
    evidence = SimulatedTdProvider(platform, measurements).get_evidence(_binding())
    verifier = verifier_for(policy_for(measurements), platform=platform)

    verdict = verifier.verify(evidence, binding=_binding(), issued_at=time.time())

    assert verdict.accepted, verdict.to_table()
    assert verdict.simulated and verdict.tcb_status == "UpToDate"
    assert "SIMULATED" in verdict.to_table()


def test_rejected_when_simulation_is_not_allowed(
    platform: SimulatedPlatform, measurements: TdMeasurements
) -> None:
    evidence = SimulatedTdProvider(platform, measurements).get_evidence(_binding())
    verifier = verifier_for(policy_for(measurements, allow_simulated=False), platform=platform)

    verdict = verifier.verify(evidence, binding=_binding())

    assert not verdict.accepted
    assert [c.name for c in verdict.failures] == ["simulated"]


def test_rejected_without_the_lab_root_even_if_simulation_is_allowed(
    platform: SimulatedPlatform, measurements: TdMeasurements
) -> None:
    evidence = SimulatedTdProvider(platform, measurements).get_evidence(_binding())

    verdict = Verifier(policy_for(measurements)).verify(evidence, binding=_binding())

    assert not verdict.accepted
    assert "trusted root" in verdict.check("dcap").reason


def test_rejected_when_the_trainer_code_changed_by_one_byte(
    tmp_path: Path, platform: SimulatedPlatform, measurements: TdMeasurements
) -> None:
    for pkg in WORKLOAD_PACKAGES:
        shutil.copytree(REPO / pkg, tmp_path / pkg, ignore=shutil.ignore_patterns("__pycache__"))
    target = tmp_path / "trainer" / "__init__.py"
    data = bytearray(target.read_bytes())
    data[-2] ^= 0x01
    target.write_bytes(bytes(data))
    tampered = measure_workload(role="worker0", config={"depth": 8}, root=tmp_path)
    evidence = SimulatedTdProvider(platform, tampered).get_evidence(_binding())
    verifier = verifier_for(policy_for(measurements), platform=platform)

    verdict = verifier.verify(evidence, binding=_binding())

    assert tampered.mr_td != measurements.mr_td
    assert not verdict.accepted
    assert not verdict.check("mr_td").passed
    assert verdict.check("dcap").passed  # genuine evidence of the wrong workload


def test_rejected_when_debug_is_set(
    platform: SimulatedPlatform, measurements: TdMeasurements
) -> None:
    evidence = SimulatedTdProvider(platform, measurements, debug=True).get_evidence(_binding())
    verifier = verifier_for(policy_for(measurements), platform=platform)

    verdict = verifier.verify(evidence, binding=_binding())

    assert not verdict.accepted
    assert not verdict.check("debug").passed
    assert "DEBUG" in verdict.check("dcap").reason


def test_rejected_when_report_data_does_not_match(
    platform: SimulatedPlatform, measurements: TdMeasurements
) -> None:
    evidence = SimulatedTdProvider(platform, measurements).get_evidence(_binding())
    verifier = verifier_for(policy_for(measurements), platform=platform)
    other = hashlib.sha256(b"another key").digest() + hashlib.sha256(b"nonce").digest()

    verdict = verifier.verify(evidence, binding=other)

    assert not verdict.accepted
    assert [c.name for c in verdict.failures] == ["report_data"]


def test_rejected_when_evidence_is_stale(
    platform: SimulatedPlatform, measurements: TdMeasurements
) -> None:
    evidence = SimulatedTdProvider(platform, measurements).get_evidence(_binding())
    verifier = verifier_for(policy_for(measurements), platform=platform)

    verdict = verifier.verify(evidence, binding=_binding(), issued_at=time.time() - 3600)

    assert [c.name for c in verdict.failures] == ["freshness"]


@pytest.mark.parametrize("status", ["OutOfDate", "ConfigurationNeeded", "SWHardeningNeeded"])
def test_chosen_tcb_status_is_reported_and_judged_by_the_policy(
    platform: SimulatedPlatform, measurements: TdMeasurements, status: str
) -> None:
    provider = SimulatedTdProvider(platform, measurements, tcb_status=status)
    evidence = provider.get_evidence(_binding())
    strict = verifier_for(policy_for(measurements), platform=platform)
    lenient = verifier_for(
        policy_for(
            measurements,
            accepted_tcb_statuses=["UpToDate", status],
            accepted_advisory_ids=["HFL-LAB-SA-0001"],
        ),
        platform=platform,
    )

    refused = strict.verify(evidence, binding=_binding())
    accepted = lenient.verify(evidence, binding=_binding())

    assert refused.tcb_status == status and not refused.accepted
    assert accepted.accepted, accepted.to_table()


def test_revoked_tcb_fails_dcap(platform: SimulatedPlatform, measurements: TdMeasurements) -> None:
    evidence = SimulatedTdProvider(platform, measurements, tcb_status="Revoked").get_evidence(b"")
    verdict = verifier_for(policy_for(measurements), platform=platform).verify(evidence)

    assert "revoked" in verdict.check("dcap").reason.lower()


def test_platform_survives_export_to_a_child_process(
    platform: SimulatedPlatform, measurements: TdMeasurements
) -> None:
    clone = SimulatedPlatform.from_secret(platform.export_secret())
    evidence = SimulatedTdProvider(clone, measurements).get_evidence(_binding())

    verdict = verifier_for(policy_for(measurements), platform=platform).verify(
        evidence, binding=_binding()
    )

    assert clone.root_der == platform.root_der
    assert verdict.accepted, verdict.to_table()


def test_evidence_after_the_platform_collateral_window_is_rejected(
    measurements: TdMeasurements,
) -> None:
    old = SimulatedPlatform.generate(now=int(time.time()) - 90 * 86400, validity_days=30)
    evidence = SimulatedTdProvider(old, measurements).get_evidence(_binding())

    verdict = verifier_for(policy_for(measurements), platform=old).verify(evidence)

    assert "collateral expired" in verdict.check("dcap").reason
