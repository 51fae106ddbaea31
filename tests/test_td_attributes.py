"""Exact TD attributes in the policy: loaded and saved, checked by the verifier (also per
role), and written by ``hfl-lab attest policy --from-evidence`` in place of a forbidden mask."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import yaml

from hfl_lab import ConfigError
from hfl_lab.cli import main
from hfl_lab.tee import AttestationPolicy, Evidence, SimulatedTdProvider, TdMeasurements
from tests.td_support import PLATFORM, policy_for, verifier_for

ROLE = "worker0"  # the TD of the conftest fixtures platform / measurements / provider
SEPT_VE_DISABLE = "0x0000000010000000"  # what a simulated TD has
PKS = 1 << 30


def _with_extra_bits(provider: SimulatedTdProvider, bits: int) -> Evidence:
    """Genuine evidence (signed by the lab platform) of the same TD with ``bits`` set too."""
    report = provider.td_report(b"")
    attributes = (report.td_attributes_int | bits).to_bytes(8, "little")
    body = dataclasses.replace(report, td_attributes=attributes)
    return dataclasses.replace(provider.get_evidence(b""), quote=PLATFORM.sign_quote(body))


def test_exact_attributes_accept_the_td_that_has_them(
    provider: SimulatedTdProvider, measurements: TdMeasurements
) -> None:
    policy = policy_for(measurements, "none", td_attributes=[SEPT_VE_DISABLE])

    verdict = verifier_for(policy).verify(provider.get_evidence(b""))

    assert verdict.accepted, verdict.to_table()
    check = verdict.check("td_attributes")
    assert check.actual == SEPT_VE_DISABLE
    assert check.expected.startswith(SEPT_VE_DISABLE)


def test_one_more_bit_is_refused_naming_expected_actual_and_the_bit(
    provider: SimulatedTdProvider, measurements: TdMeasurements
) -> None:
    evidence = _with_extra_bits(provider, PKS)  # PKS lies outside the default forbidden mask
    exact = verifier_for(policy_for(measurements, "none", td_attributes=[SEPT_VE_DISABLE]))
    mask_only = verifier_for(policy_for(measurements, "none"))

    refused = exact.verify(evidence)
    allowed = mask_only.verify(evidence)

    assert [c.name for c in refused.failures] == ["td_attributes"]
    check = refused.check("td_attributes")
    assert SEPT_VE_DISABLE in check.expected
    assert check.actual == "0x0000000050000000"
    assert "PKS set" in check.reason and "reference value" in check.reason
    assert "PKS set" in refused.reason
    assert allowed.accepted, allowed.to_table()  # what only forbidding bits let through


def test_a_role_may_have_its_own_exact_attributes(
    provider: SimulatedTdProvider, measurements: TdMeasurements
) -> None:
    with_pks = f"0x{int(SEPT_VE_DISABLE, 16) | PKS:016x}"
    policy = policy_for(measurements, "none", td_attributes=[SEPT_VE_DISABLE],
                        roles={"ps0": {"td_attributes": [with_pks]}})
    evidence = _with_extra_bits(provider, PKS)

    as_ps0 = verifier_for(policy).verify(evidence, role="ps0")
    as_worker = verifier_for(policy).verify(evidence, role=ROLE)

    assert as_ps0.accepted, as_ps0.to_table()
    assert not as_worker.accepted
    assert f"for role {ROLE}" in as_worker.check("td_attributes").reason


def test_td_attributes_round_trip_through_yaml_in_the_form_verdicts_show(tmp_path: Path) -> None:
    policy = AttestationPolicy.from_dict(
        {"td_attributes": ["0x10000000", "0000000050000000"],
         "roles": {"ps0": {"td_attributes": PKS}}}
    )
    path = tmp_path / "policy.yaml"
    by_hand = tmp_path / "by-hand.yaml"
    by_hand.write_text("td_attributes: [0x10000000]\n")  # YAML reads this as an integer

    policy.save(path)
    loaded = AttestationPolicy.load(path)

    assert loaded == policy
    assert loaded.td_attributes == (SEPT_VE_DISABLE, "0x0000000050000000")
    assert loaded.reference_for("ps0", "td_attributes") == ("0x0000000040000000",)
    assert loaded.reference_for("worker0", "td_attributes") == loaded.td_attributes
    assert yaml.safe_load(path.read_text())["td_attributes"] == list(loaded.td_attributes)
    assert AttestationPolicy.load(by_hand).td_attributes == (SEPT_VE_DISABLE,)
    assert AttestationPolicy().td_attributes is None  # any, as before


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ({"td_attributes": "zz"}, "'zz' is not hex"),
        ({"td_attributes": 1 << 64}, "does not fit in 64 bits"),
        ({"td_attributes": []}, "td_attributes"),
        ({"roles": {"ps0": {"td_attributes": [True]}}}, "not a hex value"),
    ],
)
def test_invalid_td_attributes_are_named(raw: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        AttestationPolicy.from_dict(raw)


def test_policy_from_evidence_pins_the_exact_attributes(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, provider: SimulatedTdProvider
) -> None:
    genuine, more = tmp_path / "genuine.json", tmp_path / "pks.json"
    genuine.write_text(provider.get_evidence(b"").to_json())
    more.write_text(_with_extra_bits(provider, PKS).to_json())
    root = tmp_path / "lab-root.der"
    root.write_bytes(PLATFORM.root_der)
    policy = tmp_path / "policy.yaml"

    made = main(["attest", "policy", "--from-evidence", str(genuine), "-o", str(policy)])
    same = main(["attest", "verify", str(genuine), "--policy", str(policy),
                 "--lab-root", str(root)])
    capsys.readouterr()
    other = main(["attest", "verify", str(more), "--policy", str(policy), "--lab-root", str(root),
                  "--json"])
    doc = json.loads(capsys.readouterr().out)

    assert made == 0 and same == 0
    written = yaml.safe_load(policy.read_text())
    assert written["td_attributes"] == [SEPT_VE_DISABLE]
    assert written["forbidden_td_attributes"] == 0xFF  # the default, no inverted mask
    assert other == 1
    check = next(c for c in doc["checks"] if c["name"] == "td_attributes")
    assert not check["passed"] and "PKS set" in check["reason"]
