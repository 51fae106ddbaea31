"""Test helpers: plain self-signed certificates (an attacker's or a non-RA-TLS peer's)."""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from hfl_lab.ratls import evidence_ext as ext


def self_signed(
    key: ec.EllipticCurvePrivateKey | None = None,
    *,
    cn: str = "plain",
    extensions: Sequence[x509.ExtensionType] = (),
    valid_since: dt.timedelta = dt.timedelta(minutes=1),
    valid_for: dt.timedelta = dt.timedelta(days=1),
) -> x509.Certificate:
    """A self-signed certificate for ``key`` (a fresh P-256 key by default), no CA involved."""
    key = key or ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])
    now = dt.datetime.now(dt.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - valid_since)
        .not_valid_after(now + valid_for)
    )
    for extension in extensions:
        builder = builder.add_extension(extension, critical=False)
    return builder.sign(key, hashes.SHA256())


def dice_value(cert: x509.Certificate) -> bytes:
    """The raw value of the interoperable RA-TLS evidence extension of ``cert``."""
    value = cert.extensions.get_extension_for_oid(ext.DICE_EVIDENCE_OID).value
    assert isinstance(value, x509.UnrecognizedExtension)
    return value.value
