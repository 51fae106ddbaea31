"""The mesh CA: short-lived role certificates for attested participants, carrying their evidence."""

from __future__ import annotations

import dataclasses
import datetime as dt
import ipaddress

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID

from hfl_lab._x509 import certificate_builder, common_name
from hfl_lab.ratls import evidence_ext as ext
from hfl_lab.ratls.binding import spki_hash
from hfl_lab.tee.evidence import Evidence

ORG = "HFL-TDX Lab mesh"


class MeshCA:
    """Signs mesh certificates. Its key is made in memory and never leaves this process."""

    def __init__(self, lab_name: str = "hfl-lab") -> None:
        self._key = ec.generate_private_key(ec.SECP256R1())
        now = dt.datetime.now(dt.UTC)
        name = common_name(f"{lab_name} mesh CA", ORG)
        self.certificate = (
            certificate_builder(name, name, self._key.public_key(),
                                now - dt.timedelta(minutes=5), now + dt.timedelta(days=7))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True, content_commitment=False, key_encipherment=False,
                    data_encipherment=False, key_agreement=False, key_cert_sign=True,
                    crl_sign=True, encipher_only=False, decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(
                x509.SubjectKeyIdentifier.from_public_key(self._key.public_key()), False
            )
            .sign(self._key, hashes.SHA256())
        )

    def __repr__(self) -> str:
        return f"MeshCA({self.certificate.subject.rfc4514_string()})"

    def __reduce__(self) -> str:
        raise TypeError("the mesh CA cannot be pickled: its key stays in this process")

    @property
    def certificate_pem(self) -> bytes:
        return self.certificate.public_bytes(serialization.Encoding.PEM)

    def issue(
        self,
        role: str,
        spki: bytes,
        evidence: Evidence,
        nonce: bytes,
        lifetime_s: float,
    ) -> x509.Certificate:
        """A certificate for ``role`` and this key, valid ``lifetime_s``, with the evidence in it.

        The evidence (the quote that bound this key and the service's nonce) rides in the
        interoperable RA-TLS extension, so any peer can re-check it pairwise.
        """
        public_key = serialization.load_der_public_key(spki)
        if not isinstance(public_key, ec.EllipticCurvePublicKey):
            raise TypeError("mesh keys are EC keys")
        # Collateral stays out: peers hold the lab's collateral already, and gRPC's TLS
        # frame protector fails on handshakes with two ~20 KB certificates.
        lean = dataclasses.replace(evidence, collateral_json=None)
        claims = ext.encode_claims(spki_hash(spki), nonce=nonce, lab=ext.lab_claims(lean, role))
        now = dt.datetime.now(dt.UTC)
        return (
            certificate_builder(common_name(role, ORG), self.certificate.subject, public_key,
                                now - dt.timedelta(seconds=30),
                                now + dt.timedelta(seconds=lifetime_s))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(
                x509.ExtendedKeyUsage(
                    [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
                ),
                critical=False,
            )
            .add_extension(
                x509.SubjectAlternativeName(
                    [
                        x509.DNSName(role),
                        x509.DNSName("localhost"),
                        x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
                    ]
                ),
                critical=False,
            )
            .add_extension(
                x509.UnrecognizedExtension(
                    ext.DICE_EVIDENCE_OID, ext.encode_dice_extension(evidence.quote, claims)
                ),
                critical=False,
            )
            .sign(self._key, hashes.SHA256())
        )
