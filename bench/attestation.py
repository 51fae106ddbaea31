"""A-* figures: latency of verifying a real and a simulated quote, and of simulated evidence."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import dcap_qvl
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec

from bench.registry import BenchContext, Measurement, benchmark
from bench.timing import median_seconds
from hfl_lab.tee import (
    AttestationPolicy,
    SimulatedPlatform,
    SimulatedTdProvider,
    Verifier,
    baseline_policy,
    load_collateral,
    measure_workload,
)

SHARED = Path(__file__).resolve().parents[2] / "shared" / "attestation" / "dcap-qvl"
IN_WINDOW = 1750329147 + 3600


@benchmark(
    "A-verify-dcap",
    what="lab Verifier on a real TDX quote (dcap-qvl + policy checks), s; "
    "baseline: the bare dcap_qvl.verify call",
    unit="s",
    judged_by="value",
)
def verify_real(ctx: BenchContext) -> Measurement:
    quote = (SHARED / "tdx_quote").read_bytes()
    collateral = load_collateral(SHARED / "tdx_quote_collateral.json")
    verifier = Verifier(baseline_policy(), collateral=collateral)
    qvl = collateral.qvl()
    n = ctx.repeats(200, 20)
    lab = median_seconds(lambda: verifier.verify(quote, now=IN_WINDOW), repeats=n)
    bare = median_seconds(lambda: dcap_qvl.verify(quote, qvl, IN_WINDOW), repeats=n)
    return Measurement(lab, bare)


def _simulated() -> tuple[SimulatedPlatform, SimulatedTdProvider, AttestationPolicy]:
    platform = SimulatedPlatform.generate()
    measurements = measure_workload(role="worker0")
    policy = AttestationPolicy.from_dict({**measurements.summary(), "allow_simulated": True})
    return platform, SimulatedTdProvider(platform, measurements), policy


@benchmark(
    "A-verify-sim",
    what="lab Verifier on a simulated-TD quote, s; baseline: bare dcap_qvl.verify_with_root_ca",
    unit="s",
    judged_by="value",
)
def verify_simulated(ctx: BenchContext) -> Measurement:
    platform, provider, policy = _simulated()
    evidence = provider.get_evidence(bytes(64))
    verifier = Verifier(policy, lab_root_der=platform.root_der)
    qvl = load_collateral_text(platform.collateral_json)
    now = int(time.time())
    n = ctx.repeats(200, 20)
    lab = median_seconds(lambda: verifier.verify(evidence, now=now), repeats=n)
    bare = median_seconds(
        lambda: dcap_qvl.verify_with_root_ca(evidence.quote, qvl, platform.root_der, now),
        repeats=n,
    )
    return Measurement(lab, bare)


@benchmark(
    "A-evidence-sim",
    what="simulated-TD evidence generation (TD report + signed v4 quote), s; "
    "baseline: one ECDSA-P256 signature over the same 632 bytes",
    unit="s",
    judged_by="value",
)
def evidence_simulated(ctx: BenchContext) -> Measurement:
    _, provider, _ = _simulated()
    key = ec.generate_private_key(ec.SECP256R1())
    data = bytes(632)
    n = ctx.repeats(200, 20)
    lab = median_seconds(lambda: provider.get_evidence(bytes(64)), repeats=n)
    bare = median_seconds(lambda: key.sign(data, ec.ECDSA(hashes.SHA256())), repeats=n)
    return Measurement(lab, bare)


def load_collateral_text(text: str) -> Any:
    return dcap_qvl.QuoteCollateralV3.from_json(text)
