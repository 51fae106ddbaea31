"""The simulated TDX platform: a lab-local PCK chain, quoting enclave and signed collateral.

Quotes it signs have the real v4 layout and pass ``dcap_qvl.verify_with_root_ca`` against the
lab root, with collateral (TCB info, QE identity, CRLs) that this platform signs the way Intel's
PCS does. It is a *simulation*: its keys live in the lab's own processes, so its evidence proves
nothing about hardware. Every name in its chain says so, and the verifier labels it simulated.
"""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import json
import os
from dataclasses import dataclass
from functools import cached_property
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature
from cryptography.x509.oid import NameOID

from hfl_lab._exceptions import AttestationError
from hfl_lab.tee._binary import u16, u32
from hfl_lab.tee.quote import (
    ATT_KEY_ECDSA_P256,
    CERT_PCK_CHAIN,
    CERT_QE_REPORT,
    INTEL_QE_VENDOR_ID,
    TEE_TYPE_TDX,
)
from hfl_lab.tee.reports import EnclaveReport, TdReport10
from hfl_lab.tee.sgx_extension import PckExtension
from hfl_lab.tee.sim import pki

#: TCB status the simulated TD reports, selected by TEE_TCB_SVN[0] against the lab's TCB info
TCB_STATUS_SVN: dict[str, int] = {
    "UpToDate": 7,
    "SWHardeningNeeded": 6,
    "ConfigurationNeeded": 5,
    "ConfigurationAndSWHardeningNeeded": 4,
    "OutOfDate": 3,
    "OutOfDateConfigurationNeeded": 2,
    "Revoked": 1,
}
LAB_ADVISORY = "HFL-LAB-SA-0001"
LAB_FMSPC = bytes.fromhex("00AB1AB00000")
# Quote header user_data: marks simulated quotes inside the signed region itself
SIMULATED_MARKER = b"HFL-LAB-SIMULATED-TD"
_CPU_SVN = bytes([3, 3, 2, 2, 3, 1, 0, 5, 0, 0, 0, 0, 0, 0, 0, 0])
_PCE_SVN = 11
_QE_MR_SIGNER = hashlib.sha256(b"hfl-lab simulated TD quoting enclave signer").digest()
_QE_MR_ENCLAVE = hashlib.sha256(b"hfl-lab simulated TD quoting enclave").digest()
_QE_ISV_SVN = 4
_QE_PROD_ID = 2
#: a joiner's PCK certificate names the one participant (``worker3``) whose evidence its key
#: may sign in its subject's X.520 pseudonym (an attribute every DER parser of the chain reads;
#: dcap-qvl refuses certificates with large private OIDs)
SLOT_ATTRIBUTE = NameOID.PSEUDONYM
_KEY_NAMES = ("root", "pck_ca", "pck", "tcb_signing", "attestation")


def _raw_signature(key: ec.EllipticCurvePrivateKey, data: bytes) -> bytes:
    """ECDSA-P256/SHA-256 as the 64-byte r||s that DCAP structures carry."""
    r, s = decode_dss_signature(key.sign(data, ec.ECDSA(hashes.SHA256())))
    return r.to_bytes(32, "big") + s.to_bytes(32, "big")


def _raw_public_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    point = key.public_key().public_bytes(
        serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint
    )
    return point[1:]


def _iso(t: dt.datetime) -> str:
    return t.strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclass(frozen=True)
class _Keys:
    """The platform's private keys. A slot's platform (:meth:`SimulatedPlatform.for_slot`)
    holds only its own ``pck`` and ``attestation`` keys: the CA and collateral keys stay with
    the host."""

    root: ec.EllipticCurvePrivateKey | None
    pck_ca: ec.EllipticCurvePrivateKey | None
    pck: ec.EllipticCurvePrivateKey
    tcb_signing: ec.EllipticCurvePrivateKey | None
    attestation: ec.EllipticCurvePrivateKey

    @classmethod
    def generate(cls) -> _Keys:
        return cls(*(ec.generate_private_key(ec.SECP256R1()) for _ in range(5)))


def _ca_key(key: ec.EllipticCurvePrivateKey | None) -> ec.EllipticCurvePrivateKey:
    if key is None:
        raise AttestationError(
            "this simulated platform is a joiner's: it holds only its own slot's signing keys, "
            "not the lab's CA or collateral keys.",
            fix="certificates, CRLs and collateral come from the host's platform.")
    return key


def slot_of(pck_cert: x509.Certificate) -> str | None:
    """The participant a joiner's PCK certificate is restricted to (None: unrestricted)."""
    values = pck_cert.subject.get_attributes_for_oid(SLOT_ATTRIBUTE)
    if not values:
        return None
    # more than one: never a certificate the lab issued; bind it to a name no role has
    return str(values[0].value) if len(values) == 1 else "(several slots)"


