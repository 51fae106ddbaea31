"""RA-TLS certificates: round trip, Gramine formats, malformed input, and a key that stays put."""

from __future__ import annotations

import datetime as dt
import os
import pickle
import tempfile
import time
from pathlib import Path

import cbor2
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hfl_lab._exceptions import AttestationError, HflLabError
from hfl_lab.ratls import RaTlsIdentity, key_binding, read_evidence, spki_der, verify_certificate
from hfl_lab.ratls import evidence_ext as ext
from hfl_lab.ratls.binding import claims_binding, spki_hash
from hfl_lab.tee import (
    Collateral,
    SimulatedPlatform,
    SimulatedTdProvider,
    TdMeasurements,
    Verdict,
    Verifier,
)
from tests.cert_support import dice_value, self_signed
from tests.td_support import policy_for, verifier_for

ROLE = "ps0"  # the TD of the conftest fixtures platform / measurements / provider


@pytest.fixture(scope="module")
def genuine(provider: SimulatedTdProvider) -> x509.Certificate:
    return RaTlsIdentity().make_certificate(provider, subject_cn=ROLE, role=ROLE, challenge=b"n")


def _cert_with(
    key: ec.EllipticCurvePrivateKey,
    extension: tuple[x509.ObjectIdentifier, bytes] | None,
    *,
    days: float = 1.0,
) -> x509.Certificate:
    extensions = [x509.UnrecognizedExtension(*extension)] if extension is not None else []
    return self_signed(key, cn="RATLS", extensions=extensions,
                       valid_since=dt.timedelta(days=2), valid_for=dt.timedelta(days=days))


@pytest.mark.parametrize(("binding", "challenge"), [("key+nonce", b"fresh"), ("key", None)])
@pytest.mark.parametrize("curve", ["P-256", "P-384"])
def test_certificate_verifies_under_its_policy(
    platform: SimulatedPlatform,
    measurements: TdMeasurements,
    provider: SimulatedTdProvider,
    binding: str,
    challenge: bytes | None,
    curve: str,
) -> None:
    identity = RaTlsIdentity(curve)
    cert = identity.make_certificate(provider, subject_cn=ROLE, role=ROLE, challenge=challenge)
    verifier = verifier_for(policy_for(measurements, binding), platform=platform)

    verdict = verify_certificate(identity.certificate_pem, verifier, role=ROLE, challenge=challenge)

    assert verdict.accepted, verdict.to_table()
    assert verdict.simulated and verdict.evidence_kind == "ratls-dice"
    assert verdict.subject == ROLE
    names = {c.name for c in verdict.checks}
    assert {"key_binding", "report_data", "certificate_validity", "dcap"} <= names
    assert cert.public_bytes(serialization.Encoding.PEM) == identity.certificate_pem


def test_read_evidence_returns_quote_claims_and_binding(
    provider: SimulatedTdProvider, platform: SimulatedPlatform
) -> None:
    identity = RaTlsIdentity()
    cert = identity.make_certificate(provider, subject_cn="w", role="worker1", challenge=b"c")

    emb = read_evidence(cert.public_bytes(serialization.Encoding.DER))

    assert emb.kind == "dice" and emb.scheme == "key-binding"
    assert emb.spki == identity.spki_der
    assert emb.binding == key_binding(identity.spki_der, b"c")
    assert emb.nonce == b"c" and emb.role == "worker1"
    assert emb.evidence.collateral_json == platform.collateral_json
    assert emb.evidence.simulated and emb.evidence.provider == "simulated-td"


def test_certificate_has_the_interoperable_extension_layout(genuine: x509.Certificate) -> None:
    extension = genuine.extensions.get_extension_for_oid(ext.DICE_EVIDENCE_OID)

    value = dice_value(genuine)

    assert not extension.critical  # the draft: clear it until TLS libraries accept it
    assert value.startswith(bytes.fromhex("d9ea6082"))  # tag 60000, array of 2 (as Gramine)
    tagged = cbor2.loads(value)
    _quote, claims_buffer = tagged.value
    claims = cbor2.loads(claims_buffer)
    assert cbor2.loads(claims["pubkey-hash"]) == [1, spki_hash(spki_der(genuine.public_key()))]
    assert claims["nonce"] == b"n"
    assert claims["hfl-lab"]["role"] == ROLE


def test_expired_certificate_fails_the_validity_check(
    platform: SimulatedPlatform, measurements: TdMeasurements, genuine: x509.Certificate
) -> None:
    verifier = verifier_for(policy_for(measurements, "key+nonce"), platform=platform)
    later = int(genuine.not_valid_after_utc.timestamp()) + 10

    verdict = verify_certificate(genuine, verifier, challenge=b"n", now=later)

    assert not verdict.check("certificate_validity").passed
    assert "expired" in verdict.check("certificate_validity").reason


def test_on_verdict_sees_the_certificate_checks(
    platform: SimulatedPlatform, measurements: TdMeasurements, genuine: x509.Certificate
) -> None:
    seen: list[Verdict] = []
    verifier = verifier_for(
        policy_for(measurements, "key+nonce"), platform=platform, on_verdict=seen.append
    )

    verify_certificate(genuine, verifier, challenge=b"n")

    assert len(seen) == 1
    assert seen[0].check("key_binding").passed and seen[0].check("certificate_validity").passed


