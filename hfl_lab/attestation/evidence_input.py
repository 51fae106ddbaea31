"""Reading evidence from whatever a person holds: raw or hex quotes, RA-TLS certificates, JSON.

Detection, in order (first match wins):

- empty input                        → refused
- text starting ``-----BEGIN``       → PEM certificate (RA-TLS: DICE or Gramine legacy extension)
- text starting ``{``                → JSON: the lab's ``Evidence`` document (``quote`` +
                                       ``provider`` + ``simulated``) or the CoCo attestation
                                       agent's TDX evidence (``{"quote": "<base64>", ...}``)
- other text                         → hex quote (``0x`` prefix and line breaks allowed)
- binary starting with 0x30          → DER certificate, if it parses as one
- 1024 binary bytes, first 0x81      → a TDREPORT, refused with the fix (it is not a quote)
- other binary                       → raw DCAP quote

Everything is then parsed by the attestation core (``Quote.parse``) and the RA-TLS layer
(``hfl_lab.ratls``); failures become one ``AttestationError`` naming the input, what is wrong
and, for quotes, the field and offset.
"""

from __future__ import annotations

import json
import string
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import NoReturn

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization

from hfl_lab._exceptions import AttestationError, HflLabError, QuoteFormatError
from hfl_lab.ratls import EmbeddedEvidence, load_certificate

# ``read_evidence`` refuses a DICE certificate whose key binding fails; ``show`` and ``verify``
# must still read it (the verdict reports the binding), so they use the decoder it is built on.
from hfl_lab.ratls.certificate import decode_certificate
from hfl_lab.tee.evidence import Evidence
from hfl_lab.tee.providers.coco_agent import quote_from_agent_json
from hfl_lab.tee.quote import Quote

#: evidence kinds ``load_evidence`` tells apart, and how to say them
EVIDENCE_KINDS: dict[str, str] = {
    "quote": "DCAP quote (binary)",
    "quote-hex": "DCAP quote as hex text",
    "coco-agent-json": "CoCo attestation agent evidence (JSON)",
    "lab-evidence-json": "hfl-lab Evidence document (JSON)",
    "lab-evidence": "hfl-lab Evidence object",
    "ratls-dice": "RA-TLS certificate with TCG DICE evidence (2.23.133.5.4.9)",
    "ratls-gramine": "RA-TLS certificate with Gramine's legacy quote extension",
}
_TEXT = set(string.printable)
_HEX = set(string.hexdigits)
TDREPORT_SIZE = 1024


@dataclass(frozen=True)
class LoadedEvidence:
    """Evidence read from some input, what kind it was, and its parsed quote."""

    kind: str  # a key of EVIDENCE_KINDS
    encoding: str  # binary | hex | json | pem | der | tls-handshake | object
    source: str  # a path, "-" for stdin, HOST:PORT, or "<bytes>"
    evidence: Evidence
    quote: Quote
    certificate: x509.Certificate | None = None
    embedded: EmbeddedEvidence | None = None

    @property
    def description(self) -> str:
        """E.g. "DCAP quote as hex text: TDX quote v4"."""
        what = EVIDENCE_KINDS.get(self.kind, self.kind)
        if self.encoding in ("pem", "der"):
            what += f", {self.encoding.upper()}"
        tee = "TDX" if self.quote.is_tdx else "SGX"
        return f"{what}: {tee} quote v{self.quote.header.version}"


def _fail(message: str, *, check: str = "input", fix: str | None = None) -> NoReturn:
    """Refuse the input; ``load_evidence`` prefixes the source."""
    raise AttestationError(message, check=check, fix=fix)


def _reraise(source: str, error: HflLabError) -> AttestationError:
    """The same error, saying which input it is about."""
    check = error.check if isinstance(error, AttestationError) else "input"
    return AttestationError(f"{source}: {error.message}", check=check, fix=error.fix)


def read_input(path: str | Path) -> bytes:
    """The bytes of a file, or of stdin for ``-``; ``AttestationError`` if unreadable."""
    if str(path) == "-":
        return sys.stdin.buffer.read()
    p = Path(path)
    try:
        return p.read_bytes()
    except OSError as e:
        raise AttestationError(
            f"cannot read {p}: {e.strerror or e}", check="input", fix="check the path"
        ) from None


def load_evidence_file(path: str | Path) -> LoadedEvidence:
    """Read and detect the evidence in a file (``-``: stdin)."""
    return load_evidence(read_input(path), source=str(path))


def load_evidence(data: bytes, *, source: str = "<bytes>") -> LoadedEvidence:
    """Detect what ``data`` is (see the module docstring) and parse it."""
    try:
        return _load(bytes(data), source)
    except HflLabError as e:
        raise _reraise(source, e) from None


