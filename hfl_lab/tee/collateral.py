"""DCAP collateral (TCB info, QE identity, CRLs): from a file, a PCCS, or given directly."""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import dcap_qvl

from hfl_lab._exceptions import AttestationError

_FIELDS = (
    "pck_crl_issuer_chain", "root_ca_crl", "pck_crl", "tcb_info_issuer_chain", "tcb_info",
    "tcb_info_signature", "qe_identity_issuer_chain", "qe_identity", "qe_identity_signature",
)


@dataclass(frozen=True)
class Collateral:
    """Collateral in dcap-qvl's JSON form, with where it came from."""

    json_text: str
    source: str

    def __post_init__(self) -> None:
        try:
            doc = json.loads(self.json_text)
        except (ValueError, TypeError, RecursionError) as e:
            # collateral can come with a peer's evidence: a hostile document is refused here
            raise AttestationError(
                f"collateral from {self.source} is not JSON ({type(e).__name__}: {e})",
                check="collateral",
            ) from None
        if not isinstance(doc, dict):
            raise AttestationError(
                f"collateral from {self.source} is a JSON {type(doc).__name__}, not an object",
                check="collateral",
                fix="use collateral saved by dcap-qvl / a PCCS (QuoteCollateralV3 JSON)",
            )
        missing = [f for f in _FIELDS if f not in doc]
        if missing:
            raise AttestationError(
                f"collateral from {self.source} lacks {', '.join(missing)}",
                check="collateral",
                fix="use collateral saved by dcap-qvl / a PCCS (QuoteCollateralV3 JSON)",
            )

    def qvl(self) -> Any:
        try:
            return dcap_qvl.QuoteCollateralV3.from_json(self.json_text)
        except (ValueError, TypeError) as e:
            raise AttestationError(
                f"collateral from {self.source} is malformed: {e}", check="collateral"
            ) from None

    def window(self) -> tuple[int, int] | None:
        """(issue date, next update) of the TCB info, as UNIX seconds, when readable."""
        try:
            tcb = json.loads(json.loads(self.json_text)["tcb_info"])
            issue = datetime.fromisoformat(tcb["issueDate"].replace("Z", "+00:00"))
            nxt = datetime.fromisoformat(tcb["nextUpdate"].replace("Z", "+00:00"))
        except (ValueError, KeyError, TypeError):
            return None
        return int(issue.timestamp()), int(nxt.timestamp())


def load_collateral(path: str | Path) -> Collateral:
    p = Path(path)
    try:
        return Collateral(p.read_text(), f"file {p}")
    except OSError as e:
        raise AttestationError(f"cannot read collateral file {p}: {e.strerror}") from None


def fetch_collateral(pccs_url: str, quote: bytes, timeout_s: float = 30.0) -> Collateral:
    """Ask a PCCS (or Intel's PCS) for the quote's collateral."""

    async def _get() -> Any:
        return await asyncio.wait_for(dcap_qvl.get_collateral(pccs_url, quote), timeout_s)

    try:
        result = asyncio.run(_get())
    except (TimeoutError, OSError, ValueError, RuntimeError) as e:
        raise AttestationError(
            f"could not fetch collateral from {pccs_url}: {e}",
            check="dcap",
            fix="check the PCCS URL and network, or pass --collateral FILE",
        ) from None
    return Collateral(result.to_json(), f"PCCS {pccs_url}")
