"""RA-TLS certificates: a key made in memory, TDX evidence bound to it, and the peer's check."""

from __future__ import annotations

import copy
import datetime as dt
import hashlib
import ipaddress
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from hfl_lab._exceptions import AttestationError, ConfigError
from hfl_lab._x509 import certificate_builder, common_name
from hfl_lab.ratls import evidence_ext as ext
from hfl_lab.ratls.binding import claims_binding, key_binding, spki_der, spki_hash
from hfl_lab.tee.evidence import Evidence, EvidenceProvider
from hfl_lab.tee.quote import Quote
from hfl_lab.tee.verdict import Verdict
from hfl_lab.tee.verifier import Verifier

_CURVES: dict[str, tuple[ec.EllipticCurve, hashes.SHA256 | hashes.SHA384]] = {
    "P-256": (ec.SECP256R1(), hashes.SHA256()),
    "P-384": (ec.SECP384R1(), hashes.SHA384()),
}
#: how REPORTDATA binds the key: the lab convention, or the interoperable claims hash (Gramine)
KEY_BINDING_SCHEME = "key-binding"
CLAIMS_HASH_SCHEME = "claims-hash"
DEFAULT_VALIDITY_S = 24 * 3600


class RaTlsIdentity:
    """A TLS key pair that exists only in this process, and the RA-TLS certificates for it.

    The private key is never written anywhere: ``private_key_pem()`` returns bytes for gRPC
    credentials in memory, and neither ``repr`` nor ``str`` shows any part of it.
    """

    __slots__ = ("_key", "_sign_hash", "certificate", "curve")

    def __init__(self, curve: str = "P-256") -> None:
        if curve not in _CURVES:
            raise ConfigError(f"RA-TLS curve '{curve}' is not supported; use P-256 or P-384")
        ec_curve, self._sign_hash = _CURVES[curve]
        self.curve = curve
        self._key = ec.generate_private_key(ec_curve)
        self.certificate: x509.Certificate | None = None

    def __repr__(self) -> str:
        return f"RaTlsIdentity(curve={self.curve}, spki_sha256={self.spki_sha256[:16]}…)"

    __str__ = __repr__

    def __reduce__(self) -> Any:
        raise TypeError("an RaTlsIdentity cannot be pickled: its private key stays in this process")

    @property
    def public_key(self) -> ec.EllipticCurvePublicKey:
        return self._key.public_key()

    @property
    def spki_der(self) -> bytes:
        return spki_der(self.public_key)

    @property
    def spki_sha256(self) -> str:
        return spki_hash(self.spki_der).hex()

    def make_certificate(
        self,
        provider: EvidenceProvider,
        *,
        subject_cn: str,
        role: str,
        challenge: bytes | None = None,
        validity_s: int = DEFAULT_VALIDITY_S,
        sans: Sequence[str] | None = None,
    ) -> x509.Certificate:
        """A self-signed certificate for this key, carrying evidence that binds it.

        REPORTDATA = ``key_binding(spki, challenge)``. ``sans`` are DNS names or IP addresses;
        by default ``subject_cn``, ``localhost`` and ``127.0.0.1``.
        """
        if not subject_cn:
            raise ConfigError("an RA-TLS certificate needs a subject_cn (e.g. the role name)")
        if validity_s <= 0:
            raise ConfigError(f"validity_s must be a positive number of seconds, not {validity_s}")
        spki = self.spki_der
        evidence = provider.get_evidence(key_binding(spki, challenge))
        claims = ext.encode_claims(
            spki_hash(spki), nonce=challenge, lab=ext.lab_claims(evidence, role)
        )
        now = dt.datetime.now(dt.UTC)
        name = common_name(subject_cn)
        builder = (
            certificate_builder(name, name, self.public_key, now - dt.timedelta(seconds=60),
                                now + dt.timedelta(seconds=validity_s))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=True,
                    key_cert_sign=False,
                    crl_sign=False,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(
                x509.ExtendedKeyUsage(
                    [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
                ),
                critical=False,
            )
            .add_extension(
                _san(sans if sans is not None else (subject_cn, "localhost", "127.0.0.1")),
                critical=False,
            )
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(self.public_key), False)
            # The interoperable draft: non-critical, because OpenSSL/mbedTLS reject unknown
            # critical extensions.
            .add_extension(
                x509.UnrecognizedExtension(
                    ext.DICE_EVIDENCE_OID, ext.encode_dice_extension(evidence.quote, claims)
                ),
                critical=False,
            )
        )
        self.certificate = builder.sign(self._key, self._sign_hash)
        return self.certificate

    @property
    def certificate_pem(self) -> bytes:
        if self.certificate is None:
            raise ConfigError("no certificate yet: call make_certificate(provider, ...) first")
        return self.certificate.public_bytes(serialization.Encoding.PEM)

    @property
    def private_key(self) -> ec.EllipticCurvePrivateKey:
        """The key object, for in-process use (ECDH unwrapping of released secrets) only."""
        return self._key

    def private_key_pem(self) -> bytes:
        """PKCS#8 PEM in memory, for ``grpc.ssl_*_credentials``; never write it to a file."""
        return self._key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )


