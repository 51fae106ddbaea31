"""RA-TLS: certificates whose TDX evidence binds their own key, and reading them from peers."""

from hfl_lab.ratls.binding import key_binding, spki_der
from hfl_lab.ratls.certificate import (
    EmbeddedEvidence,
    RaTlsIdentity,
    decode_certificate,
    load_certificate,
    read_evidence,
    verify_certificate,
)
from hfl_lab.ratls.peer import fetch_server_certificate

__all__ = [
    "EmbeddedEvidence",
    "RaTlsIdentity",
    "decode_certificate",
    "fetch_server_certificate",
    "key_binding",
    "load_certificate",
    "read_evidence",
    "spki_der",
    "verify_certificate",
]
