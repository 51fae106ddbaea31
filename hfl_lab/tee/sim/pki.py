"""Certificates and CRLs of the simulated TD's lab-local chain, shaped like Intel's SGX PKI."""

from __future__ import annotations

import datetime as dt

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from hfl_lab._x509 import certificate_builder
from hfl_lab.tee.sgx_extension import SGX_EXTENSION_OID, PckExtension

# Every name says "SIMULATED" so that no report, log or certificate viewer can mistake it
# for Intel's PKI.
ORG = "HFL-TDX Lab (SIMULATED TD, not secure)"


def name(common_name: str, pseudonym: str | None = None) -> x509.Name:
    """A lab name; ``pseudonym`` (X.520 pseudonym) names the one participant a joiner's PCK
    certificate may attest as."""
    attributes = [
        x509.NameAttribute(NameOID.COMMON_NAME, common_name),
        x509.NameAttribute(NameOID.ORGANIZATION_NAME, ORG),
    ]
    if pseudonym is not None:
        attributes.append(x509.NameAttribute(NameOID.PSEUDONYM, pseudonym))
    return x509.Name(attributes)


def _builder(
    subject: x509.Name,
    issuer: x509.Name,
    public_key: ec.EllipticCurvePublicKey,
    not_before: dt.datetime,
    not_after: dt.datetime,
) -> x509.CertificateBuilder:
    return certificate_builder(subject, issuer, public_key, not_before, not_after).add_extension(
        x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False
    )


def ca_certificate(
    subject: str,
    key: ec.EllipticCurvePrivateKey,
    issuer_cert: x509.Certificate | None,
    issuer_key: ec.EllipticCurvePrivateKey,
    validity: tuple[dt.datetime, dt.datetime],
    path_length: int | None,
) -> x509.Certificate:
    """A CA certificate (the root when ``issuer_cert`` is None) that can sign certs and CRLs."""
    issuer = issuer_cert.subject if issuer_cert is not None else name(subject)
    builder = _builder(name(subject), issuer, key.public_key(), *validity)
    builder = builder.add_extension(
        x509.BasicConstraints(ca=True, path_length=path_length), critical=True
    ).add_extension(_ca_usage(), critical=True)
    builder = builder.add_extension(
        x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer_key.public_key()), critical=False
    )
    return builder.sign(issuer_key, hashes.SHA256())


def leaf_certificate(
    subject: str,
    public_key: ec.EllipticCurvePublicKey,
    issuer_cert: x509.Certificate,
    issuer_key: ec.EllipticCurvePrivateKey,
    validity: tuple[dt.datetime, dt.datetime],
    pck_extension: PckExtension | None = None,
    pseudonym: str | None = None,
) -> x509.Certificate:
    """A signing leaf: a TCB signing certificate, or a PCK certificate with the SGX extension."""
    builder = _builder(name(subject, pseudonym), issuer_cert.subject, public_key, *validity)
    builder = builder.add_extension(
        x509.BasicConstraints(ca=False, path_length=None), critical=True
    ).add_extension(_leaf_usage(), critical=True)
    builder = builder.add_extension(
        x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer_key.public_key()), critical=False
    )
    if pck_extension is not None:
        builder = builder.add_extension(
            x509.UnrecognizedExtension(SGX_EXTENSION_OID, pck_extension.to_der()), critical=False
        )
    return builder.sign(issuer_key, hashes.SHA256())


def empty_crl(
    issuer_cert: x509.Certificate,
    issuer_key: ec.EllipticCurvePrivateKey,
    validity: tuple[dt.datetime, dt.datetime],
) -> x509.CertificateRevocationList:
    """A CRL with no entries: verifiers that deny unknown revocation status need one per CA."""
    return (
        x509.CertificateRevocationListBuilder()
        .issuer_name(issuer_cert.subject)
        .last_update(validity[0])
        .next_update(validity[1])
        .add_extension(x509.CRLNumber(1), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer_key.public_key()),
            critical=False,
        )
        .sign(issuer_key, hashes.SHA256())
    )


def _ca_usage() -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=False,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=True,
        crl_sign=True,
        encipher_only=False,
        decipher_only=False,
    )


def _leaf_usage() -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=True,
        content_commitment=True,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=False,
        crl_sign=False,
        encipher_only=False,
        decipher_only=False,
    )