def _san(names: Sequence[str]) -> x509.SubjectAlternativeName:
    general: list[x509.GeneralName] = []
    for n in names:
        try:
            general.append(x509.IPAddress(ipaddress.ip_address(n)))
        except ValueError:
            general.append(x509.DNSName(n))
    return x509.SubjectAlternativeName(general)


# -- reading ------------------------------------------------------------------------------


@dataclass(frozen=True)
class EmbeddedEvidence:
    """The evidence a certificate carries and the REPORTDATA binding a verifier must check."""

    kind: str  # "dice" | "gramine-legacy"
    evidence: Evidence
    claims: dict[str, Any]
    spki: bytes
    #: what REPORTDATA must bind for this certificate (pass to ``Verifier.verify``)
    binding: bytes
    #: "key-binding" (SHA-256(SPKI) ‖ SHA-256(nonce)|0) or "claims-hash" (SHA-256(claims) ‖ 0)
    scheme: str
    subject: str
    nonce: bytes | None = None
    #: the pubkey-hash claim (DICE) or REPORTDATA[:32] (legacy), and SHA(SPKI) to compare with
    claimed_key_hash: bytes = b""
    actual_key_hash: bytes = b""
    role: str | None = None
    certificate: x509.Certificate | None = field(default=None, repr=False, compare=False)

    @property
    def key_bound(self) -> bool:
        return bool(self.claimed_key_hash) and self.claimed_key_hash == self.actual_key_hash

    @property
    def evidence_kind(self) -> str:
        return "ratls-dice" if self.kind == "dice" else "ratls-gramine"

    def binding_for(self, challenge: bytes | None) -> bytes:
        """The binding to check when the verifier issued ``challenge`` itself."""
        if challenge is None or self.scheme == CLAIMS_HASH_SCHEME:
            return self.binding
        return key_binding(self.spki, challenge)


def load_certificate(cert: x509.Certificate | bytes | str) -> x509.Certificate:
    """A certificate from an object, PEM (bytes/str) or DER; ``AttestationError`` otherwise."""
    if isinstance(cert, x509.Certificate):
        return cert
    if isinstance(cert, str):
        cert = cert.encode()
    if not isinstance(cert, bytes | bytearray | memoryview):
        raise AttestationError(
            f"expected an X.509 certificate (object, PEM or DER), got {type(cert).__name__}",
            check="certificate",
        )
    data = bytes(cert)
    try:
        if data.lstrip().startswith(b"-----BEGIN"):
            return x509.load_pem_x509_certificate(data)
        return x509.load_der_x509_certificate(data)
    except (ValueError, x509.InvalidVersion):
        raise AttestationError(
            "the data is not an X.509 certificate (neither PEM nor DER)",
            check="certificate",
            fix="pass the peer's certificate as PEM or DER bytes",
        ) from None