# -- Gramine formats ----------------------------------------------------------------------


@pytest.mark.parametrize("oid", ext.LEGACY_QUOTE_OIDS, ids=str)
def test_gramine_legacy_certificate_is_read_and_verified(
    platform: SimulatedPlatform,
    measurements: TdMeasurements,
    provider: SimulatedTdProvider,
    oid: x509.ObjectIdentifier,
) -> None:
    key = ec.generate_private_key(ec.SECP384R1())
    spki = spki_der(key.public_key())
    quote = provider.get_evidence(key_binding(spki, None)).quote  # SHA-256(SPKI) ‖ 0³²
    cert = _cert_with(key, (oid, ext.encode_legacy_extension(quote)))
    collateral = Collateral(platform.collateral_json, "lab")
    verifier = verifier_for(
        policy_for(measurements, "key"), platform=platform, collateral=collateral
    )

    emb = read_evidence(cert)
    verdict = verify_certificate(cert, verifier)

    assert emb.kind == "gramine-legacy" and emb.evidence.quote == quote
    assert verdict.accepted, verdict.to_table()
    assert verdict.evidence_kind == "ratls-gramine"


def test_gramine_legacy_certificate_for_another_key_is_refused(
    platform: SimulatedPlatform, measurements: TdMeasurements, provider: SimulatedTdProvider
) -> None:
    other = spki_der(ec.generate_private_key(ec.SECP256R1()).public_key())
    quote = provider.get_evidence(key_binding(other, None)).quote
    cert = _cert_with(
        ec.generate_private_key(ec.SECP256R1()), (ext.GRAMINE_LEGACY_QUOTE_OID, quote)
    )
    verifier = verifier_for(
        policy_for(measurements, "key"),
        platform=platform,
        collateral=Collateral(platform.collateral_json, "lab"),
    )

    verdict = verify_certificate(cert, verifier)

    assert not verdict.accepted
    assert not verdict.check("key_binding").passed and not verdict.check("report_data").passed


def test_gramine_style_dice_certificate_binds_the_claims_hash(
    platform: SimulatedPlatform, measurements: TdMeasurements, provider: SimulatedTdProvider
) -> None:
    key = ec.generate_private_key(ec.SECP384R1())
    claims = ext.encode_claims(spki_hash(spki_der(key.public_key())))  # only pubkey-hash
    quote = provider.get_evidence(claims_binding(claims)).quote  # Gramine: SHA-256(claims) ‖ 0
    cert = _cert_with(key, (ext.DICE_EVIDENCE_OID, ext.encode_dice_extension(quote, claims)))
    verifier = verifier_for(
        policy_for(measurements, "key"),
        platform=platform,
        collateral=Collateral(platform.collateral_json, "lab"),
    )

    emb = read_evidence(cert)
    verdict = verify_certificate(cert, verifier)

    assert claims.startswith(b"\xa1\x6bpubkey-hash\x58\x24\x82\x01\x58\x20")  # Gramine's bytes
    assert emb.scheme == "claims-hash"
    assert verdict.accepted, verdict.to_table()


# -- malformed input ----------------------------------------------------------------------


def test_certificate_without_evidence_is_refused_clearly() -> None:
    cert = _cert_with(ec.generate_private_key(ec.SECP256R1()), None)

    with pytest.raises(AttestationError, match="no attestation evidence in the certificate") as e:
        read_evidence(cert)
    assert e.value.check == "certificate"


@pytest.mark.parametrize("data", [b"", b"garbage", b"-----BEGIN CERTIFICATE-----\nxx\n", b"\x30"])
def test_garbage_is_not_a_certificate(data: bytes) -> None:
    with pytest.raises(AttestationError, match=r"not an X\.509 certificate") as e:
        read_evidence(data)
    assert e.value.check == "certificate"


@pytest.mark.parametrize(
    ("value", "message"),
    [
        (b"\xff\x00", "not valid CBOR"),
        (cbor2.dumps([b"q", b"c"]), "expected CBOR tag 60000"),
        (cbor2.dumps(cbor2.CBORTag(60001, [b"q", b"c"])), "found tag 60001"),
        (cbor2.dumps(cbor2.CBORTag(60000, [b"q"])), "array of two"),
        (cbor2.dumps(cbor2.CBORTag(60000, [b"q", {"pubkey-hash": b""}])), "claims"),
        (cbor2.dumps(cbor2.CBORTag(60000, [b"q", cbor2.dumps({"nonce": b"n"})])), "pubkey-hash"),
        (
            cbor2.dumps(
                cbor2.CBORTag(
                    60000, [b"q", cbor2.dumps({"pubkey-hash": cbor2.dumps([-16, bytes(32)])})]
                )
            ),
            "hash algorithm id -16",
        ),
        (cbor2.dumps(cbor2.CBORTag(60000, [b"q", b"c"])) + b"\x00", "after its CBOR item"),
    ],
)
def test_malformed_dice_extension_is_refused_clearly(value: bytes, message: str) -> None:
    cert = _cert_with(ec.generate_private_key(ec.SECP256R1()), (ext.DICE_EVIDENCE_OID, value))

    with pytest.raises(AttestationError, match=message) as e:
        read_evidence(cert)
    assert e.value.check == "certificate"


