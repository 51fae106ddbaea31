"""Would the lab trust this evidence? The attestation API of the notebooks and `hfl-lab attest`.

Public API (notebooks 02, 03 and 06 and the command line call these, so they cannot disagree):

- ``load(evidence)``: a ``LoadedEvidence`` from a path, bytes, an ``Evidence`` or a certificate
- ``verify_evidence(evidence, policy, *, collateral, pccs_url, lab_root, at, role) -> Verdict``
- ``verify_endpoint("host:port", policy, *, lab_root, ...) -> Verdict``
- ``describe_evidence(loaded) -> dict`` and ``render_description(dict) -> str``
- ``policy_from_evidence(evidence) -> AttestationPolicy`` and ``policy_text(policy) -> str``
- ``render_verdict(verdict) -> str`` and ``verdict_document(verdict) -> dict``

All verification goes through ``hfl_lab.tee.Verifier`` and ``hfl_lab.ratls.verify_certificate``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml
from cryptography import x509

from hfl_lab._exceptions import AttestationError, ConfigError
from hfl_lab.attestation.evidence_input import (
    LoadedEvidence,
    from_evidence_object,
    load_certificate_evidence,
    load_evidence,
    load_evidence_file,
    load_lab_root,
)
from hfl_lab.ratls import fetch_server_certificate, verify_certificate
from hfl_lab.tee.collateral import Collateral, load_collateral
from hfl_lab.tee.evidence import Evidence
from hfl_lab.tee.policy import AttestationPolicy, baseline_policy
from hfl_lab.tee.reports import TdReport10
from hfl_lab.tee.sim.platform import SIMULATED_MARKER
from hfl_lab.tee.verdict import Verdict
from hfl_lab.tee.verifier import Verifier

VERIFIER_NAME = "hfl-lab attest"
_TABLE_WIDTH = 40  # Verdict.to_table cuts expected/actual here; failures are repeated in full

EvidenceInput = LoadedEvidence | Evidence | x509.Certificate | bytes | str | Path


def load(evidence: EvidenceInput) -> LoadedEvidence:
    """Read evidence from a path (str/Path), raw bytes, an ``Evidence`` or a certificate."""
    if isinstance(evidence, LoadedEvidence):
        return evidence
    if isinstance(evidence, Evidence):
        return from_evidence_object(evidence)
    if isinstance(evidence, x509.Certificate):
        return load_certificate_evidence(evidence, source="<certificate>", encoding="object")
    if isinstance(evidence, bytes | bytearray):
        return load_evidence(bytes(evidence))
    return load_evidence_file(evidence)


def make_verifier(
    policy: AttestationPolicy | str | Path | None = None,
    *,
    collateral: Collateral | str | Path | None = None,
    pccs_url: str | None = None,
    lab_root: bytes | str | Path | None = None,
) -> Verifier:
    """The core ``Verifier`` with the CLI's defaults: the baseline policy, no collateral."""
    if policy is None:
        policy = baseline_policy()
    elif not isinstance(policy, AttestationPolicy):
        policy = AttestationPolicy.load(policy)
    if collateral is not None and not isinstance(collateral, Collateral):
        collateral = load_collateral(collateral)
    root = lab_root if isinstance(lab_root, bytes) or lab_root is None else load_lab_root(lab_root)
    return Verifier(
        policy, collateral=collateral, pccs_url=pccs_url, lab_root_der=root, name=VERIFIER_NAME
    )


def verify_evidence(
    evidence: EvidenceInput,
    policy: AttestationPolicy | str | Path | None = None,
    *,
    collateral: Collateral | str | Path | None = None,
    pccs_url: str | None = None,
    lab_root: bytes | str | Path | None = None,
    at: int | None = None,
    role: str | None = None,
) -> Verdict:
    """Verify any evidence against ``policy`` (default: the baseline); never raises on a
    rejection, only when the input cannot be read (``AttestationError``/``ConfigError``).

    ``at`` is the verification time (UNIX seconds); ``role`` selects the policy's per-role
    reference values (default for certificates: the role they claim).
    """
    loaded = load(evidence)
    verifier = make_verifier(policy, collateral=collateral, pccs_url=pccs_url, lab_root=lab_root)
    if loaded.certificate is not None and loaded.embedded is not None:
        return verify_certificate(
            loaded.certificate, verifier, role=role or loaded.embedded.role, now=at
        )
    return verifier.verify(
        loaded.evidence, role=role, now=at, evidence_kind=loaded.kind, subject=loaded.source
    )


def parse_address(address: str) -> tuple[str, int]:
    """``HOST:PORT`` (``[v6]:PORT`` too) → (host, port); ``ConfigError`` otherwise."""
    host, sep, port = address.rpartition(":")
    host = host.removeprefix("[").removesuffix("]")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigError(
            f"'{address}' is not HOST:PORT (for example 127.0.0.1:50051 or [::1]:50051)"
        )
    return host, int(port)