def _subject(cert: x509.Certificate) -> str:
    try:
        names = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    except ValueError:
        return ""
    value = names[0].value if names else ""
    return value if isinstance(value, str) else value.decode(errors="replace")


def _extension_value(cert: x509.Certificate, oids: Sequence[x509.ObjectIdentifier]) -> bytes | None:
    try:
        extensions = cert.extensions
    except ValueError as e:
        raise AttestationError(
            f"the certificate's extensions cannot be parsed ({e})",
            check="certificate",
            fix=ext.FIX,
        ) from None
    for oid in oids:
        for extension in extensions:
            if extension.oid == oid:
                value = extension.value
                if isinstance(value, x509.UnrecognizedExtension):
                    return bytes(value.value)
                return bytes(value.public_bytes())
    return None


def decode_certificate(cert: x509.Certificate | bytes | str) -> EmbeddedEvidence:
    """Everything in the certificate, without judging the key binding (the verdict does)."""
    c = load_certificate(cert)
    try:
        public_key = c.public_key()
    except (ValueError, UnsupportedAlgorithm) as e:
        # DER that parses as X.509 can still hold a key that is no point on its curve
        raise AttestationError(
            f"the certificate's public key cannot be read ({e})",
            check="certificate",
            fix="the peer must present an RA-TLS certificate with a valid EC or RSA key",
        ) from None
    spki = spki_der(public_key)
    subject = _subject(c)
    dice = _extension_value(c, (ext.DICE_EVIDENCE_OID,))
    if dice is not None:
        d = ext.decode_dice_extension(dice)
        lab = d.lab_claims
        Quote.parse(d.quote)  # malformed quotes fail here, with field and offset
        if lab is not None:
            evidence = Evidence(
                quote=d.quote,
                provider=str(lab.get("provider", "unknown")),
                simulated=bool(lab.get("simulated", False)),
                produced_at=float(lab.get("produced_at", 0.0)),
                collateral_json=lab.get("collateral"),
                report_data_encoding=str(lab.get("report_data_encoding", "raw")),
            )
            scheme, binding = KEY_BINDING_SCHEME, key_binding(spki, d.nonce)
        else:
            # A foreign interoperable stack (Gramine, rats-tls): REPORTDATA hashes the claims.
            evidence = Evidence(quote=d.quote, provider="ratls-dice", simulated=False)
            scheme, binding = CLAIMS_HASH_SCHEME, claims_binding(d.claims_buffer)
        return EmbeddedEvidence(
            kind="dice",
            evidence=evidence,
            claims=d.claims,
            spki=spki,
            binding=binding,
            scheme=scheme,
            subject=subject,
            nonce=d.nonce,
            claimed_key_hash=d.pubkey_hash,
            actual_key_hash=d.hash_spki(spki),
            role=str(lab["role"]) if lab is not None and "role" in lab else None,
            certificate=c,
        )
    legacy = _extension_value(c, ext.LEGACY_QUOTE_OIDS)
    if legacy is not None:
        quote = ext.decode_legacy_extension(legacy)
        parsed = Quote.parse(quote)
        return EmbeddedEvidence(
            kind="gramine-legacy",
            evidence=Evidence(quote=quote, provider="gramine-legacy", simulated=False),
            claims={},
            spki=spki,
            binding=key_binding(spki, None),
            scheme=KEY_BINDING_SCHEME,
            subject=subject,
            claimed_key_hash=parsed.report_data[:32],
            actual_key_hash=spki_hash(spki),
            certificate=c,
        )
    raise AttestationError(
        "no attestation evidence in the certificate (neither the TCG DICE extension "
        "2.23.133.5.4.9 nor Gramine's legacy quote extension)",
        check="certificate",
        fix="the peer must present an RA-TLS certificate (RaTlsIdentity.make_certificate)",
    )


