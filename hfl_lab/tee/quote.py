"""TDX (and SGX) DCAP quotes v3/v4/v5 as typed objects that serialize back to identical bytes."""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from typing import Any

from cryptography import x509

from hfl_lab._exceptions import QuoteFormatError
from hfl_lab.tee._binary import Reader, u16, u32
from hfl_lab.tee.reports import EnclaveReport, TdReport10, TdReport15
from hfl_lab.tee.sgx_extension import read_pck_extension

TEE_TYPE_SGX = 0x00000000
TEE_TYPE_TDX = 0x00000081
ATT_KEY_ECDSA_P256 = 2
INTEL_QE_VENDOR_ID = bytes.fromhex("939a7233f79c4ca9940a0db3957f0607")
HEADER_SIZE = 48
# DCAP quote v5 body types (Intel TDX DCAP Quoting Library API, A.4.2)
BODY_SGX, BODY_TD10, BODY_TD15 = 1, 2, 3
CERT_PCK_CHAIN = 5
CERT_QE_REPORT = 6


@dataclass(frozen=True)
class QuoteHeader:
    """The 48-byte quote header (A.3.1)."""

    version: int
    att_key_type: int
    tee_type: int
    qe_svn: int  # "reserved" in TDX quotes
    pce_svn: int  # "reserved" in TDX quotes
    qe_vendor_id: bytes
    user_data: bytes

    @classmethod
    def read(cls, r: Reader) -> QuoteHeader:
        version = r.u16("header.version")
        if version not in (3, 4, 5):
            raise QuoteFormatError(
                f"unsupported quote version {version} (expected 3, 4 or 5)",
                field="header.version",
                offset=0,
            )
        att_key_type = r.u16("header.att_key_type")
        if att_key_type != ATT_KEY_ECDSA_P256:
            raise QuoteFormatError(
                f"attestation key type {att_key_type} is not ECDSA-P256 (2)",
                field="header.att_key_type",
                offset=2,
            )
        tee_type = r.u32("header.tee_type")
        if tee_type not in (TEE_TYPE_SGX, TEE_TYPE_TDX):
            raise QuoteFormatError(
                f"unknown TEE type 0x{tee_type:08x} (expected 0x81 TDX or 0x00 SGX)",
                field="header.tee_type",
                offset=4,
            )
        return cls(
            version=version,
            att_key_type=att_key_type,
            tee_type=tee_type,
            qe_svn=r.u16("header.qe_svn"),
            pce_svn=r.u16("header.pce_svn"),
            qe_vendor_id=r.take(16, "header.qe_vendor_id"),
            user_data=r.take(20, "header.user_data"),
        )

    def to_bytes(self) -> bytes:
        return (
            u16(self.version)
            + u16(self.att_key_type)
            + u32(self.tee_type)
            + u16(self.qe_svn)
            + u16(self.pce_svn)
            + self.qe_vendor_id
            + self.user_data
        )

    @property
    def is_tdx(self) -> bool:
        return self.tee_type == TEE_TYPE_TDX

    def to_dict(self) -> dict[str, Any]:
        return {
            "version": self.version,
            "att_key_type": self.att_key_type,
            "tee_type": f"0x{self.tee_type:08x}",
            "qe_svn": self.qe_svn,
            "pce_svn": self.pce_svn,
            "qe_vendor_id": self.qe_vendor_id.hex(),
            "user_data": self.user_data.hex(),
        }


@dataclass(frozen=True)
class CertificationData:
    """A certification data block: type, then type-specific bytes."""

    cert_type: int
    data: bytes

    @classmethod
    def read(cls, r: Reader, field: str) -> CertificationData:
        cert_type = r.u16(f"{field}.type")
        size = r.u32(f"{field}.size")
        return cls(cert_type, r.take(size, f"{field}.data"))

    def to_bytes(self) -> bytes:
        return u16(self.cert_type) + u32(len(self.data)) + self.data

    def pem_certificates(self) -> list[bytes]:
        """The PEM blocks of a type-5 PCK chain (leaf first), without trailing NULs."""
        if self.cert_type != CERT_PCK_CHAIN:
            return []
        return re.findall(
            rb"-----BEGIN CERTIFICATE-----.+?-----END CERTIFICATE-----", self.data, re.DOTALL
        )


