"""AttestationPolicy loading and validation, and provider auto-detection."""

from __future__ import annotations

from pathlib import Path

import pytest

from hfl_lab import AttestationError, ConfigError
from hfl_lab.tee import AttestationPolicy, choose_provider, detect
from tests.td_support import provider


def test_yaml_round_trip_keeps_every_field(tmp_path: Path) -> None:
    policy = AttestationPolicy.from_dict(
        {
            "mr_td": ["aa" * 48, "bb" * 48],
            "rtmr2": "any",
            "xfam": "e702060000000000",
            "accepted_tcb_statuses": ["UpToDate", "SWHardeningNeeded"],
            "allow_simulated": True,
            "roles": {"ps0": {"rtmr3": "cc" * 48}},
        }
    )
    path = tmp_path / "policy.yaml"

    policy.save(path)
    loaded = AttestationPolicy.load(path)

    assert loaded == policy
    assert loaded.reference_for("ps0", "rtmr3") == ("cc" * 48,)
    assert loaded.reference_for("worker0", "rtmr3") is None
    assert loaded.rtmr2 is None


def test_unknown_key_is_an_error_listing_the_valid_fields() -> None:
    with pytest.raises(ConfigError, match="unknown policy field") as err:
        AttestationPolicy.from_dict({"mrtd": "aa" * 48})
    assert "mr_td" in str(err.value)


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ({"mr_td": "zz"}, "not hex"),
        ({"mr_td": "aa" * 47}, "47 bytes, expected 48"),
        ({"accepted_tcb_statuses": ["Fine"]}, "unknown"),
        ({"tee_type": "SEV"}, "not supported"),
        ({"allow_simulated": "yes"}, "true or false"),
        ({"report_data_binding": "cert"}, "report_data_binding"),
        ({"max_evidence_age_s": -1}, "positive"),
        ({"roles": {"ps0": {"debug": True}}}, "roles.ps0"),
    ],
)
def test_invalid_values_are_named(raw: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        AttestationPolicy.from_dict(raw)


def test_unreadable_policy_file_is_a_clear_error(tmp_path: Path) -> None:
    bad = tmp_path / "p.yaml"
    bad.write_text("mr_td: [unclosed")

    with pytest.raises(ConfigError, match="not valid YAML"):
        AttestationPolicy.load(bad)
    with pytest.raises(ConfigError, match="cannot read"):
        AttestationPolicy.load(tmp_path / "absent.yaml")


def test_detection_prefers_configfs_then_simulated_only_if_allowed(tmp_path: Path) -> None:
    tsm = tmp_path / "report"
    tsm.mkdir()
    sim = provider("ps0")
    nowhere = "127.0.0.1:9"

    real = detect(allow_simulated=True, configfs_root=tsm, agent_endpoint=nowhere)
    allowed = detect(allow_simulated=True, configfs_root=tmp_path / "x", agent_endpoint=nowhere)
    refused = detect(allow_simulated=False, configfs_root=tmp_path / "x", agent_endpoint=nowhere)

    assert real.chosen == "configfs-tsm"
    assert allowed.chosen == "simulated-td" and "SIMULATED" in allowed.reason
    assert choose_provider(allowed, sim) is sim
    assert refused.chosen == "none"
    with pytest.raises(AttestationError, match="no evidence provider"):
        choose_provider(refused, sim)
