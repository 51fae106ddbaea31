"""Fixed-layout report bodies: TD report 1.0/1.5, SGX enclave report, and the 1024-byte TDREPORT."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, ClassVar, Self

from hfl_lab._exceptions import QuoteFormatError
from hfl_lab.tee._binary import Reader

# Intel TDX DCAP Quoting Library API, appendix A.3.2 "TD Quote Body" (TDX 1.0, 584 bytes)
TD10_LAYOUT: tuple[tuple[str, int], ...] = (
    ("tee_tcb_svn", 16),
    ("mr_seam", 48),
    ("mr_signer_seam", 48),
    ("seam_attributes", 8),
    ("td_attributes", 8),
    ("xfam", 8),
    ("mr_td", 48),
    ("mr_config_id", 48),
    ("mr_owner", 48),
    ("mr_owner_config", 48),
    ("rtmr0", 48),
    ("rtmr1", 48),
    ("rtmr2", 48),
    ("rtmr3", 48),
    ("report_data", 64),
)
# Same document, A.4.2 (quote v5): a TDX 1.5 body appends these two fields (648 bytes)
TD15_EXTRA: tuple[tuple[str, int], ...] = (("tee_tcb_svn2", 16), ("mr_servicetd", 48))

# Intel SGX DCAP Quote format, "Enclave Report Body" (384 bytes); the QE report uses it too
ENCLAVE_LAYOUT: tuple[tuple[str, int], ...] = (
    ("cpu_svn", 16),
    ("misc_select", 4),
    ("reserved1", 28),
    ("attributes", 16),
    ("mr_enclave", 32),
    ("reserved2", 32),
    ("mr_signer", 32),
    ("reserved3", 96),
    ("isv_prod_id", 2),
    ("isv_svn", 2),
    ("reserved4", 60),
    ("report_data", 64),
)

# Intel TDX Module ABI spec, TDREPORT_STRUCT (1024 bytes) = REPORTMACSTRUCT (256) +
# TEE_TCB_INFO (239) + reserved (17) + TDINFO_STRUCT (512)
TDREPORT_LAYOUT: tuple[tuple[str, int], ...] = (
    ("report_type", 4),
    ("reserved_mac1", 12),
    ("cpu_svn", 16),
    ("tee_tcb_info_hash", 48),
    ("tee_info_hash", 48),
    ("report_data", 64),
    ("reserved_mac2", 32),
    ("mac", 32),
    ("tcb_info_valid", 8),
    ("tee_tcb_svn", 16),
    ("mr_seam", 48),
    ("mr_signer_seam", 48),
    ("seam_attributes", 8),
    ("tee_tcb_svn2", 16),
    ("reserved_tcb", 95),
    ("reserved", 17),
    ("td_attributes", 8),
    ("xfam", 8),
    ("mr_td", 48),
    ("mr_config_id", 48),
    ("mr_owner", 48),
    ("mr_owner_config", 48),
    ("rtmr0", 48),
    ("rtmr1", 48),
    ("rtmr2", 48),
    ("rtmr3", 48),
    ("servtd_hash", 48),
    ("reserved_td", 64),
)


class _Layout:
    """Mixin for dataclasses whose fields are consecutive byte strings of fixed size."""

    LAYOUT: ClassVar[tuple[tuple[str, int], ...]]

    @classmethod
    def size(cls) -> int:
        return sum(n for _, n in cls.LAYOUT)

    @classmethod
    def read(cls, reader: Reader, prefix: str) -> Self:
        values = {name: reader.take(n, f"{prefix}.{name}") for name, n in cls.LAYOUT}
        return cls(**values)

    def to_bytes(self) -> bytes:
        return b"".join(getattr(self, name) for name, _ in self.LAYOUT)

    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name).hex() for f in dataclasses.fields(self)}  # type: ignore[arg-type]


@dataclass(frozen=True)
class TdReport10(_Layout):
    """The TD report body of a TDX 1.0 quote: measurements and attributes of the TD."""

    LAYOUT: ClassVar[tuple[tuple[str, int], ...]] = TD10_LAYOUT
    tee_tcb_svn: bytes
    mr_seam: bytes
    mr_signer_seam: bytes
    seam_attributes: bytes
    td_attributes: bytes
    xfam: bytes
    mr_td: bytes
    mr_config_id: bytes
    mr_owner: bytes
    mr_owner_config: bytes
    rtmr0: bytes
    rtmr1: bytes
    rtmr2: bytes
    rtmr3: bytes
    report_data: bytes

    @property
    def rtmrs(self) -> tuple[bytes, bytes, bytes, bytes]:
        return (self.rtmr0, self.rtmr1, self.rtmr2, self.rtmr3)

    @property
    def td_attributes_int(self) -> int:
        return int.from_bytes(self.td_attributes, "little")

    @property
    def xfam_int(self) -> int:
        return int.from_bytes(self.xfam, "little")


@dataclass(frozen=True)
class TdReport15(TdReport10):
    """The TD report body of a TDX 1.5 quote (v5, body type 3)."""

    LAYOUT: ClassVar[tuple[tuple[str, int], ...]] = TD10_LAYOUT + TD15_EXTRA
    tee_tcb_svn2: bytes = b""
    mr_servicetd: bytes = b""


@dataclass(frozen=True)
class EnclaveReport(_Layout):
    """An SGX enclave report: the body of an SGX quote and the QE report of every quote."""

    LAYOUT: ClassVar[tuple[tuple[str, int], ...]] = ENCLAVE_LAYOUT
    cpu_svn: bytes
    misc_select: bytes
    reserved1: bytes
    attributes: bytes
    mr_enclave: bytes
    reserved2: bytes
    mr_signer: bytes
    reserved3: bytes
    isv_prod_id: bytes
    isv_svn: bytes
    reserved4: bytes
    report_data: bytes


@dataclass(frozen=True)
class TdReportStruct(_Layout):
    """The 1024-byte TDREPORT from ``TDX_CMD_GET_REPORT0``: MAC'd locally, not a quote."""

    LAYOUT: ClassVar[tuple[tuple[str, int], ...]] = TDREPORT_LAYOUT
    report_type: bytes
    reserved_mac1: bytes
    cpu_svn: bytes
    tee_tcb_info_hash: bytes
    tee_info_hash: bytes
    report_data: bytes
    reserved_mac2: bytes
    mac: bytes
    tcb_info_valid: bytes
    tee_tcb_svn: bytes
    mr_seam: bytes
    mr_signer_seam: bytes
    seam_attributes: bytes
    tee_tcb_svn2: bytes
    reserved_tcb: bytes
    reserved: bytes
    td_attributes: bytes
    xfam: bytes
    mr_td: bytes
    mr_config_id: bytes
    mr_owner: bytes
    mr_owner_config: bytes
    rtmr0: bytes
    rtmr1: bytes
    rtmr2: bytes
    rtmr3: bytes
    servtd_hash: bytes
    reserved_td: bytes

    @classmethod
    def parse(cls, data: bytes) -> TdReportStruct:
        if len(data) != 1024:
            raise QuoteFormatError(
                f"a TDREPORT is exactly 1024 bytes, this one has {len(data)}",
                field="tdreport",
                offset=min(len(data), 1024),
            )
        return cls.read(Reader(data), "tdreport")

    @property
    def is_tdx_type(self) -> bool:
        """REPORTTYPE.TYPE is 0x81 for a TDX report (its MAC is checked by the TDX module)."""
        return self.report_type[0] == 0x81


# Intel TDX Module ABI spec, "TDATTRIBUTES": the bits with a name (7:0 are TUD: debug/trust)
TD_ATTRIBUTE_NAMES: dict[int, str] = {
    0: "DEBUG",
    28: "SEPT_VE_DISABLE",
    30: "PKS",
    31: "KL",
    63: "PERFMON",
}


def td_attribute_flags(value: int) -> list[str]:
    """The names of the set TD attribute bits (``bit N`` for unnamed ones)."""
    return [TD_ATTRIBUTE_NAMES.get(b, f"bit {b}") for b in range(64) if value >> b & 1]
