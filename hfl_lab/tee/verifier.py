"""One verification path for all TDX evidence: DCAP (dcap-qvl) first, then the policy's checks.

Real evidence is verified against Intel's root, with collateral of the verifier's own (a file it
was given, or the policy's PCCS through :class:`~hfl_lab.tee.collateral.CollateralCache`), never
with collateral that came with the evidence: the attester would choose it. Simulated evidence
goes through the very same ``dcap_qvl`` call with the lab's root (``verify_with_root_ca``) and
its lab-signed collateral, and only when the policy says ``allow_simulated: true``. Whether
evidence is simulated is decided by the root its PCK chain ends in, never by what the evidence
claims.
"""

from __future__ import annotations

import datetime as dt
import time
from collections.abc import Callable
from typing import Any

import dcap_qvl
from cryptography.hazmat.primitives import serialization

from hfl_lab._exceptions import AttestationError, QuoteFormatError
from hfl_lab.tee.collateral import COLLATERAL_CACHE, Collateral, CollateralCache
from hfl_lab.tee.evidence import Evidence
from hfl_lab.tee.policy import AttestationPolicy
from hfl_lab.tee.quote import Quote
from hfl_lab.tee.reports import TdReport10, td_attribute_flags
from hfl_lab.tee.sim.platform import SIMULATED_MARKER, slot_of
from hfl_lab.tee.verdict import Verdict

_REFERENCE_FIELDS = ("mr_td", "rtmr0", "rtmr1", "rtmr2", "rtmr3", "mr_seam", "mr_config_id", "xfam")

# dcap-qvl error text → the reason a person needs (first match wins)
_DCAP_REASONS: tuple[tuple[tuple[str, ...], str], ...] = (
    (("CrlExpired", "TCBInfo expired", "QE Identity expired", "Expired"), "collateral expired"),
    (
        ("issue date is in the future", "NotValidYet", "CertNotValidYet"),
        "collateral not yet valid at the verification time",
    ),
    (("No matching TCB level",), "no matching TCB level: the platform is below every TCB level"),
    (("Debug mode is enabled",), "DEBUG TD: DCAP verification refuses debug TDs"),
    (
        ("UnknownIssuer", "Failed to load root", "InvalidCrlSignature"),
        "PCK chain or collateral does not lead to the trusted root",
    ),
    (("Fmspc mismatch",), "collateral is for another platform (FMSPC mismatch)"),
    (("Revoked",), "TCB revoked"),
    (
        ("Signature is invalid", "signature is invalid", "hash mismatch", "BadSignature"),
        "signature invalid: the quote was altered or not signed by a certified QE",
    ),
    (("SEPT_VE_DISABLE",), "SEPT_VE_DISABLE is not set in the TD attributes"),
    (("Reserved bits",), "reserved TD attribute bits are set"),
)


def dcap_reason(message: str) -> str:
    for needles, reason in _DCAP_REASONS:
        if any(n in message for n in needles):
            return f"{reason} ({message.splitlines()[0].removeprefix('Verification failed: ')})"
    return message.replace("\n", " ").removeprefix("Verification failed: ")


def _attributes_mismatch(attrs: int, exact: tuple[str, ...], role: str | None) -> str:
    """Why the TD attributes are not the policy's: the bits that differ from its (first) value."""
    reference = int(exact[0], 16)
    extra, missing = attrs & ~reference, reference & ~attrs
    differences = [
        f"{' '.join(td_attribute_flags(bits))} {state}"
        for bits, state in (
            (extra, "set, which the reference value does not have"),
            (missing, "clear, which the reference value has set"),
        )
        if bits
    ]
    which = "" if len(exact) == 1 else f" (none of {len(exact)}; compared with {exact[0]})"
    return (
        "TD attributes differ from the policy's reference value"
        + (f" for role {role}" if role else "")
        + f"{which}: {'; '.join(differences)}"
    )


def _refusal_with(evidence: Evidence, quote: Quote, now: int) -> str | None:
    """Why DCAP refuses ``quote`` even with the collateral the evidence brought (which is never
    used to accept it), or None when it would pass or there is none."""
    if evidence.collateral_json is None:
        return None
    try:
        dcap_qvl.verify(quote.to_bytes(),
                        Collateral(evidence.collateral_json, "the evidence").qvl(), now)
    except AttestationError:
        return None
    except (ValueError, RuntimeError, TypeError) as e:
        return dcap_reason(str(e))
    return None


