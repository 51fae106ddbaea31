"""TDX evidence as it travels through the lab, and the interface every evidence provider offers."""

from __future__ import annotations

import base64
import hashlib
import json
import time
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

from hfl_lab._exceptions import AttestationError
from hfl_lab.tee.quote import Quote

REPORT_DATA_SIZE = 64


def pad_report_data(report_data: bytes) -> bytes:
    """TDX REPORTDATA is exactly 64 bytes; shorter values are zero-padded, longer refused."""
    if len(report_data) > REPORT_DATA_SIZE:
        raise AttestationError(
            f"report_data is {len(report_data)} bytes; TDX binds at most {REPORT_DATA_SIZE}",
            check="report_data",
            fix="hash longer values (e.g. SHA-512) before binding them",
        )
    return report_data + bytes(REPORT_DATA_SIZE - len(report_data))


def encode_report_data(binding: bytes, encoding: str) -> bytes:
    padded = pad_report_data(binding)
    if encoding == "raw":
        return padded
    if encoding == "sha256-hex":
        # The CoCo agent takes runtime_data as a ≤64-byte UTF-8 string: 64 hex characters of
        # SHA-256(binding) fit exactly and bind the same value.
        return hashlib.sha256(padded).hexdigest().encode()
    raise AttestationError(f"unknown report_data encoding '{encoding}'", check="report_data")


@dataclass(frozen=True)
class Evidence:
    """A quote plus what its provider knows about it (collateral, event log, when made)."""

    quote: bytes
    provider: str
    simulated: bool
    produced_at: float = field(default_factory=time.time)
    collateral_json: str | None = None
    event_log: tuple[dict[str, str], ...] = ()
    #: how the binding became REPORTDATA: "raw" (zero-padded) or "sha256-hex" (CoCo agent)
    report_data_encoding: str = "raw"

    def expected_report_data(self, binding: bytes) -> bytes:
        """The REPORTDATA this evidence must carry if it binds ``binding``."""
        return encode_report_data(binding, self.report_data_encoding)

    def parsed(self) -> Quote:
        return Quote.parse(self.quote)

    def to_dict(self) -> dict[str, Any]:
        return {
            "quote": base64.b64encode(self.quote).decode(),
            "provider": self.provider,
            "simulated": self.simulated,
            "produced_at": self.produced_at,
            "collateral": self.collateral_json,
            "event_log": list(self.event_log),
            "report_data_encoding": self.report_data_encoding,
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict())

    @classmethod
    def from_json(cls, text: str) -> Evidence:
        if not text or not text.strip():
            raise AttestationError(
                "no evidence came with the request: the client did not attest",
                check="evidence",
                fix="send the evidence of the TD the request comes from (Evidence.to_json())",
            )
        try:
            doc = json.loads(text)
        except ValueError as e:
            what = f"{e.msg} at character {e.pos}" if isinstance(e, json.JSONDecodeError) else e
            raise AttestationError(f"evidence is not an evidence document (not JSON: {what})",
                                   check="evidence") from None
        except RecursionError:
            # a nesting bomb ("[[[[...") from a hostile peer: refuse it like any bad document
            raise AttestationError(
                "evidence JSON is nested too deeply to be an evidence document",
                check="evidence",
                fix="send the evidence document Evidence.to_json() produces",
            ) from None
        if not isinstance(doc, dict):
            raise AttestationError("evidence JSON must be an object", check="evidence")
        return cls.from_dict(doc)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Evidence:
        collateral = d.get("collateral")
        if collateral is not None and not isinstance(collateral, str):
            raise AttestationError(
                f"evidence document: 'collateral' is a {type(collateral).__name__}, not the "
                "collateral's JSON text",
                check="evidence",
                fix="send the evidence document Evidence.to_json() produces",
            )
        try:
            return cls(
                quote=base64.b64decode(d["quote"], validate=True),
                provider=str(d.get("provider", "unknown")),
                simulated=bool(d.get("simulated", False)),
                produced_at=float(d.get("produced_at", 0.0)),
                collateral_json=collateral,
                event_log=tuple(d.get("event_log", ())),
                report_data_encoding=str(d.get("report_data_encoding", "raw")),
            )
        except (KeyError, ValueError, TypeError) as e:
            raise AttestationError(
                f"evidence document is unreadable: {type(e).__name__} ({e})", check="evidence"
            ) from None


@runtime_checkable
class EvidenceProvider(Protocol):
    """Produces TDX evidence whose REPORTDATA is the given (≤ 64-byte) value."""

    name: str
    simulated: bool

    def get_evidence(self, report_data: bytes) -> Evidence: ...
