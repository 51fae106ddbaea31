"""Intel's SGX extension of PCK certificates (OID 1.2.840.113741.1.13.1): read and build."""

from __future__ import annotations

from dataclasses import dataclass

from cryptography import x509

SGX_EXTENSION_OID = x509.ObjectIdentifier("1.2.840.113741.1.13.1")
_BASE = "1.2.840.113741.1.13.1"


# Minimal DER (X.690) for the handful of types this extension uses.
def _length(n: int) -> bytes:
    if n < 0x80:
        return bytes([n])
    raw = n.to_bytes((n.bit_length() + 7) // 8, "big")
    return bytes([0x80 | len(raw)]) + raw


def _tlv(tag: int, value: bytes) -> bytes:
    return bytes([tag]) + _length(len(value)) + value


def _oid(dotted: str) -> bytes:
    parts = [int(p) for p in dotted.split(".")]
    body = bytearray([parts[0] * 40 + parts[1]])
    for p in parts[2:]:
        chunk = [p & 0x7F]
        p >>= 7
        while p:
            chunk.append(0x80 | (p & 0x7F))
            p >>= 7
        body.extend(reversed(chunk))
    return _tlv(0x06, bytes(body))


def _int(value: int) -> bytes:
    raw = value.to_bytes(max(1, (value.bit_length() + 8) // 8), "big")
    return _tlv(0x02, raw)


def _decode(data: bytes) -> list[tuple[int, bytes]]:
    """Split concatenated DER TLVs into (tag, value) pairs; raises ValueError on bad input."""
    out = []
    i = 0
    while i < len(data):
        if i + 2 > len(data):
            raise ValueError("truncated DER")
        tag, first = data[i], data[i + 1]
        i += 2
        if first & 0x80:
            n = first & 0x7F
            if n == 0 or n > 4 or i + n > len(data):
                raise ValueError("bad DER length")
            length = int.from_bytes(data[i : i + n], "big")
            i += n
        else:
            length = first
        if i + length > len(data):
            raise ValueError("DER value runs past the end")
        out.append((tag, data[i : i + length]))
        i += length
    return out


def _oid_str(value: bytes) -> str:
    if not value:
        raise ValueError("empty OID")
    first = value[0]
    parts = [min(first // 40, 2), first - 40 * min(first // 40, 2)]
    acc = 0
    for b in value[1:]:
        acc = (acc << 7) | (b & 0x7F)
        if not b & 0x80:
            parts.append(acc)
            acc = 0
    return ".".join(str(p) for p in parts)


@dataclass(frozen=True)
class PckExtension:
    """The platform facts Intel's PCK certificate vouches for."""

    ppid: bytes
    cpu_svn: bytes  # 16 TCB component SVNs
    pce_svn: int
    pce_id: bytes
    fmspc: bytes
    sgx_type: int = 0  # 0 = Standard

    def to_der(self) -> bytes:
        tcb = b"".join(
            _tlv(0x30, _oid(f"{_BASE}.2.{i + 1}") + _int(svn)) for i, svn in enumerate(self.cpu_svn)
        )
        tcb += _tlv(0x30, _oid(f"{_BASE}.2.17") + _int(self.pce_svn))
        tcb += _tlv(0x30, _oid(f"{_BASE}.2.18") + _tlv(0x04, self.cpu_svn))
        items = [
            _tlv(0x30, _oid(f"{_BASE}.1") + _tlv(0x04, self.ppid)),
            _tlv(0x30, _oid(f"{_BASE}.2") + _tlv(0x30, tcb)),
            _tlv(0x30, _oid(f"{_BASE}.3") + _tlv(0x04, self.pce_id)),
            _tlv(0x30, _oid(f"{_BASE}.4") + _tlv(0x04, self.fmspc)),
            _tlv(0x30, _oid(f"{_BASE}.5") + _tlv(0x0A, bytes([self.sgx_type]))),
        ]
        return _tlv(0x30, b"".join(items))

    @classmethod
    def from_der(cls, der: bytes) -> PckExtension:
        (tag, seq), *_ = _decode(der)
        if tag != 0x30:
            raise ValueError("SGX extension is not a SEQUENCE")
        values: dict[str, bytes] = {}
        for _, item in _decode(seq):
            (_, oid), (vtag, value) = _decode(item)[:2]
            name = _oid_str(oid)
            if name == f"{_BASE}.2" and vtag == 0x30:
                for _, comp in _decode(value):
                    (_, coid), (_, cval) = _decode(comp)[:2]
                    values[_oid_str(coid)] = cval
            else:
                values[name] = value
        return cls(
            ppid=values[f"{_BASE}.1"],
            cpu_svn=values[f"{_BASE}.2.18"],
            pce_svn=int.from_bytes(values[f"{_BASE}.2.17"], "big"),
            pce_id=values[f"{_BASE}.3"],
            fmspc=values[f"{_BASE}.4"],
            sgx_type=int.from_bytes(values.get(f"{_BASE}.5", b"\x00"), "big"),
        )


def read_pck_extension(cert: x509.Certificate) -> PckExtension | None:
    """The SGX extension of a PCK certificate, or None when absent or unreadable."""
    try:
        ext = cert.extensions.get_extension_for_oid(SGX_EXTENSION_OID)
    except x509.ExtensionNotFound:
        return None
    value = ext.value
    raw = value.value if isinstance(value, x509.UnrecognizedExtension) else b""
    try:
        return PckExtension.from_der(raw)
    except (ValueError, KeyError):
        return None