@dataclass(frozen=True)
class QeReportCertificationData:
    """Type-6 certification data: the QE report, its PCK signature, QE auth data, PCK chain."""

    qe_report: EnclaveReport
    qe_report_signature: bytes
    qe_auth_data: bytes
    pck: CertificationData

    @classmethod
    def parse(cls, data: bytes, base: int) -> QeReportCertificationData:
        r = Reader(data, 0)
        try:
            qe_report = EnclaveReport.read(r, "signature.qe_report")
            sig = r.take(64, "signature.qe_report_signature")
            auth_size = r.u16("signature.qe_auth_data.size")
            auth = r.take(auth_size, "signature.qe_auth_data")
            pck = CertificationData.read(r, "signature.pck_cert_data")
        except QuoteFormatError as e:
            raise QuoteFormatError(
                e.message.removeprefix("malformed quote: ").rsplit(" (field", 1)[0],
                field=e.field,
                offset=base + e.offset,
            ) from None
        if r.remaining:
            raise QuoteFormatError(
                f"{r.remaining} unexplained bytes after the PCK certification data",
                field="signature.cert_data.size",
                offset=base + r.offset,
            )
        return cls(qe_report, sig, auth, pck)

    def to_bytes(self) -> bytes:
        return (
            self.qe_report.to_bytes()
            + self.qe_report_signature
            + u16(len(self.qe_auth_data))
            + self.qe_auth_data
            + self.pck.to_bytes()
        )


@dataclass(frozen=True)
class QuoteSignatureData:
    """ECDSA quote signature data: signature over header+body, attestation key, certification."""

    signature: bytes
    attestation_key: bytes
    certification: CertificationData  # for v3 (SGX) quotes: the PCK certification data
    qe: QeReportCertificationData | None
    v3_layout: bool = False  # v3 inlines the QE report; v4/v5 wrap it in type-6 cert data

    @property
    def pck_chain_pem(self) -> list[bytes]:
        cert = self.qe.pck if self.qe is not None else self.certification
        return cert.pem_certificates()

    def pck_certificates(self) -> list[x509.Certificate]:
        certs = []
        for i, pem in enumerate(self.pck_chain_pem):
            try:
                certs.append(x509.load_pem_x509_certificate(pem))
            except (ValueError, x509.InvalidVersion) as e:  # a damaged chain in a quote
                raise QuoteFormatError(
                    f"PCK certificate #{i} in the chain is not a valid X.509 certificate ({e})",
                    field="signature.pck_cert_data",
                    offset=0,
                ) from None
        return certs

    def to_bytes(self) -> bytes:
        if self.v3_layout and self.qe is not None:
            return self.signature + self.attestation_key + self.qe.to_bytes()
        return self.signature + self.attestation_key + self.certification.to_bytes()


