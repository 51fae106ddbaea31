"""Real TDX quotes through the real DCAP path (dcap-qvl) and the policy's checks."""

from __future__ import annotations

from pathlib import Path

import pytest

from hfl_lab.tee import AttestationPolicy, Verifier, baseline_policy, load_collateral
from tests.conftest import (
    OUTDATED_IN_WINDOW,
    SGX_IN_WINDOW,
    TDX_QUOTE_AFTER_WINDOW,
    TDX_QUOTE_IN_WINDOW,
)


def _verifier(attestation_dir: Path, name: str) -> Verifier:
    collateral = load_collateral(attestation_dir / f"dcap-qvl/{name}_collateral.json")
    return Verifier(baseline_policy(), collateral=collateral)


def test_real_quote_in_its_collateral_window_is_accepted_up_to_date(attestation_dir: Path) -> None:
    quote = (attestation_dir / "dcap-qvl/tdx_quote").read_bytes()

    verdict = _verifier(attestation_dir, "tdx_quote").verify(quote, now=TDX_QUOTE_IN_WINDOW)

    assert verdict.accepted, verdict.to_table()
    assert verdict.tcb_status == "UpToDate"
    assert not verdict.simulated
    assert verdict.check("dcap").passed


def test_real_quote_after_its_window_is_rejected_collateral_expired(attestation_dir: Path) -> None:
    quote = (attestation_dir / "dcap-qvl/tdx_quote").read_bytes()

    verdict = _verifier(attestation_dir, "tdx_quote").verify(quote, now=TDX_QUOTE_AFTER_WINDOW)

    assert not verdict.accepted
    assert "collateral expired" in verdict.check("dcap").reason


def test_outdated_platform_has_no_matching_tcb_level(attestation_dir: Path) -> None:
    quote = (attestation_dir / "dcap-qvl/tdx_quote_outdated").read_bytes()

    verdict = _verifier(attestation_dir, "tdx_quote_outdated").verify(
        quote, now=OUTDATED_IN_WINDOW
    )

    assert not verdict.accepted
    assert "no matching TCB level" in verdict.check("dcap").reason


def test_sgx_quote_is_rejected_as_not_tdx(attestation_dir: Path) -> None:
    quote = (attestation_dir / "dcap-qvl/sgx_quote").read_bytes()

    verdict = _verifier(attestation_dir, "sgx_quote").verify(quote, now=SGX_IN_WINDOW)

    assert not verdict.accepted
    assert verdict.check("tee_type").reason == "not a TDX quote"
    assert verdict.check("dcap").passed  # genuine SGX evidence, still the wrong TEE


def test_debug_td_quote_is_rejected_on_debug_and_without_collateral(attestation_dir: Path) -> None:
    quote = (attestation_dir / "trustee/tdx_quote_4.dat").read_bytes()

    verdict = Verifier(baseline_policy()).verify(quote)

    assert not verdict.accepted
    assert not verdict.check("debug").passed
    assert verdict.check("debug").actual == "DEBUG set"
    assert "no collateral" in verdict.check("dcap").reason


def test_flipping_any_byte_of_the_signed_region_fails_verification(attestation_dir: Path) -> None:
    raw = (attestation_dir / "dcap-qvl/tdx_quote").read_bytes()
    verifier = _verifier(attestation_dir, "tdx_quote")
    signed_length = 48 + 584
    accepted = []

    for offset in range(signed_length):
        tampered = bytearray(raw)
        tampered[offset] ^= 0x01
        try:
            verdict = verifier.verify(bytes(tampered), now=TDX_QUOTE_IN_WINDOW)
        except Exception as e:
            assert type(e).__name__ == "QuoteFormatError", e
            continue
        if verdict.accepted:
            accepted.append(offset)

    assert accepted == []


def test_policy_reference_values_reject_another_quote_with_expected_and_actual(
    attestation_dir: Path,
) -> None:
    quote = (attestation_dir / "dcap-qvl/tdx_quote").read_bytes()
    wanted = "ab" * 48
    policy = AttestationPolicy.from_dict({"mr_td": wanted})
    verifier = Verifier(policy, collateral=load_collateral(
        attestation_dir / "dcap-qvl/tdx_quote_collateral.json"))

    verdict = verifier.verify(quote, now=TDX_QUOTE_IN_WINDOW)

    check = verdict.check("mr_td")
    assert not check.passed and check.expected == wanted and check.actual != wanted
    assert verdict.check("dcap").passed


@pytest.mark.parametrize("fmt", ["table", "json", "html"])
def test_verdict_renders(attestation_dir: Path, fmt: str) -> None:
    quote = (attestation_dir / "dcap-qvl/tdx_quote").read_bytes()
    verdict = _verifier(attestation_dir, "tdx_quote").verify(quote, now=TDX_QUOTE_IN_WINDOW)

    text = {"table": verdict.to_table, "json": verdict.to_json, "html": verdict._repr_html_}[fmt]()

    assert "dcap" in text and "tcb_status" in text
