"""DCAP collateral (TCB info, QE identity, CRLs): from a file, a PCCS, or given directly.

Collateral is always the verifier's own: a file it was given, or what its PCCS answers (kept in a
:class:`CollateralCache` until the TCB info's ``nextUpdate``). Collateral that arrives with
evidence is never used for real evidence: it is validly signed, but the attester chose it, and
old TCB info or CRLs hide a TCB recovery or a revocation for as long as they are valid.
"""

from __future__ import annotations

import asyncio
import json
import threading
from collections import OrderedDict
from collections.abc import Callable
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

    def tcb_evaluation_data_number(self) -> int | None:
        """The lower ``tcbEvaluationDataNumber`` of the TCB info and the QE identity (Intel raises
        it with every TCB recovery), or None when neither document states it."""
        doc = json.loads(self.json_text)
        numbers = []
        for name in ("tcb_info", "qe_identity"):
            try:
                value = json.loads(doc[name]).get("tcbEvaluationDataNumber")
            except (ValueError, TypeError, AttributeError, KeyError):
                continue
            if isinstance(value, int) and not isinstance(value, bool):
                numbers.append(value)
        return min(numbers) if numbers else None

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


#: how a cache gets collateral it does not hold: (PCCS URL, raw quote) → collateral
CollateralFetch = Callable[[str, bytes], Collateral]


class CollateralCache:
    """The verifier's own collateral per (PCCS, FMSPC), fetched once and kept until the TCB
    info's ``nextUpdate``; at most ``max_entries`` platforms (the least recently used go)."""

    def __init__(self, fetch: CollateralFetch = fetch_collateral, *,
                 max_entries: int = 64) -> None:
        self._fetch = fetch
        self._max = max_entries
        self._entries: OrderedDict[tuple[str, str], Collateral] = OrderedDict()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._entries)

    def put(self, key: tuple[str, str], collateral: Collateral) -> None:
        with self._lock:
            self._entries[key] = collateral
            self._entries.move_to_end(key)
            while len(self._entries) > self._max:
                self._entries.popitem(last=False)

    def get(self, pccs_url: str, quote: bytes, fmspc: str, now: int) -> Collateral:
        """The collateral for ``fmspc`` from ``pccs_url``: cached while current, else fetched."""
        key = (pccs_url, fmspc)
        with self._lock:
            held = self._entries.get(key)
            if held is not None:
                window = held.window()
                if window is not None and now < window[1]:
                    self._entries.move_to_end(key)
                    return held
        # fetched outside the lock: a slow PCCS must not hold up verifications of other platforms
        fresh = self._fetch(pccs_url, quote)
        self.put(key, fresh)
        return fresh


#: the process's cache, shared by every verifier that names a PCCS
COLLATERAL_CACHE = CollateralCache()