def test_garbage_quote_in_a_well_formed_extension_names_the_quote(
    genuine: x509.Certificate,
) -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    claims = ext.encode_claims(spki_hash(spki_der(key.public_key())))
    cert = _cert_with(key, (ext.DICE_EVIDENCE_OID, ext.encode_dice_extension(b"\x04" * 80, claims)))

    with pytest.raises(AttestationError, match="malformed quote"):
        read_evidence(cert)


_KEY = ec.generate_private_key(ec.SECP256R1())
_CBOR_VALUES = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**70), 2**70)
    | st.binary(max_size=40)
    | st.text(max_size=12)
    | st.floats(),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner, max_size=4)
    ),
    max_leaves=12,
)


def _outcome(value: bytes, verifier: Verifier) -> None:
    cert = _cert_with(_KEY, (ext.DICE_EVIDENCE_OID, value))
    try:
        verify_certificate(cert, verifier)
        read_evidence(cert)
    except HflLabError as e:
        assert str(e)  # one readable sentence; any other exception type fails the test


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_mutated_extension_bytes_raise_only_lab_errors(
    data: st.DataObject,
    genuine: x509.Certificate,
    platform: SimulatedPlatform,
    measurements: TdMeasurements,
) -> None:
    value = bytearray(dice_value(genuine))
    for _ in range(data.draw(st.integers(1, 4))):
        op = data.draw(st.sampled_from(["flip", "cut", "insert"]))
        at = data.draw(st.integers(0, len(value) - 1))
        if op == "flip":
            value[at] ^= data.draw(st.integers(1, 255))
        elif op == "cut":
            del value[at : at + data.draw(st.integers(1, 64))]
        else:
            value[at:at] = data.draw(st.binary(min_size=1, max_size=8))
        if not value:
            value = bytearray(b"\x00")
    verifier = verifier_for(policy_for(measurements, "key"), platform=platform)

    _outcome(bytes(value), verifier)


@settings(max_examples=150, deadline=None)
@given(raw=st.binary(max_size=200), tree=_CBOR_VALUES)
def test_arbitrary_extension_values_raise_only_lab_errors(
    raw: bytes, tree: object, platform: SimulatedPlatform, measurements: TdMeasurements
) -> None:
    verifier = verifier_for(policy_for(measurements, "key"), platform=platform)
    shaped = cbor2.dumps(
        cbor2.CBORTag(
            60000,
            [b"q", cbor2.dumps({"pubkey-hash": cbor2.dumps(tree), "nonce": tree, "hfl-lab": tree})],
        )
    )

    for value in (raw or b"\x00", cbor2.dumps(cbor2.CBORTag(60000, tree)), shaped):
        _outcome(value, verifier)


# -- the private key stays in memory ------------------------------------------------------


def _files_under(root: Path, since: float) -> list[Path]:
    found = []
    for path in root.rglob("*"):
        try:
            if path.is_file() and path.stat().st_mtime >= since:
                found.append(path)
        except OSError:
            continue
    return found


def test_private_key_never_reaches_disk(
    provider: SimulatedTdProvider, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    start = time.time() - 1
    identity = RaTlsIdentity()
    identity.make_certificate(provider, subject_cn=ROLE, role=ROLE, challenge=b"x")
    pem = identity.private_key_pem()
    key = serialization.load_pem_private_key(pem, None)
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    der = key.private_bytes(
        serialization.Encoding.DER,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    scalar = key.private_numbers().private_value.to_bytes(32, "big")
    body = b"".join(pem.splitlines()[1:-1])
    roots = [tmp_path, Path(tempfile.gettempdir()), Path(__file__).resolve().parents[1]]

    leaked = [
        p
        for root in roots
        for p in (
            _files_under(root, start)
            if root != roots[2]
            else [q for q in root.iterdir() if q.is_file()]
        )
        if any(s in p.read_bytes() for s in (body, der, scalar))
    ]

    assert leaked == []
    assert os.listdir(tmp_path) == []


def test_identity_repr_and_pickle_reveal_no_key_material(provider: SimulatedTdProvider) -> None:
    identity = RaTlsIdentity()
    identity.make_certificate(provider, subject_cn=ROLE, role=ROLE)
    pem = identity.private_key_pem()
    key = serialization.load_pem_private_key(pem, None)
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    secret_hex = f"{key.private_numbers().private_value:x}"
    body = b"".join(pem.splitlines()[1:-1]).decode()

    texts = [repr(identity), str(identity), f"{identity}"]

    for text in texts:
        assert secret_hex not in text and body[:24] not in text and "PRIVATE" not in text
    assert identity.spki_sha256[:16] in repr(identity)
    with pytest.raises(TypeError, match="cannot be pickled"):
        pickle.dumps(identity)