class SimulatedPlatform:
    """One simulated TDX machine: its PKI, its quoting enclave and its collateral."""

    def __init__(
        self, keys: _Keys, created_at: int, validity_days: int, ppid: bytes, qe_auth: bytes,
        *, host: SimulatedPlatform | None = None, slot: str | None = None,
    ) -> None:
        self._keys = keys
        #: the one participant this platform's evidence may be accepted for (a joiner's)
        self.slot = slot
        self.created_at = created_at
        self.validity_days = validity_days
        self._ppid = ppid
        self._qe_auth = qe_auth
        start = dt.datetime.fromtimestamp(created_at - 3600, dt.UTC)
        end = dt.datetime.fromtimestamp(created_at + validity_days * 86400, dt.UTC)
        self.not_before, self.not_after = start, end
        certs_until = end + dt.timedelta(days=365)
        if host is not None:
            self._init_slot(host, keys, slot or "", (start, certs_until))
            return
        root_key, pck_ca_key = _ca_key(keys.root), _ca_key(keys.pck_ca)
        tcb_key = _ca_key(keys.tcb_signing)
        self.root_cert = pki.ca_certificate(
            "HFL Lab SIMULATED SGX Root CA", root_key, None, root_key, (start, certs_until), 1
        )
        self.pck_ca_cert = pki.ca_certificate(
            "HFL Lab SIMULATED SGX PCK Platform CA",
            pck_ca_key,
            self.root_cert,
            root_key,
            (start, certs_until),
            0,
        )
        self.pck_extension = PckExtension(
            ppid=ppid, cpu_svn=_CPU_SVN, pce_svn=_PCE_SVN, pce_id=b"\x00\x00", fmspc=LAB_FMSPC
        )
        self.pck_cert = pki.leaf_certificate(
            "HFL Lab SIMULATED SGX PCK Certificate",
            keys.pck.public_key(),
            self.pck_ca_cert,
            pck_ca_key,
            (start, certs_until),
            self.pck_extension,
        )
        self.tcb_signing_cert = pki.leaf_certificate(
            "HFL Lab SIMULATED SGX TCB Signing",
            tcb_key.public_key(),
            self.root_cert,
            root_key,
            (start, certs_until),
        )
        self._collateral: str | None = None

    def _init_slot(self, host: SimulatedPlatform, keys: _Keys, slot: str,
                   validity: tuple[dt.datetime, dt.datetime]) -> None:
        """A joiner's platform: the host's chain and collateral, a PCK certificate of its own
        that names the one participant it may attest as."""
        self.root_cert, self.pck_ca_cert = host.root_cert, host.pck_ca_cert
        self.tcb_signing_cert = host.tcb_signing_cert
        self.pck_extension = PckExtension(ppid=self._ppid, cpu_svn=_CPU_SVN, pce_svn=_PCE_SVN,
                                          pce_id=b"\x00\x00", fmspc=LAB_FMSPC)
        self.pck_cert = pki.leaf_certificate(
            f"HFL Lab SIMULATED SGX PCK Certificate ({slot} only)",
            keys.pck.public_key(),
            self.pck_ca_cert,
            _ca_key(host._keys.pck_ca),
            validity,
            self.pck_extension,
            pseudonym=slot,
        )
        self._collateral = host.collateral_json

    def for_slot(self, slot: str) -> SimulatedPlatform:
        """A platform for one joiner (issue 23): fresh PCK and attestation keys under this
        platform's PCK CA, its certificate restricted to ``slot``; it can sign evidence that
        verifiers accept for ``slot`` alone, and holds none of this platform's CA keys."""
        if not slot.isascii() or not slot.isprintable() or not 0 < len(slot) <= 64:
            raise AttestationError(f"a slot name is 1-64 printable ASCII characters: {slot!r}")
        pck, attestation = (ec.generate_private_key(ec.SECP256R1()) for _ in range(2))
        keys = _Keys(root=None, pck_ca=None, pck=pck, tcb_signing=None, attestation=attestation)
        return SimulatedPlatform(keys, self.created_at, self.validity_days, os.urandom(16),
                                 os.urandom(32), host=self, slot=slot)

    @classmethod
    def generate(cls, *, now: int | None = None, validity_days: int = 30) -> SimulatedPlatform:
        created = int(now if now is not None else dt.datetime.now(dt.UTC).timestamp())
        return cls(_Keys.generate(), created, validity_days, os.urandom(16), os.urandom(32))

    # -- public material ---------------------------------------------------------------------

    @property
    def root_der(self) -> bytes:
        return self.root_cert.public_bytes(serialization.Encoding.DER)

    @property
    def validity_window(self) -> tuple[int, int]:
        return int(self.not_before.timestamp()), int(self.not_after.timestamp())

    @cached_property
    def collateral_json(self) -> str:
        """Collateral in ``dcap_qvl.QuoteCollateralV3.from_json`` form, signed by this lab."""
        if self._collateral is not None:
            return self._collateral
        window = (self.not_before, self.not_after)
        root_crl = pki.empty_crl(self.root_cert, _ca_key(self._keys.root), window)
        pck_crl = pki.empty_crl(self.pck_ca_cert, _ca_key(self._keys.pck_ca), window)
        tcb_info = json.dumps(self._tcb_info(), separators=(",", ":"))
        qe_identity = json.dumps(self._qe_identity(), separators=(",", ":"))
        tcb_chain = self._pem(self.tcb_signing_cert) + self._pem(self.root_cert)
        return json.dumps(
            {
                "pck_crl_issuer_chain": self._pem(self.pck_ca_cert) + self._pem(self.root_cert),
                "root_ca_crl": root_crl.public_bytes(serialization.Encoding.DER).hex(),
                "pck_crl": pck_crl.public_bytes(serialization.Encoding.DER).hex(),
                "tcb_info_issuer_chain": tcb_chain,
                "tcb_info": tcb_info,
                "tcb_info_signature": _raw_signature(
                    _ca_key(self._keys.tcb_signing), tcb_info.encode()
                ).hex(),
                "qe_identity_issuer_chain": tcb_chain,
                "qe_identity": qe_identity,
                "qe_identity_signature": _raw_signature(
                    _ca_key(self._keys.tcb_signing), qe_identity.encode()
                ).hex(),
            }
        )

    @staticmethod
    def _pem(cert: x509.Certificate) -> str:
        return cert.public_bytes(serialization.Encoding.PEM).decode()

    def _tcb_info(self) -> dict[str, Any]:
        sgx = [{"svn": svn} for svn in _CPU_SVN]
        levels = []
        for status, svn in TCB_STATUS_SVN.items():
            level: dict[str, Any] = {
                "tcb": {
                    "sgxtcbcomponents": sgx,
                    "pcesvn": _PCE_SVN,
                    "tdxtcbcomponents": [{"svn": svn}] + [{"svn": 0}] * 15,
                },
                "tcbDate": _iso(self.not_before),
                "tcbStatus": status,
            }
            if status != "UpToDate":
                level["advisoryIDs"] = [LAB_ADVISORY]
            levels.append(level)
        return {
            "id": "TDX",
            "version": 3,
            "issueDate": _iso(self.not_before),
            "nextUpdate": _iso(self.not_after),
            "fmspc": LAB_FMSPC.hex().upper(),
            "pceId": "0000",
            "tcbType": 0,
            "tcbEvaluationDataNumber": 1,
            "tdxModule": {
                "mrsigner": "00" * 48,
                "attributes": "0000000000000000",
                "attributesMask": "FFFFFFFFFFFFFFFF",
            },
            "tdxModuleIdentities": [],
            "tcbLevels": levels,
        }

    def _qe_identity(self) -> dict[str, Any]:
        return {
            "id": "TD_QE",
            "version": 2,
            "issueDate": _iso(self.not_before),
            "nextUpdate": _iso(self.not_after),
            "tcbEvaluationDataNumber": 1,
            "miscselect": "00000000",
            "miscselectMask": "FFFFFFFF",
            "attributes": "11000000000000000000000000000000",
            "attributesMask": "FBFFFFFFFFFFFFFF0000000000000000",
            "mrsigner": _QE_MR_SIGNER.hex().upper(),
            "isvprodid": _QE_PROD_ID,
            "tcbLevels": [
                {
                    "tcb": {"isvsvn": _QE_ISV_SVN},
                    "tcbDate": _iso(self.not_before),
                    "tcbStatus": "UpToDate",
                }
            ],
        }

    # -- the quoting enclave ---------------------------------------------------------------

    @cached_property
    def _qe_certification(self) -> bytes:
        """Type-6 certification data: QE report signed by the PCK key, auth data, PCK chain."""
        att_key = _raw_public_key(self._keys.attestation)
        qe_report = EnclaveReport(
            cpu_svn=_CPU_SVN,
            misc_select=bytes(4),
            reserved1=bytes(28),
            attributes=bytes([0x11]) + bytes(15),
            mr_enclave=_QE_MR_ENCLAVE,
            reserved2=bytes(32),
            mr_signer=_QE_MR_SIGNER,
            reserved3=bytes(96),
            isv_prod_id=u16(_QE_PROD_ID),
            isv_svn=u16(_QE_ISV_SVN),
            reserved4=bytes(60),
            report_data=hashlib.sha256(att_key + self._qe_auth).digest() + bytes(32),
        ).to_bytes()
        chain = (
            self._pem(self.pck_cert) + self._pem(self.pck_ca_cert) + self._pem(self.root_cert)
        ).encode()
        return (
            qe_report
            + _raw_signature(self._keys.pck, qe_report)
            + u16(len(self._qe_auth))
            + self._qe_auth
            + u16(CERT_PCK_CHAIN)
            + u32(len(chain))
            + chain
        )

    def sign_quote(self, body: TdReport10) -> bytes:
        """A TDX quote v4 over ``body``, signed by the attestation key this QE certifies."""
        if len(body.to_bytes()) != TdReport10.size():
            raise AttestationError("the simulated TD only emits TDX 1.0 bodies (quote v4)")
        header = (
            u16(4)
            + u16(ATT_KEY_ECDSA_P256)
            + u32(TEE_TYPE_TDX)
            + u16(0)
            + u16(0)
            + INTEL_QE_VENDOR_ID  # dcap-qvl accepts only Intel's QE vendor id
            + SIMULATED_MARKER
        )
        signed = header + body.to_bytes()
        cert = self._qe_certification
        sig_data = (
            _raw_signature(self._keys.attestation, signed)
            + _raw_public_key(self._keys.attestation)
            + u16(CERT_QE_REPORT)
            + u32(len(cert))
            + cert
        )
        return signed + u32(len(sig_data)) + sig_data

    # -- handing the platform to child processes (never to disk) ---------------------------

    def export_secret(self) -> bytes:
        """The platform's private state, for a child process over an inherited pipe (a
        joiner's platform exports its own two keys, its slot and the host's collateral)."""
        keys = {
            name: base64.b64encode(
                key.private_bytes(
                    serialization.Encoding.DER,
                    serialization.PrivateFormat.PKCS8,
                    serialization.NoEncryption(),
                )
            ).decode()
            for name in _KEY_NAMES
            if (key := getattr(self._keys, name)) is not None
        }
        blob: dict[str, Any] = {
            "keys": keys,
            "created_at": self.created_at,
            "validity_days": self.validity_days,
            "ppid": self._ppid.hex(),
            "qe_auth": self._qe_auth.hex(),
            "certs": {
                n: self._pem(getattr(self, n))
                for n in ("root_cert", "pck_ca_cert", "pck_cert", "tcb_signing_cert")
            },
        }
        if self.slot is not None:
            blob["slot"] = self.slot
            blob["collateral"] = self.collateral_json
        return json.dumps(blob).encode()

    @classmethod
    def from_secret(cls, blob: bytes) -> SimulatedPlatform:
        try:
            d = json.loads(blob)
            loaded = {
                n: serialization.load_der_private_key(base64.b64decode(d["keys"][n]), None)
                for n in _KEY_NAMES if n in d["keys"]
            }
            keys = _Keys(**{n: loaded.get(n) for n in _KEY_NAMES})  # type: ignore[arg-type]
            if not all(isinstance(k, ec.EllipticCurvePrivateKey) for k in loaded.values()) \
                    or keys.pck is None or keys.attestation is None:
                raise TypeError("not the platform's EC keys")
            slot = d.get("slot")
            if slot is None and len(loaded) != len(_KEY_NAMES):
                raise KeyError("keys")
            certs = {n: x509.load_pem_x509_certificate(pem.encode())
                     for n, pem in d["certs"].items()}
            created, days = int(d["created_at"]), int(d["validity_days"])
            ppid, qe_auth = bytes.fromhex(d["ppid"]), bytes.fromhex(d["qe_auth"])
            collateral = str(d["collateral"]) if slot is not None else None
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise AttestationError(
                f"the simulated platform handed to this process is unreadable ({type(e).__name__})",
                fix="start participants through the lab backend, which passes it on a pipe",
            ) from None
        if slot is None:
            platform = cls(keys, created, days, ppid, qe_auth)
        else:
            platform = cls.__new__(cls)
            platform._restore_slot(keys, created, days, ppid, qe_auth, str(slot), collateral)
        # Certificates carry random serials: keep the originals so every process presents
        # the same chain.
        for n, cert in certs.items():
            setattr(platform, n, cert)
        return platform

    def _restore_slot(self, keys: _Keys, created_at: int, validity_days: int, ppid: bytes,
                      qe_auth: bytes, slot: str, collateral: str | None) -> None:
        """A joiner's platform read back: the certificates are set by the caller."""
        self._keys, self.slot = keys, slot
        self.created_at, self.validity_days = created_at, validity_days
        self._ppid, self._qe_auth = ppid, qe_auth
        start = dt.datetime.fromtimestamp(created_at - 3600, dt.UTC)
        end = dt.datetime.fromtimestamp(created_at + validity_days * 86400, dt.UTC)
        self.not_before, self.not_after = start, end
        self.pck_extension = PckExtension(ppid=ppid, cpu_svn=_CPU_SVN, pce_svn=_PCE_SVN,
                                          pce_id=b"\x00\x00", fmspc=LAB_FMSPC)
        self._collateral = collateral
