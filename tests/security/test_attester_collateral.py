"""R8, issue 18 item 3: the attester must not pick the collateral its evidence is judged by.

DCAP collateral (TCB info, QE identity, CRLs) is signed by Intel, so an attester cannot forge
it, but it can choose: old, validly signed TCB info from before a TCB recovery, or CRLs from
before a revocation, still verify inside their validity window. So the verifier judges real
evidence only with collateral of its own (a file it was given, or its PCCS through its cache)
and never with what came with the evidence; and the policy can demand a minimum
``tcbEvaluationDataNumber`` (Intel raises it with every TCB recovery), which old collateral
fails by name.

The quote and collateral are real (dcap-qvl's sample, ``../shared/attestation``).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from hfl_lab.tee import AttestationPolicy, Verifier
from hfl_lab.tee.collateral import Collateral, CollateralCache, load_collateral
from hfl_lab.tee.evidence import Evidence
from hfl_lab.tee.quote import Quote
from tests.conftest import TDX_QUOTE_IN_WINDOW
from tests.reliability_report import record

#: the sample's TCB info and QE identity carry tcbEvaluationDataNumber 17
SAMPLE_EVALUATION_NUMBER = 17


def _policy(**extra: object) -> AttestationPolicy:
    return AttestationPolicy.from_dict({"tee_type": "TDX", "report_data_binding": "none",
                                        **extra})


def _sample(attestation_dir: Path) -> tuple[bytes, Collateral]:
    quote = (attestation_dir / "dcap-qvl/tdx_quote").read_bytes()
    return quote, load_collateral(attestation_dir / "dcap-qvl/tdx_quote_collateral.json")


def test_collateral_that_comes_with_real_evidence_is_not_what_it_is_judged_by(
    attestation_dir: Path,
) -> None:
    quote, collateral = _sample(attestation_dir)
    evidence = Evidence(quote=quote, provider="attacker", simulated=False,
                        collateral_json=collateral.json_text)

    verdict = Verifier(_policy()).verify(evidence, now=TDX_QUOTE_IN_WINDOW)

    dcap = verdict.check("dcap")
    held = not verdict.accepted and not dcap.passed and "of its own" in dcap.reason
    record("R8", "attester-chosen collateral", held=int(held), certificates_wrongly_issued=0)
    assert not verdict.accepted, verdict.to_table()
    assert not dcap.passed and "of its own" in dcap.reason, dcap.reason
    assert "--collateral" in dcap.reason and "--pccs" in dcap.reason  # the fix is named

    # the same evidence with the verifier's own copy of that collateral: judged by it
    own = Verifier(_policy(), collateral=collateral).verify(evidence, now=TDX_QUOTE_IN_WINDOW)
    assert own.accepted, own.to_table()
    assert "file" in own.check("dcap").actual


def test_old_collateral_is_refused_by_the_policys_minimum_evaluation_number(
    attestation_dir: Path,
) -> None:
    quote, collateral = _sample(attestation_dir)
    assert collateral.tcb_evaluation_data_number() == SAMPLE_EVALUATION_NUMBER

    newer_required = _policy(min_tcb_evaluation_data_number=SAMPLE_EVALUATION_NUMBER + 1)
    verdict = Verifier(newer_required, collateral=collateral).verify(
        quote, now=TDX_QUOTE_IN_WINDOW
    )

    check = verdict.check("tcb_evaluation")
    held = not verdict.accepted and not check.passed
    record("R8", "collateral older than the policy's TCB evaluation", held=int(held))
    assert not verdict.accepted
    assert not check.passed
    assert f"{SAMPLE_EVALUATION_NUMBER}" in check.actual and f"{SAMPLE_EVALUATION_NUMBER + 1}" in (
        check.expected)
    assert "older" in check.reason and "TCB recovery" in check.reason

    same = _policy(min_tcb_evaluation_data_number=SAMPLE_EVALUATION_NUMBER)
    ok = Verifier(same, collateral=collateral).verify(quote, now=TDX_QUOTE_IN_WINDOW)
    assert ok.accepted, ok.to_table()
    assert ok.check("tcb_evaluation").passed


def test_policy_rejects_a_nonsensical_minimum() -> None:
    from hfl_lab import ConfigError

    with pytest.raises(ConfigError, match="min_tcb_evaluation_data_number"):
        _policy(min_tcb_evaluation_data_number=-1)
    with pytest.raises(ConfigError, match="pccs_url"):
        _policy(pccs_url="ftp://pccs.example")


class _FakePccs:
    """Stands in for the network: answers with the sample's collateral and counts the calls."""

    def __init__(self, collateral: Collateral) -> None:
        self.collateral = collateral
        self.calls: list[tuple[str, str]] = []

    def __call__(self, pccs_url: str, quote: bytes) -> Collateral:
        fmspc = Quote.parse(quote).fmspc() or "?"
        self.calls.append((pccs_url, fmspc))
        return Collateral(self.collateral.json_text, f"PCCS {pccs_url}")


def test_pccs_collateral_is_the_verifiers_own_and_cached_until_its_next_update(
    attestation_dir: Path,
) -> None:
    quote, collateral = _sample(attestation_dir)
    pccs = _FakePccs(collateral)
    cache = CollateralCache(fetch=pccs)
    # the evidence brings nothing; the policy names the PCCS, the verifier asks it
    policy = _policy(pccs_url="https://pccs.example:8081")
    verifier = Verifier(policy, collateral_cache=cache)

    first = verifier.verify(quote, now=TDX_QUOTE_IN_WINDOW)
    second = verifier.verify(quote, now=TDX_QUOTE_IN_WINDOW + 60)

    assert first.accepted and second.accepted, first.to_table()
    assert pccs.calls == [("https://pccs.example:8081", "B0C06F000000")]
    assert "PCCS https://pccs.example:8081" in first.check("dcap").actual

    # after the TCB info's nextUpdate the cached copy is stale: fetched again
    next_update = collateral.window()
    assert next_update is not None
    Verifier(policy, collateral_cache=cache).verify(quote, now=next_update[1] + 1)
    assert len(pccs.calls) == 2


def test_cache_holds_a_bounded_number_of_platforms(attestation_dir: Path) -> None:
    _, collateral = _sample(attestation_dir)
    cache = CollateralCache(fetch=_FakePccs(collateral), max_entries=2)
    for i in range(5):
        cache.put(("https://pccs.example", f"FMSPC{i}"), collateral)
    assert len(cache) == 2


def test_unreachable_pccs_is_a_named_refusal(attestation_dir: Path) -> None:
    quote, _ = _sample(attestation_dir)

    def down(pccs_url: str, quote: bytes) -> Collateral:
        from hfl_lab import AttestationError

        raise AttestationError(f"could not fetch collateral from {pccs_url}: refused",
                               check="dcap", fix="check the PCCS URL and network")

    verifier = Verifier(_policy(pccs_url="https://pccs.example"),
                        collateral_cache=CollateralCache(fetch=down))
    verdict = verifier.verify(quote, now=TDX_QUOTE_IN_WINDOW)

    assert not verdict.accepted
    assert "could not fetch collateral" in verdict.check("dcap").reason


def test_collateral_evaluation_number_is_read_from_both_documents(attestation_dir: Path) -> None:
    _, collateral = _sample(attestation_dir)
    doc = json.loads(collateral.json_text)
    qe = json.loads(doc["qe_identity"])
    qe["tcbEvaluationDataNumber"] = 9
    doc["qe_identity"] = json.dumps(qe)
    # the lower of the two counts: either document may be the stale one
    assert Collateral(json.dumps(doc), "edited").tcb_evaluation_data_number() == 9