def _load(data: bytes, source: str) -> LoadedEvidence:
    if not data.strip():
        _fail(
            "the input is empty (0 bytes of evidence)"
            if not data
            else "the input holds only whitespace, no evidence"
        )
    if _is_text(data):
        text = data.decode("ascii").strip()
        if text.startswith("-----BEGIN"):
            return _from_pem(text.encode(), source)
        if text.startswith("{"):
            return _from_json(text, source)
        return _from_hex(text, source)
    if data[0] == 0x30:
        try:
            cert = x509.load_der_x509_certificate(data)
        except ValueError:
            pass  # not a certificate: a quote never starts with 0x30, so report it as one
        else:
            return _certificate_evidence(cert, source, "der")
    try:
        quote = Quote.parse(data)
    except QuoteFormatError as e:
        if len(data) != TDREPORT_SIZE:
            raise
        # no quote is this short once it carries its certification data
        _fail(
            f"1024 bytes that are not a quote: probably a TDREPORT (TDX_CMD_GET_REPORT0), "
            f"whose MAC only the platform that made it can check ({e.message})",
            fix="have it quoted (configfs-tsm or the CoCo attestation agent) and pass the quote",
        )
    evidence = Evidence(quote=data, provider="file", simulated=False)
    return LoadedEvidence("quote", "binary", source, evidence, quote)


def _is_text(data: bytes) -> bool:
    try:
        text = data.decode("ascii")
    except UnicodeDecodeError:
        return False
    return all(c in _TEXT for c in text)


def _from_hex(text: str, source: str) -> LoadedEvidence:
    body = text.removeprefix("0x").removeprefix("0X")
    digits = "".join(body.split())
    for i, c in enumerate(digits):
        if c not in _HEX:
            _fail(
                f"text that is neither PEM, JSON nor hex: character {c!r} at hex digit {i} "
                "is not a hex digit",
            )
    if len(digits) % 2:
        _fail(f"hex text has an odd number of digits ({len(digits)}): a nibble is missing")
    quote = bytes.fromhex(digits)
    evidence = Evidence(quote=quote, provider="file", simulated=False)
    return LoadedEvidence("quote-hex", "hex", source, evidence, Quote.parse(quote))


def _from_json(text: str, source: str) -> LoadedEvidence:
    try:
        doc = json.loads(text)
    except ValueError as e:
        _fail(f"starts like JSON but is not valid JSON ({e})")
    if isinstance(doc, dict) and "quote" in doc and "provider" in doc and "simulated" in doc:
        evidence = Evidence.from_dict(doc)
        return LoadedEvidence(
            "lab-evidence-json", "json", source, evidence, Quote.parse(evidence.quote)
        )
    if not isinstance(doc, dict) or "quote" not in doc:
        _fail(
            "JSON without a 'quote' field: neither CoCo attestation agent evidence nor an "
            "hfl-lab Evidence document",
        )
    quote = quote_from_agent_json(doc)
    evidence = Evidence(
        quote=quote,
        provider="coco-attestation-agent",
        simulated=False,
        report_data_encoding="sha256-hex",
    )
    return LoadedEvidence("coco-agent-json", "json", source, evidence, Quote.parse(quote))


def _from_pem(data: bytes, source: str) -> LoadedEvidence:
    label = data.split(b"\n", 1)[0].strip()
    if label != b"-----BEGIN CERTIFICATE-----":
        _fail(
            f"PEM block '{label.decode(errors='replace')}' is not a certificate",
            fix="pass the RA-TLS certificate (-----BEGIN CERTIFICATE-----)",
        )
    return _certificate_evidence(load_certificate(data), source, "pem")


def load_certificate_evidence(
    cert: x509.Certificate | bytes, *, source: str, encoding: str
) -> LoadedEvidence:
    """The evidence an RA-TLS certificate carries; refused if it carries none."""
    try:
        return _certificate_evidence(cert, source, encoding)
    except HflLabError as e:
        raise _reraise(source, e) from None


def _certificate_evidence(
    cert: x509.Certificate | bytes, source: str, encoding: str
) -> LoadedEvidence:
    try:
        emb = decode_certificate(cert)
    except (ValueError, UnsupportedAlgorithm) as e:
        _fail(f"the certificate's public key cannot be read ({e})", check="certificate")
    quote = Quote.parse(emb.evidence.quote)
    return LoadedEvidence(
        emb.evidence_kind, encoding, source, emb.evidence, quote, emb.certificate, emb
    )


def from_evidence_object(evidence: Evidence, *, source: str = "<Evidence>") -> LoadedEvidence:
    """Wrap an ``Evidence`` a provider returned (notebooks), parsing its quote."""
    try:
        quote = Quote.parse(evidence.quote)
    except HflLabError as e:
        raise _reraise(source, e) from None
    return LoadedEvidence("lab-evidence", "object", source, evidence, quote)


def load_lab_root(path: str | Path) -> bytes:
    """The DER of the simulated platform's root certificate, from a PEM or DER file."""
    data = read_input(path)
    try:
        cert = load_certificate(data)
    except HflLabError as e:
        raise AttestationError(
            f"{path}: the lab root is not a certificate ({e.message})",
            check="input",
            fix="pass the simulated platform's root certificate (SimulatedPlatform.root_cert)",
        ) from None
    return cert.public_bytes(serialization.Encoding.DER)
