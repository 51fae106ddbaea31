"""The X.509 steps every certificate of the lab starts with (RA-TLS, mesh, simulated PKI,
and the plain certificates an attacker or a baseline uses)."""

from __future__ import annotations

import datetime as dt
import functools
from collections.abc import Sequence

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

__all__ = ["certificate_builder", "common_name", "peer_certificate", "self_signed"]


@functools.lru_cache(maxsize=256)
def peer_certificate(pem: bytes) -> x509.Certificate:
    """A caller's certificate as gRPC hands it to a server (PEM), parsed once per distinct
    certificate: every RPC of a mesh server reads it twice (the peer check, then the caller's
    session), and parsing costs ~85 us where a lookup costs under 1. A certificate is immutable
    and the key is its exact bytes, so a cached one is the certificate the call presented; the
    checks made of it (validity, evidence, role) still run on every call. Raises ``ValueError``
    as ``x509.load_pem_x509_certificate`` does for bytes that are not a certificate."""
    return x509.load_pem_x509_certificate(pem)


def common_name(cn: str, organization: str | None = None) -> x509.Name:
    """``CN=cn`` (and ``O=organization``)."""
    attributes = [x509.NameAttribute(NameOID.COMMON_NAME, cn)]
    if organization is not None:
        attributes.append(x509.NameAttribute(NameOID.ORGANIZATION_NAME, organization))
    return x509.Name(attributes)


def certificate_builder(
    subject: x509.Name,
    issuer: x509.Name,
    public_key: ec.EllipticCurvePublicKey,
    not_before: dt.datetime,
    not_after: dt.datetime,
) -> x509.CertificateBuilder:
    """Names, key, a random serial and the validity; the extensions are the caller's."""
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
    )


def self_signed(
    key: ec.EllipticCurvePrivateKey,
    subject: x509.Name,
    *,
    valid_since: dt.timedelta = dt.timedelta(minutes=1),
    valid_for: dt.timedelta = dt.timedelta(days=1),
    extensions: Sequence[x509.ExtensionType] = (),
    algorithm: hashes.SHA256 | hashes.SHA384 | hashes.SHA512 | None = None,
) -> x509.Certificate:
    """A self-signed certificate for ``key``, no CA and no evidence of its own: ``extensions``
    (non-critical) are all it carries."""
    now = dt.datetime.now(dt.UTC)
    builder = certificate_builder(subject, subject, key.public_key(), now - valid_since,
                                  now + valid_for)
    for extension in extensions:
        builder = builder.add_extension(extension, critical=False)
    return builder.sign(key, algorithm or hashes.SHA256())
