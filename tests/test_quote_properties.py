"""Property-based: truncated and mutated real quotes only ever raise the lab's own errors."""

from __future__ import annotations

import contextlib

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hfl_lab import AttestationError, HflLabError, QuoteFormatError
from hfl_lab.tee import Verifier, baseline_policy, load_collateral, parse_quote
from tests.conftest import SHARED, TDX_QUOTE_IN_WINDOW

ATTESTATION = SHARED / "attestation"
SEEDS = [
    (ATTESTATION / name).read_bytes()
    for name in (
        "dcap-qvl/tdx_quote",
        "dcap-qvl/tdx_quote_outdated",
        "go-tdx-guest/quote_v5_sample.dat",
        "trustee/tdx_quote_4.dat",
        "dcap-qvl/sgx_quote",
    )
    if (ATTESTATION / name).exists()
]
VERIFIER = (
    Verifier(
        baseline_policy(),
        collateral=load_collateral(ATTESTATION / "dcap-qvl/tdx_quote_collateral.json"),
    )
    if SEEDS
    else None
)


@st.composite
def mutated_quotes(draw: st.DrawFn) -> bytes:
    seed = bytearray(draw(st.sampled_from(SEEDS)))
    action = draw(st.sampled_from(["truncate", "flip", "overwrite", "extend", "splice"]))
    if action == "truncate":
        return bytes(seed[: draw(st.integers(0, len(seed) - 1))])
    if action == "flip":
        for _ in range(draw(st.integers(1, 8))):
            i = draw(st.integers(0, len(seed) - 1))
            seed[i] ^= 1 << draw(st.integers(0, 7))
        return bytes(seed)
    if action == "overwrite":
        start = draw(st.integers(0, len(seed) - 1))
        data = draw(st.binary(min_size=1, max_size=16))
        seed[start : start + len(data)] = data
        return bytes(seed)
    if action == "extend":
        return bytes(seed) + draw(st.binary(min_size=1, max_size=64))
    other = draw(st.sampled_from(SEEDS))
    cut = draw(st.integers(0, min(len(seed), len(other)) - 1))
    return bytes(seed[:cut]) + other[cut:]


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(mutated_quotes())
def test_mutated_quotes_raise_only_lab_errors(data: bytes) -> None:
    try:
        quote = parse_quote(data)
    except QuoteFormatError:
        return
    assert quote.to_bytes() == data
    try:
        assert VERIFIER is not None
        verdict = VERIFIER.verify(data, now=TDX_QUOTE_IN_WINDOW)
    except AttestationError:
        return
    if verdict.accepted:
        # Only an unchanged signed region may pass: mutations outside it (trailing bytes,
        # unsigned certification data that still verifies) are the sole acceptable survivors.
        original = parse_quote(SEEDS[0])
        assert quote.signed_bytes() == original.signed_bytes()


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=2048))
def test_random_bytes_are_refused_cleanly(data: bytes) -> None:
    with contextlib.suppress(HflLabError):
        parse_quote(data)