def verify_endpoint(
    address: str,
    policy: AttestationPolicy | str | Path | None = None,
    *,
    collateral: Collateral | str | Path | None = None,
    pccs_url: str | None = None,
    lab_root: bytes | str | Path | None = None,
    role: str | None = None,
    timeout: float = 5.0,
) -> Verdict:
    """Fetch the certificate the TLS (gRPC) server at ``address`` presents and verify it.

    A certificate without (readable) evidence is a rejection with one failed ``evidence``
    check; a peer that cannot be reached raises ``AttestationError(check="connection")``.
    """
    host, port = parse_address(address)
    verifier = make_verifier(policy, collateral=collateral, pccs_url=pccs_url, lab_root=lab_root)
    cert = fetch_server_certificate(host, port, timeout=timeout)
    try:
        loaded = load_certificate_evidence(cert, source=address, encoding="tls-handshake")
    except AttestationError as e:
        verdict = Verdict(
            evidence_kind="x509-without-evidence",
            subject=cert.subject.rfc4514_string(),
            verifier=VERIFIER_NAME,
            verified_at=float(int(verifier.clock())),
        )
        verdict.add(
            "evidence",
            False,
            "RA-TLS evidence (DICE 2.23.133.5.4.9 or Gramine legacy extension)",
            "none" if "no attestation evidence" in e.message else "unreadable",
            e.message.removeprefix(f"{address}: ") + (f" — fix: {e.fix}" if e.fix else ""),
        )
        return verdict
    assert loaded.embedded is not None and loaded.certificate is not None
    return verify_certificate(loaded.certificate, verifier, role=role or loaded.embedded.role)


def policy_from_evidence(evidence: EvidenceInput) -> AttestationPolicy:
    """A policy whose reference values are this evidence's measurements.

    MR_TD, RTMR0-3, MR_SEAM, XFAM and the TD attributes must equal this TD's. DEBUG stays
    refused (``allow_debug: false``). Simulated evidence yields ``allow_simulated: true``.
    """
    loaded = load(evidence)
    td = loaded.quote.body
    if not isinstance(td, TdReport10):
        raise AttestationError(
            f"{loaded.source}: not a TDX quote (TEE type 0x{loaded.quote.header.tee_type:08x}),"
            " so it has no TD measurements to take reference values from",
            check="tee_type",
        )
    raw: dict[str, Any] = {
        name: [getattr(td, name).hex()]
        for name in ("mr_td", "rtmr0", "rtmr1", "rtmr2", "rtmr3", "mr_seam", "xfam")
    }
    attrs = td.td_attributes_int
    raw["td_attributes"] = [f"0x{attrs:016x}"]
    # the default forbidden bits, less any other than DEBUG this TD has: never at odds with
    # td_attributes (DEBUG has its own check)
    raw["forbidden_td_attributes"] = AttestationPolicy.forbidden_td_attributes & ~(attrs & ~1)
    raw["allow_simulated"] = loaded.quote.header.user_data == SIMULATED_MARKER
    return AttestationPolicy.from_dict(raw)


def policy_text(policy: AttestationPolicy, *, fmt: str = "yaml", origin: str = "") -> str:
    """The policy file's text (YAML with a comment saying where it came from, or JSON)."""
    if fmt == "json":
        return json.dumps(policy.to_dict(), indent=2) + "\n"
    head = "# hfl-lab attestation policy"
    if origin:
        head += f"\n# reference values taken from {origin}"
    head += (
        "\n# td_attributes: exactly this evidence's, as `hfl-lab attest show` prints them"
        "\n# (DEBUG is refused all the same: allow_debug: false)\n"
    )
    return head + yaml.safe_dump(policy.to_dict(), sort_keys=False)


def verdict_document(verdict: Verdict, loaded: LoadedEvidence | None = None) -> dict[str, Any]:
    """The JSON document of ``--json``: ``Verdict.to_dict()`` plus where the evidence was from."""
    doc = verdict.to_dict()
    if loaded is not None:
        doc["source"] = loaded.source
        doc["encoding"] = loaded.encoding
        doc["description"] = loaded.description
    return doc


def render_verdict(verdict: Verdict, loaded: LoadedEvidence | None = None) -> str:
    """The verdict table, each failed check's full expected/actual values, and the outcome."""
    lines = []
    if loaded is not None:
        lines.append(f"evidence: {loaded.source} — {loaded.description}")
    lines.append(verdict.to_table(width=_TABLE_WIDTH))
    long = [
        c
        for c in verdict.failures
        if len(c.expected) > _TABLE_WIDTH or len(c.actual) > _TABLE_WIDTH
    ]
    for c in long:
        lines += [
            f"✗ {c.name}: {c.reason}",
            f"    expected: {c.expected}",
            f"    actual:   {c.actual}",
        ]
    outcome = (
        "ACCEPTED" + verdict.reason.removeprefix("accepted")
        if verdict.accepted
        else f"REJECTED — {verdict.reason}"
    )
    lines.append(f"verdict: {outcome}")
    return "\n".join(lines)
