"""Property-based: truncated and mutated real quotes only ever raise the lab's own errors."""

from __future__ import annotations

import contextlib

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hfl_lab import AttestationError, HflLabError, QuoteFormatError
from hfl_lab.tee import parse_quote
from tests.security import hostile_inputs as hostile

GENUINE = hostile.genuine_signed_regions() if hostile.SEEDS else set()

VERIFIERS = hostile.verifiers() if hostile.SEEDS else {}


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(hostile.RANDOMS.map(hostile.mutate_quote))
def test_mutated_quotes_raise_only_lab_errors(mutant: hostile.Mutant) -> None:
    """The quick version of the R1 fuzz (tests/security/test_hostile_evidence.py)."""
    data = mutant.data
    try:
        quote = parse_quote(data)
    except QuoteFormatError:
        return
    assert quote.to_bytes() == data
    try:
        verdict = VERIFIERS[mutant.family].verify(
            data, binding=hostile.SEEDS[mutant.seed].binding, now=hostile.NOW)
    except AttestationError:
        return
    if verdict.accepted:
        # Only an unchanged signed region may pass: mutations outside it (trailing bytes,
        # unsigned certification data that still verifies) are the sole acceptable survivors.
        assert quote.signed_bytes() in GENUINE


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=2048))
def test_random_bytes_are_refused_cleanly(data: bytes) -> None:
    with contextlib.suppress(HflLabError):
        parse_quote(data)
