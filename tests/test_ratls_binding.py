"""RA-TLS evidence is bound to the certificate's own key and to the verifier's challenge.

The reference filled REPORTDATA with random bytes and put the key hash next to the quote, where
nothing signed it; these tests show that each such certificate is refused here.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import os

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec

from hfl_lab._exceptions import AttestationError
from hfl_lab.ratls import RaTlsIdentity, key_binding, read_evidence, spki_der, verify_certificate
from hfl_lab.ratls import evidence_ext as ext
from hfl_lab.ratls.binding import spki_hash
from hfl_lab.tee import SimulatedPlatform, SimulatedTdProvider, TdMeasurements
from tests.cert_support import dice_value, self_signed
from tests.td_support import policy_for, verifier_for

ROLE = "worker0"  # the TD of the conftest fixtures platform / measurements / provider


def _cert_with(
    key: ec.EllipticCurvePrivateKey, oid: x509.ObjectIdentifier, value: bytes, cn: str = "mallory"
) -> x509.Certificate:
    """A self-signed certificate for ``key`` carrying ``value`` under ``oid`` (an attacker's)."""
    return self_signed(key, cn=cn, extensions=[x509.UnrecognizedExtension(oid, value)],
                       valid_for=dt.timedelta(hours=1))


def test_key_binding_is_spki_hash_then_challenge_hash() -> None:
    spki = spki_der(ec.generate_private_key(ec.SECP256R1()).public_key())

    bound = key_binding(spki, b"challenge")

    assert len(bound) == 64
    assert bound[:32] == hashlib.sha256(spki).digest()
    assert bound[32:] == hashlib.sha256(b"challenge").digest()


def test_key_binding_without_challenge_is_gramines_legacy_layout() -> None:
    spki = spki_der(ec.generate_private_key(ec.SECP384R1()).public_key())

    assert key_binding(spki, None) == hashlib.sha256(spki).digest() + bytes(32)
    assert key_binding(spki, b"") == key_binding(spki, None)


def test_key_binding_differs_per_key_and_per_challenge() -> None:
    a = spki_der(ec.generate_private_key(ec.SECP256R1()).public_key())
    b = spki_der(ec.generate_private_key(ec.SECP256R1()).public_key())

    assert key_binding(a, b"n") != key_binding(b, b"n")
    assert key_binding(a, b"n") != key_binding(a, b"m")


def test_key_binding_refuses_an_empty_key() -> None:
    with pytest.raises(AttestationError, match="SubjectPublicKeyInfo"):
        key_binding(b"", None)


def test_certificate_quote_carries_the_binding_inside_the_signed_report(
    provider: SimulatedTdProvider,
) -> None:
    identity = RaTlsIdentity()

    cert = identity.make_certificate(provider, subject_cn=ROLE, role=ROLE, challenge=b"n1")

    report_data = read_evidence(cert).evidence.parsed().report_data
    assert report_data == key_binding(identity.spki_der, b"n1")


# -- (a) evidence lifted from TD A into a certificate for key B --------------------------


def test_copied_evidence_with_the_original_pubkey_hash_is_refused(
    platform: SimulatedPlatform, measurements: TdMeasurements, provider: SimulatedTdProvider
) -> None:
    genuine = RaTlsIdentity().make_certificate(provider, subject_cn=ROLE, role=ROLE, challenge=b"c")
    mallory = ec.generate_private_key(ec.SECP256R1())
    forged = _cert_with(mallory, ext.DICE_EVIDENCE_OID, dice_value(genuine))

    verdict = verify_certificate(
        forged, verifier_for(policy_for(measurements), platform=platform), challenge=b"c"
    )

    assert not verdict.accepted
    assert not verdict.check("key_binding").passed
    assert not verdict.check("report_data").passed
    assert verdict.check("dcap").passed  # the quote itself is genuine: only the binding fails
    with pytest.raises(AttestationError, match="another key") as err:
        read_evidence(forged)
    assert err.value.check == "key_binding"


def test_copied_evidence_with_a_rewritten_pubkey_hash_is_refused(
    platform: SimulatedPlatform, measurements: TdMeasurements, provider: SimulatedTdProvider
) -> None:
    genuine = RaTlsIdentity().make_certificate(provider, subject_cn=ROLE, role=ROLE, challenge=b"c")
    stolen = ext.decode_dice_extension(dice_value(genuine))
    mallory = ec.generate_private_key(ec.SECP256R1())
    claims = ext.encode_claims(
        spki_hash(spki_der(mallory.public_key())), nonce=stolen.nonce, lab=stolen.lab_claims
    )
    forged = _cert_with(
        mallory, ext.DICE_EVIDENCE_OID, ext.encode_dice_extension(stolen.quote, claims)
    )

    verdict = verify_certificate(
        forged, verifier_for(policy_for(measurements), platform=platform), challenge=b"c"
    )

    assert verdict.check("key_binding").passed  # the claim now names mallory's key …
    assert not verdict.check("report_data").passed  # … but the signed quote does not
    assert not verdict.accepted


# -- (b) the reference's flaw: random REPORTDATA, key hash outside the quote -------------


def test_random_report_data_with_the_key_hash_outside_the_quote_is_refused(
    platform: SimulatedPlatform, measurements: TdMeasurements, provider: SimulatedTdProvider
) -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    evidence = provider.get_evidence(os.urandom(64))
    claims = ext.encode_claims(
        spki_hash(spki_der(key.public_key())), lab=ext.lab_claims(evidence, ROLE)
    )
    cert = _cert_with(key, ext.DICE_EVIDENCE_OID, ext.encode_dice_extension(evidence.quote, claims))

    verdict = verify_certificate(
        cert, verifier_for(policy_for(measurements, "key"), platform=platform)
    )

    assert verdict.check("dcap").passed and verdict.check("key_binding").passed
    assert not verdict.check("report_data").passed
    assert not verdict.accepted
    assert "report_data" in verdict.reason


# -- (c) a certificate made for another challenge ----------------------------------------


def test_wrong_challenge_is_refused(
    platform: SimulatedPlatform, measurements: TdMeasurements, provider: SimulatedTdProvider
) -> None:
    cert = RaTlsIdentity().make_certificate(provider, subject_cn=ROLE, role=ROLE, challenge=b"old")

    verdict = verify_certificate(
        cert, verifier_for(policy_for(measurements), platform=platform), challenge=b"ours"
    )

    assert not verdict.accepted
    assert not verdict.check("report_data").passed
    assert not verdict.check("nonce").passed


def test_key_plus_nonce_policy_refuses_a_certificate_without_a_challenge(
    platform: SimulatedPlatform, measurements: TdMeasurements, provider: SimulatedTdProvider
) -> None:
    cert = RaTlsIdentity().make_certificate(provider, subject_cn=ROLE, role=ROLE)

    verdict = verify_certificate(
        cert, verifier_for(policy_for(measurements, "key+nonce"), platform=platform)
    )

    assert not verdict.accepted
    assert not verdict.check("nonce").passed
    assert verdict.check("report_data").passed