@dataclass(frozen=True)
class Quote:
    """A parsed DCAP quote. ``to_bytes()`` returns exactly the bytes it was parsed from."""

    header: QuoteHeader
    body_type: int  # BODY_SGX / BODY_TD10 / BODY_TD15 (implied for v3/v4)
    body: TdReport10 | EnclaveReport
    signature_data: QuoteSignatureData
    trailing: bytes = b""

    @classmethod
    def parse(cls, data: bytes) -> Quote:
        if not isinstance(data, bytes | bytearray | memoryview):
            raise QuoteFormatError("a quote must be bytes", field="quote", offset=0)
        data = bytes(data)
        r = Reader(data)
        header = QuoteHeader.read(r)
        if header.is_tdx and header.version == 3:
            raise QuoteFormatError(
                "a TDX quote must be version 4 or 5, not 3", field="header.version", offset=0
            )
        if not header.is_tdx and header.version != 3:
            raise QuoteFormatError(
                f"an SGX quote must be version 3, not {header.version}",
                field="header.version",
                offset=0,
            )
        body_type, body = cls._read_body(r, header)
        sig_offset = r.offset
        sig_len = r.u32("signature_data_len")
        sig = Reader(data, r.offset, r.offset + sig_len)
        if sig_len > r.remaining:
            raise QuoteFormatError(
                f"signature data length {sig_len} exceeds the {r.remaining} bytes left",
                field="signature_data_len",
                offset=sig_offset,
            )
        signature = sig.take(64, "signature.ecdsa_signature")
        att_key = sig.take(64, "signature.attestation_key")
        cert_offset = sig.offset
        if header.version == 3:
            # SGX quote v3: QE report, its signature and auth data sit inline before cert data
            qe = QeReportCertificationData.parse(sig.take(sig.remaining, "signature"), cert_offset)
            signature_data = QuoteSignatureData(signature, att_key, qe.pck, qe, v3_layout=True)
        else:
            certification = CertificationData.read(sig, "signature.cert_data")
            if sig.remaining:
                raise QuoteFormatError(
                    f"certification data leaves {sig.remaining} declared signature bytes unused",
                    field="signature.cert_data.size",
                    offset=cert_offset + 2,
                )
            if certification.cert_type != CERT_QE_REPORT:
                raise QuoteFormatError(
                    f"TDX quotes carry certification data type 6, not {certification.cert_type}",
                    field="signature.cert_data.type",
                    offset=cert_offset,
                )
            qe = QeReportCertificationData.parse(certification.data, cert_offset + 6)
            signature_data = QuoteSignatureData(signature, att_key, certification, qe)
        trailing = data[sig.end :]
        return cls(header, body_type, body, signature_data, trailing)

    @staticmethod
    def _read_body(r: Reader, header: QuoteHeader) -> tuple[int, TdReport10 | EnclaveReport]:
        if not header.is_tdx:
            return BODY_SGX, EnclaveReport.read(r, "body")
        if header.version == 4:
            return BODY_TD10, TdReport10.read(r, "body")
        body_type = r.u16("body_type")
        size = r.u32("body_size")
        expected = {BODY_TD10: TdReport10.size(), BODY_TD15: TdReport15.size()}
        if body_type not in expected:
            raise QuoteFormatError(
                f"unknown v5 body type {body_type} (expected 2 = TDX 1.0 or 3 = TDX 1.5)",
                field="body_type",
                offset=HEADER_SIZE,
            )
        if size != expected[body_type]:
            raise QuoteFormatError(
                f"body size {size} does not match body type {body_type} "
                f"({expected[body_type]} bytes)",
                field="body_size",
                offset=HEADER_SIZE + 2,
            )
        cls = TdReport15 if body_type == BODY_TD15 else TdReport10
        return body_type, cls.read(r, "body")

    # -- serialization ---------------------------------------------------------------------

    def signed_bytes(self) -> bytes:
        """Header and body as signed by the attestation key (v5 includes type and size)."""
        body = self.body.to_bytes()
        if self.header.version == 5:
            body = u16(self.body_type) + u32(len(body)) + body
        return self.header.to_bytes() + body

    def to_bytes(self) -> bytes:
        sig = self.signature_data.to_bytes()
        return self.signed_bytes() + u32(len(sig)) + sig + self.trailing

    # -- convenience -----------------------------------------------------------------------

    @property
    def is_tdx(self) -> bool:
        return self.header.is_tdx

    @property
    def td_report(self) -> TdReport10:
        if not isinstance(self.body, TdReport10):
            raise QuoteFormatError("not a TDX quote: it has no TD report", field="body", offset=48)
        return self.body

    @property
    def report_data(self) -> bytes:
        return self.body.report_data

    def digest(self) -> str:
        """SHA-256 of the quote without trailing padding: a short, stable evidence id."""
        return hashlib.sha256(self.signed_bytes()).hexdigest()

    def fmspc(self) -> str | None:
        """The FMSPC from the PCK leaf's Intel SGX extension, when the chain is present."""
        certs = self.signature_data.pck_certificates()
        if not certs:
            return None
        ext = read_pck_extension(certs[0])
        return ext.fmspc.hex().upper() if ext is not None else None

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "header": self.header.to_dict(),
            "body_type": self.body_type,
            "body": self.body.to_dict(),
        }
        qe = self.signature_data.qe
        if qe is not None:
            out["qe_report"] = qe.qe_report.to_dict()
        out["trailing_bytes"] = len(self.trailing)
        return out


def parse_quote(data: bytes) -> Quote:
    """Parse a DCAP quote; raises ``QuoteFormatError`` naming the field and offset."""
    return Quote.parse(data)
