"""Secrets wrapped to an attested TD's key: ECDH (P-256/P-384) + HKDF-SHA256 + AES-256-GCM."""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from hfl_lab._exceptions import AttestationError

_INFO = b"hfl-lab/key-release/v1"


@dataclass(frozen=True)
class WrappedSecret:
    """What travels: the broker's ephemeral public key, a GCM nonce, and the ciphertext."""

    ephemeral_public: bytes  # SEC1 uncompressed point
    nonce: bytes
    ciphertext: bytes

    def __repr__(self) -> str:
        return f"WrappedSecret({len(self.ciphertext) - 16} bytes, sealed)"


def _spki_hash(key: ec.EllipticCurvePublicKey) -> bytes:
    der = key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return hashlib.sha256(der).digest()


def _key(
    shared: bytes, ephemeral: bytes, recipient: ec.EllipticCurvePublicKey, ctx: bytes
) -> bytes:
    # Salt binds the exchange to both public keys; info binds it to the release context
    # (app id, secret name), so a wrapped secret cannot be replayed under another name.
    return HKDF(
        algorithm=hashes.SHA256(),
        length=32,
        salt=hashlib.sha256(ephemeral + _spki_hash(recipient)).digest(),
        info=_INFO + b"\0" + ctx,
    ).derive(shared)


def wrap_secret(
    secret: bytes, recipient: ec.EllipticCurvePublicKey, context: bytes
) -> WrappedSecret:
    """Encrypt ``secret`` so that only the holder of ``recipient``'s private key can read it."""
    ephemeral = ec.generate_private_key(recipient.curve)
    eph_pub = ephemeral.public_key().public_bytes(
        serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint
    )
    shared = ephemeral.exchange(ec.ECDH(), recipient)
    nonce = os.urandom(12)
    ct = AESGCM(_key(shared, eph_pub, recipient, context)).encrypt(nonce, secret, context)
    return WrappedSecret(eph_pub, nonce, ct)


def unwrap_secret(
    wrapped: WrappedSecret, recipient: ec.EllipticCurvePrivateKey, context: bytes
) -> bytes:
    """Decrypt a wrapped secret with the TD's private key; any mismatch is one clear error."""
    try:
        eph = ec.EllipticCurvePublicKey.from_encoded_point(
            recipient.curve, wrapped.ephemeral_public
        )
        shared = recipient.exchange(ec.ECDH(), eph)
        key = _key(shared, wrapped.ephemeral_public, recipient.public_key(), context)
        return AESGCM(key).decrypt(wrapped.nonce, wrapped.ciphertext, context)
    except (InvalidTag, ValueError) as e:
        raise AttestationError(
            "the released secret cannot be unwrapped with this key (wrong key, wrong context, "
            f"or tampered: {type(e).__name__})",
            check="key_release",
        ) from None
