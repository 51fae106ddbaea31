"""Would the lab trust this evidence? Load evidence from a file, bytes, an ``Evidence`` or a
certificate, verify it (or a live endpoint's RA-TLS certificate) against a policy, derive a
policy from it, and render verdicts. Notebooks and ``hfl-lab attest`` call the same functions.
"""

from hfl_lab.attestation.api import (
    EvidenceInput,
    load,
    make_verifier,
    parse_address,
    policy_from_evidence,
    policy_text,
    render_verdict,
    verdict_document,
    verify_endpoint,
    verify_evidence,
)
from hfl_lab.attestation.evidence_input import LoadedEvidence, load_evidence, load_evidence_file
from hfl_lab.attestation.evidence_view import describe_evidence, render_description

__all__ = [
    "EvidenceInput",
    "LoadedEvidence",
    "describe_evidence",
    "load",
    "load_evidence",
    "load_evidence_file",
    "make_verifier",
    "parse_address",
    "policy_from_evidence",
    "policy_text",
    "render_description",
    "render_verdict",
    "verdict_document",
    "verify_endpoint",
    "verify_evidence",
]
