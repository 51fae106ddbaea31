"""Test helpers: plain self-signed certificates (an attacker's or a non-RA-TLS peer's)."""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec

from hfl_lab import _x509 as x509_steps
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
    return x509_steps.self_signed(key, x509_steps.common_name(cn), valid_since=valid_since,
                                  valid_for=valid_for, extensions=extensions)


def dice_value(cert: x509.Certificate) -> bytes:
    """The raw value of the interoperable RA-TLS evidence extension of ``cert``."""
    value = cert.extensions.get_extension_for_oid(ext.DICE_EVIDENCE_OID).value
    assert isinstance(value, x509.UnrecognizedExtension)
    return value.value
