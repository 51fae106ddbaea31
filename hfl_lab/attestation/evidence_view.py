"""What ``hfl-lab attest show`` prints: every field of the evidence, as a dict and as text."""

from __future__ import annotations

import hashlib
from typing import Any

from cryptography import x509

from hfl_lab._exceptions import HflLabError
from hfl_lab.attestation.evidence_input import LoadedEvidence
from hfl_lab.tee.reports import TdReport10, td_attribute_flags
from hfl_lab.tee.sim.platform import SIMULATED_MARKER


def _cert_summary(cert: x509.Certificate) -> dict[str, str]:
    return {
        "subject": cert.subject.rfc4514_string(),
        "issuer": cert.issuer.rfc4514_string(),
        "not_before": cert.not_valid_before_utc.isoformat(),
        "not_after": cert.not_valid_after_utc.isoformat(),
    }


def describe_evidence(loaded: LoadedEvidence) -> dict[str, Any]:
    """Everything in the evidence: header, TD report, QE report, PCK chain, FMSPC, certificate."""
    quote = loaded.quote
    out: dict[str, Any] = {
        "source": loaded.source,
        "evidence_kind": loaded.kind,
        "encoding": loaded.encoding,
        "description": loaded.description,
        "quote_size": len(loaded.evidence.quote),
        "quote_digest": quote.digest(),
        "simulated_marker": quote.header.user_data == SIMULATED_MARKER,
        "provider": loaded.evidence.provider,
        "report_data_encoding": loaded.evidence.report_data_encoding,
        "collateral_included": loaded.evidence.collateral_json is not None,
        "header": quote.header.to_dict(),
        "body_type": quote.body_type,
    }
    if isinstance(quote.body, TdReport10):
        out["td_report"] = quote.body.to_dict()
        attrs = quote.body.td_attributes_int
        out["td_attributes"] = {"value": f"0x{attrs:016x}", "flags": td_attribute_flags(attrs)}
    else:
        out["enclave_report"] = quote.body.to_dict()
    qe = quote.signature_data.qe
    out["qe_report"] = qe.qe_report.to_dict() if qe is not None else None
    try:
        out["pck_chain"] = [_cert_summary(c) for c in quote.signature_data.pck_certificates()]
        out["fmspc"] = quote.fmspc()
    except HflLabError as e:
        out["pck_chain"] = {"error": e.message}
        out["fmspc"] = None
    out["trailing_bytes"] = len(quote.trailing)
    if loaded.certificate is not None and loaded.embedded is not None:
        emb = loaded.embedded
        expected_rd = loaded.evidence.expected_report_data(emb.binding)
        rd_binds = quote.report_data == expected_rd
        out["certificate"] = {
            **_cert_summary(loaded.certificate),
            "common_name": emb.subject,
            "spki_sha256": hashlib.sha256(emb.spki).hexdigest(),
            "extension": emb.kind,
            "role_claim": emb.role,
            "nonce": emb.nonce.hex() if emb.nonce else None,
            "key_binding": {
                "scheme": emb.scheme,
                "claimed_key_hash": emb.claimed_key_hash.hex(),
                "certificate_key_hash": emb.actual_key_hash.hex(),
                "claim_matches_key": emb.key_bound,
                "expected_report_data": expected_rd.hex(),
                "report_data_matches": rd_binds,
                "binds_this_key": emb.key_bound and rd_binds,
            },
        }
    return out


def _lines(prefix: str, value: Any) -> list[str]:
    if isinstance(value, dict):
        if not value:
            return [f"{prefix}: (none)"]
        out = []
        for k, v in value.items():
            out += _lines(f"{prefix}.{k}" if prefix else str(k), v)
        return out
    if isinstance(value, list):
        if not value:
            return [f"{prefix}: (none)"]
        out = []
        for i, v in enumerate(value):
            out += _lines(f"{prefix}[{i}]", v)
        return out
    if isinstance(value, bool):
        return [f"{prefix}: {'yes' if value else 'no'}"]
    return [f"{prefix}: {'-' if value is None else value}"]


def render_description(desc: dict[str, Any]) -> str:
    """``describe_evidence``'s dict as aligned ``section.field: value`` lines."""
    head = [f"evidence: {desc['source']} — {desc['description']}"]
    if desc.get("simulated_marker"):
        head.append("SIMULATED TD: this quote claims to come from the lab's simulated platform")
    cert = desc.get("certificate")
    if cert is not None:
        kb = cert["key_binding"]
        head.append(
            "key binding: report_data "
            + ("BINDS" if kb["binds_this_key"] else "does NOT bind")
            + " this certificate's key"
        )
    sections = (
        "header",
        "td_report",
        "td_attributes",
        "enclave_report",
        "qe_report",
        "pck_chain",
        "fmspc",
        "certificate",
    )
    summary = {k: v for k, v in desc.items() if k not in sections and k != "description"}
    body = _lines("", summary)
    for name in sections:
        if name in desc:
            body += _lines(name, desc[name])
    width = max(len(line.split(": ", 1)[0]) for line in body)
    aligned = []
    for line in body:
        key, _, value = line.partition(": ")
        aligned.append(f"  {key.ljust(width)}  {value}")
    return "\n".join(head + aligned)