def read_evidence(cert: x509.Certificate | bytes | str) -> EmbeddedEvidence:
    """The evidence in an RA-TLS certificate; ``AttestationError`` if absent, malformed or
    made for another key (the pubkey-hash claim is not this certificate's key)."""
    emb = decode_certificate(cert)
    if emb.kind == "dice" and not emb.key_bound:
        raise AttestationError(
            "key binding failure: the certificate's pubkey-hash claim is not the hash of its "
            "own public key, so it carries evidence made for another key (copied from another TD)",
            check="key_binding",
            expected=emb.actual_key_hash.hex(),
            actual=emb.claimed_key_hash.hex(),
            fix="reject this peer; a genuine TD makes its evidence for its own certificate key",
        )
    return emb


# -- verifying ----------------------------------------------------------------------------


def verify_certificate(
    cert: x509.Certificate | bytes | str,
    verifier: Verifier,
    *,
    role: str | None = None,
    challenge: bytes | None = None,
    issued_at: float | None = None,
    now: int | None = None,
) -> Verdict:
    """Verify the certificate's evidence, that it binds this certificate's key, and validity.

    Raises ``AttestationError`` only when there is nothing to verify (not a certificate, no or
    malformed evidence); every judgement, the key binding included, is a check in the verdict.
    """
    emb = decode_certificate(cert)
    quiet = copy.copy(verifier)
    quiet.on_verdict = None  # report once, after the certificate checks are in
    now_s = int(now if now is not None else verifier.clock())
    verdict = quiet.verify(
        emb.evidence,
        binding=emb.binding_for(challenge),
        issued_at=issued_at,
        role=role,
        subject=emb.subject,
        now=now_s,
        evidence_kind=emb.evidence_kind,
    )
    _check_key_binding(verdict, emb)
    _check_nonce(verdict, emb, challenge, verifier.policy.report_data_binding)
    if emb.certificate is not None:
        _check_validity(verdict, emb.certificate, now_s)
    if verifier.on_verdict is not None:
        verifier.on_verdict(verdict)
    return verdict


def _check_key_binding(v: Verdict, emb: EmbeddedEvidence) -> None:
    what = "pubkey-hash claim" if emb.kind == "dice" else "REPORTDATA[0:32]"
    v.add(
        "key_binding",
        emb.key_bound,
        f"hash of this certificate's key {emb.actual_key_hash.hex()}",
        f"{what} {emb.claimed_key_hash.hex()}",
        ""
        if emb.key_bound
        else f"the {what} is not this certificate's key: evidence made for "
        "another key (copied from another TD)",
    )


def _check_nonce(v: Verdict, emb: EmbeddedEvidence, challenge: bytes | None, policy: str) -> None:
    if challenge is not None:
        ok = emb.nonce == challenge
        v.add(
            "nonce",
            ok,
            f"our challenge (sha256 {_short_hash(challenge)}…)",
            "none" if emb.nonce is None else f"sha256 {_short_hash(emb.nonce)}…",
            "" if ok else "the certificate was not made for our challenge (replayed evidence?)",
        )
    elif policy == "key+nonce" and emb.nonce is None:
        v.add(
            "nonce",
            False,
            "a challenge bound into REPORTDATA",
            "none",
            "the policy requires key+nonce binding but the certificate carries no challenge",
        )


def _short_hash(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()[:16]


def _check_validity(v: Verdict, cert: x509.Certificate, now: int) -> None:
    start = cert.not_valid_before_utc.timestamp()
    end = cert.not_valid_after_utc.timestamp()
    ok = start <= now <= end
    v.add(
        "certificate_validity",
        ok,
        f"{cert.not_valid_before_utc.isoformat()} … {cert.not_valid_after_utc.isoformat()}",
        dt.datetime.fromtimestamp(now, dt.UTC).isoformat(),
        ""
        if ok
        else ("the certificate is not yet valid" if now < start else "the certificate has expired"),
    )