class Verifier:
    """Verifies evidence against a policy and returns a ``Verdict`` listing every check."""

    def __init__(
        self,
        policy: AttestationPolicy,
        *,
        collateral: Collateral | None = None,
        pccs_url: str | None = None,
        lab_root_der: bytes | None = None,
        lab_collateral: Collateral | None = None,
        collateral_cache: CollateralCache | None = None,
        clock: Callable[[], float] = time.time,
        name: str = "lab",
        on_verdict: Callable[[Verdict], None] | None = None,
    ) -> None:
        self.policy = policy
        self.collateral = collateral
        self.pccs_url = pccs_url or policy.pccs_url
        self.collateral_cache = COLLATERAL_CACHE if collateral_cache is None else collateral_cache
        self.lab_root_der = lab_root_der
        self.lab_collateral = lab_collateral
        self.clock = clock
        self.name = name
        self.on_verdict = on_verdict

    def verify(
        self,
        evidence: Evidence | bytes,
        *,
        binding: bytes | None = None,
        issued_at: float | None = None,
        role: str | None = None,
        subject: str = "",
        now: int | None = None,
        evidence_kind: str = "tdx-quote",
    ) -> Verdict:
        """Verify; raises ``QuoteFormatError`` only when the quote cannot be parsed at all."""
        if isinstance(evidence, bytes | bytearray):
            evidence = Evidence(quote=bytes(evidence), provider="raw", simulated=False)
        quote = Quote.parse(evidence.quote)
        now_s = int(now if now is not None else self.clock())
        verdict = Verdict(
            evidence_kind=evidence_kind,
            subject=subject,
            verifier=self.name,
            verified_at=float(now_s),
            quote_digest=quote.digest(),
        )
        chain_root = self._chain_root(quote)
        lab_signed = self.lab_root_der is not None and chain_root == self.lab_root_der
        verdict.simulated = lab_signed or quote.header.user_data == SIMULATED_MARKER

        self._check_tee_type(verdict, quote)
        self._check_simulated(verdict, lab_signed)
        report = self._check_dcap(verdict, quote, evidence, lab_signed, now_s)
        if lab_signed:
            self._check_slot(verdict, quote, role)
        self._check_tcb(verdict, report)
        if isinstance(quote.body, TdReport10):
            td = quote.body
            verdict.measurements = {n: getattr(td, n).hex() for n in _REFERENCE_FIELDS}
            self._check_attributes(verdict, td, role)
            self._check_references(verdict, td, role)
            self._check_binding(verdict, td, evidence, binding)
        self._check_freshness(verdict, issued_at, now_s)
        if self.on_verdict is not None:
            self.on_verdict(verdict)
        return verdict

    # -- the checks -----------------------------------------------------------------------

    @staticmethod
    def _chain_root(quote: Quote) -> bytes | None:
        try:
            certs = quote.signature_data.pck_certificates()
        except QuoteFormatError:
            return None
        return certs[-1].public_bytes(serialization.Encoding.DER) if certs else None

    @staticmethod
    def _check_slot(v: Verdict, quote: Quote, role: str | None) -> None:
        """A joiner's simulated PCK certificate names the one participant it may attest as
        (issue 23): its evidence is refused for any other role, or for none."""
        try:
            certs = quote.signature_data.pck_certificates()
        except QuoteFormatError:
            return  # no chain: the dcap check has refused it already
        try:
            slot = slot_of(certs[0]) if certs else None
        except ValueError:  # a subject the parser cannot read: never one the lab issued
            v.add("slot", False, f"evidence for {role or '(no role)'}",
                  "an unreadable PCK certificate subject",
                  "the PCK certificate's subject cannot be parsed, so whom it may attest as "
                  "is unknown")
            return
        if slot is None:
            return
        v.add("slot", role == slot, f"evidence for {role or '(no role)'}",
              f"a joiner's key for {slot} only",
              "" if role == slot else f"signed with the simulated key enrolled for {slot}: "
              f"accepted for {slot} alone, never as {role or 'an unnamed role'}")

    @staticmethod
    def _check_tee_type(v: Verdict, quote: Quote) -> None:
        actual = "TDX" if quote.is_tdx else f"SGX (TEE type 0x{quote.header.tee_type:08x})"
        v.add("tee_type", quote.is_tdx, "TDX", actual, "" if quote.is_tdx else "not a TDX quote")

    def _check_simulated(self, v: Verdict, lab_signed: bool) -> None:
        allowed = self.policy.allow_simulated
        if v.simulated:
            reason = (
                "SIMULATED TD evidence (lab root), allowed by policy: proves the workload, "
                "not the hardware"
                if allowed and lab_signed
                else "simulated TD evidence is not allowed by this policy (allow_simulated: false)"
                if not allowed
                else "simulated marker without the lab's root"
            )
            v.add(
                "simulated",
                allowed and lab_signed,
                "hardware or simulated TD" if allowed else "hardware TD",
                "simulated TD",
                reason,
            )
        else:
            v.add(
                "simulated",
                True,
                "hardware or simulated TD" if allowed else "hardware TD",
                "hardware TD evidence",
            )

    def _collateral_for(
        self, quote: Quote, evidence: Evidence, lab_signed: bool, now: int
    ) -> Collateral:
        if self.collateral is not None:
            return self.collateral
        if lab_signed:
            if self.lab_collateral is not None:
                return self.lab_collateral
            # Simulated evidence: every participant holds the lab platform's keys, so the
            # collateral it carries proves no more than the rest of it (never secure).
            if evidence.collateral_json is not None:
                return Collateral(evidence.collateral_json,
                                  f"the lab platform, with the evidence from {evidence.provider}")
        elif self.pccs_url is not None:
            fmspc = quote.fmspc()
            if fmspc is None:
                raise AttestationError(
                    "the quote has no PCK certificate chain, so no FMSPC to fetch collateral for",
                    check="dcap", fix="use a quote with certification data type 6 (PCK chain)",
                )
            return self.collateral_cache.get(self.pccs_url, quote.to_bytes(), fmspc, now)
        brought = " (the evidence brought some: never used, the attester chose it)" if (
            evidence.collateral_json is not None and not lab_signed) else ""
        raise AttestationError(
            f"no collateral of its own{brought}",
            check="dcap",
            fix="pass --collateral FILE or --pccs URL (or set pccs_url in the policy)",
        )

    def _check_dcap(
        self, v: Verdict, quote: Quote, evidence: Evidence, lab_signed: bool, now: int
    ) -> Any:
        root = "lab root (SIMULATED)" if lab_signed else "Intel SGX root CA"
        expected = f"quote signed by a QE certified up to the {root}; collateral valid"
        try:
            collateral = self._collateral_for(quote, evidence, lab_signed, now)
            qvl = collateral.qvl()
            raw = quote.to_bytes()
            if lab_signed:
                report = dcap_qvl.verify_with_root_ca(raw, qvl, self.lab_root_der, now)
            else:
                report = dcap_qvl.verify(raw, qvl, now)
        except AttestationError as e:
            reason = e.message + (f" — fix: {e.fix}" if e.fix else "")
            # Refused either way; but a quote the attester's own collateral cannot verify
            # either (a chain to another root, a bad signature) is named for what it is.
            diagnosis = None if lab_signed else _refusal_with(evidence, quote, now)
            v.add("dcap", False, expected, "not verified", diagnosis or reason)
            return None
        except (ValueError, RuntimeError, TypeError) as e:
            v.add("dcap", False, expected, "verification failed", dcap_reason(str(e)))
            return None
        when = dt.datetime.fromtimestamp(now, dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        v.add("dcap", True, expected,
              f"verified at {when} with collateral from {collateral.source}")
        self._check_evaluation(v, collateral)
        return report

    def _check_evaluation(self, v: Verdict, collateral: Collateral) -> None:
        minimum = self.policy.min_tcb_evaluation_data_number
        if minimum is None:
            return
        number = collateral.tcb_evaluation_data_number()
        ok = number is not None and number >= minimum
        v.add(
            "tcb_evaluation",
            ok,
            f"tcbEvaluationDataNumber ≥ {minimum}",
            f"tcbEvaluationDataNumber {number}" if number is not None else "not stated",
            "" if ok else f"the collateral is older than the policy allows: it predates the TCB "
            f"recovery that raised the evaluation number to {minimum} (fetch current "
            "collateral from the PCCS)",
        )

    def _check_tcb(self, v: Verdict, report: Any) -> None:
        accepted = self.policy.accepted_tcb_statuses
        if report is None:
            v.add("tcb_status", False, " | ".join(accepted), "unknown", "DCAP verification failed")
            return
        v.tcb_status = str(report.status)
        v.advisory_ids = list(report.advisory_ids)
        ok = v.tcb_status in accepted
        v.add(
            "tcb_status",
            ok,
            " | ".join(accepted),
            v.tcb_status,
            "" if ok else f"TCB status {v.tcb_status} is not accepted by the policy",
        )
        extra = sorted(set(v.advisory_ids) - set(self.policy.accepted_advisory_ids))
        v.add(
            "advisories",
            not extra,
            ", ".join(self.policy.accepted_advisory_ids) or "none",
            ", ".join(v.advisory_ids) or "none",
            "" if not extra else f"unaccepted advisories {', '.join(extra)}",
        )

    def _check_attributes(self, v: Verdict, td: TdReport10, role: str | None) -> None:
        attrs = td.td_attributes_int
        debug = bool(attrs & 1)
        debug_ok = not debug or self.policy.allow_debug
        v.add(
            "debug",
            debug_ok,
            "DEBUG clear" if not self.policy.allow_debug else "any",
            "DEBUG set" if debug else "DEBUG clear",
            "" if debug_ok else "DEBUG TD: its memory and state are readable by the host",
        )
        mask = self.policy.forbidden_td_attributes & ~(1 if self.policy.allow_debug else 0)
        bad = attrs & mask & ~1  # DEBUG has its own check above
        expected = f"bits 0x{mask:02x} clear"
        reasons = [f"forbidden TD attribute bits 0x{bad:02x} set"] if bad else []
        exact = self.policy.reference_for(role, "td_attributes")
        if exact is not None:
            expected = f"{' | '.join(exact)}; {expected}"
            if f"0x{attrs:016x}" not in exact:
                reasons.append(_attributes_mismatch(attrs, exact, role))
        v.add("td_attributes", not reasons, expected, f"0x{attrs:016x}", "; ".join(reasons))

    def _check_references(self, v: Verdict, td: TdReport10, role: str | None) -> None:
        for name in _REFERENCE_FIELDS:
            allowed = self.policy.reference_for(role, name)
            if allowed is None:
                continue
            actual = getattr(td, name).hex()
            ok = actual in allowed
            v.add(
                name,
                ok,
                " | ".join(allowed),
                actual,
                "" if ok else f"{name} does not match the policy's reference value"
                + (f" for role {role}" if role else ""),
            )

    def _check_binding(
        self, v: Verdict, td: TdReport10, evidence: Evidence, binding: bytes | None
    ) -> None:
        required = self.policy.report_data_binding != "none"
        if binding is None:
            if required:
                v.add(
                    "report_data",
                    False,
                    f"binds the {self.policy.report_data_binding}",
                    td.report_data.hex(),
                    "nothing to check the binding against (no key/nonce given)",
                )
            return
        expected = evidence.expected_report_data(binding)
        ok = td.report_data == expected
        v.add(
            "report_data",
            ok,
            expected.hex(),
            td.report_data.hex(),
            "" if ok else "report_data does not bind this key/challenge (replay or relay?)",
        )

    def _check_freshness(self, v: Verdict, issued_at: float | None, now: int) -> None:
        if issued_at is None:
            return
        age = now - issued_at
        limit = self.policy.max_evidence_age_s
        ok = -5 <= age <= limit
        v.add(
            "freshness",
            ok,
            f"≤ {limit:.0f} s old",
            # the clock reads whole seconds: a challenge issued this second may look "-0.4 s old"
            f"{age:.1f} s old" if age >= 0 else ("issued this second" if age > -1
                                                  else f"issued {-age:.1f} s in the future"),
            "" if ok else "evidence is stale: its challenge is older than the policy allows",
        )
