"""The binding convention: what a TD's REPORTDATA must hold for its RA-TLS key (and challenge).

    report_data = SHA-256(SubjectPublicKeyInfo DER) ‖ (SHA-256(challenge) or 32 zero bytes)

64 bytes, exactly TDX REPORTDATA. The first half ties the quote to one TLS key, so the evidence
cannot be lifted into a certificate for another key; the second half ties it to the verifier's
challenge, so it cannot be replayed. Without a challenge the second half is zero, which is also
what Gramine's legacy RA-TLS writes (SHA-256 of the SPKI DER, then 32 zero bytes), so the same
check covers both. Every part of the lab (certificates, trust service, key broker) uses this.
"""

from __future__ import annotations

import hashlib

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.types import PublicKeyTypes

from hfl_lab._exceptions import AttestationError

HALF = 32


def spki_der(public_key: PublicKeyTypes) -> bytes:
    """The DER SubjectPublicKeyInfo (algorithm + key) of ``public_key``: what gets hashed."""
    try:
        return public_key.public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    except (ValueError, TypeError) as e:
        raise AttestationError(
            f"cannot encode the public key as SubjectPublicKeyInfo ({e})",
            check="key_binding",
            fix="use an EC or RSA key for RA-TLS",
        ) from None


def spki_hash(spki: bytes) -> bytes:
    return hashlib.sha256(spki).digest()


def key_binding(spki: bytes, challenge: bytes | None) -> bytes:
    """SHA-256(spki) ‖ SHA-256(challenge), or ‖ 32 zero bytes without a challenge (64 bytes)."""
    if not isinstance(spki, bytes | bytearray) or not spki:
        raise AttestationError(
            "key_binding needs the DER SubjectPublicKeyInfo bytes of the TLS key",
            check="key_binding",
            fix="pass spki_der(public_key)",
        )
    tail = hashlib.sha256(challenge).digest() if challenge else bytes(HALF)
    return spki_hash(bytes(spki)) + tail


def claims_binding(claims_buffer: bytes) -> bytes:
    """Interoperable RA-TLS (Gramine, rats-tls): REPORTDATA = SHA-256(serialized claims) ‖ 0."""
    return hashlib.sha256(claims_buffer).digest()
