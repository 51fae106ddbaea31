"""Key broker: secrets per application ID, released wrapped to attested TDs only."""

from __future__ import annotations

import re
import threading
from dataclasses import dataclass

from cryptography.hazmat.primitives.asymmetric import ec

from hfl_lab._exceptions import AttestationError, PolicyViolation
from hfl_lab.tee.evidence import Evidence
from hfl_lab.tee.policy import AttestationPolicy
from hfl_lab.tee.verdict import Verdict
from hfl_lab.tee.verifier import Verifier
from hfl_lab.trust.audit import AuditLog
from hfl_lab.trust.wrap import WrappedSecret, wrap_secret

#: the application ID the reference deployment registers its volume key under
DEFAULT_APP_ID = "hfl-tdx-coco-app"
#: the roles a TD can ask as (the trust service's own role, "trust", never asks)
REQUESTER_ROLE = re.compile(r"^(ps\d+|worker\d+|owner)$")
# Without these a TD could receive a secret while running other code (MR_TD) or another
# role's configuration (MR_CONFIG_ID, which the host chooses at launch).
_PINNED = ("mr_td", "mr_config_id")


@dataclass
class _Entry:
    secret: bytes
    policy: AttestationPolicy

    def __repr__(self) -> str:
        return "_Entry(<secret>)"


def release_context(app_id: str, name: str) -> bytes:
    return f"{app_id}/{name}".encode()


def check_release_rules(
    release: AttestationPolicy, service: AttestationPolicy | None = None
) -> None:
    """Refuse a release policy under which a secret could reach a TD nobody meant: one that
    names no role (every request would be judged by the shared defaults), names a role no TD
    can ask as, leaves a role's MR_TD or MR_CONFIG_ID open, does not bind the evidence to the
    requester's key and the challenge, allows DEBUG TDs, or allows simulated evidence where
    ``service`` (the trust service's own policy) does not. ``PolicyViolation`` names the rule."""
    fix = ("name each role that may receive the secret with its own reference values, e.g. "
           "hfl_lab.vault.volume_release_policy(ps_measurements, owner_measurements)")
    if not release.roles:
        raise PolicyViolation(
            "the release policy names no role, so a request as any role would be judged by "
            "its shared defaults alone", fix=fix)
    odd = sorted(role for role in release.roles if not REQUESTER_ROLE.fullmatch(role))
    if odd:
        raise PolicyViolation(
            f"the release policy names {', '.join(repr(r[:32]) for r in odd[:4])}, which no TD "
            "can ask as (roles are ps<N>, worker<N> and owner)", fix=fix)
    for role in sorted(release.roles):
        open_fields = [f for f in _PINNED if release.reference_for(role, f) is None]
        if open_fields:
            raise PolicyViolation(
                f"the release policy leaves {' and '.join(open_fields)} open ('any') for role "
                f"{role}: a TD running other code or another role's configuration would "
                "receive the secret", fix=fix)
    if release.report_data_binding != "key+nonce":
        raise PolicyViolation(
            f"the release policy binds {release.report_data_binding!r} in REPORTDATA: a quote "
            "relayed from the right TD could receive the secret wrapped to another key",
            fix="set report_data_binding: key+nonce in the release policy")
    if release.allow_debug and (service is None or not service.allow_debug):
        raise PolicyViolation(
            "the release policy allows DEBUG TDs, whose memory the host can read: the secret "
            "would not stay secret", fix="set allow_debug: false in the release policy")
    if release.allow_simulated and service is not None and not service.allow_simulated:
        raise PolicyViolation(
            "the release policy allows simulated TD evidence, which the trust service's own "
            "policy refuses", fix="set allow_simulated: false in the release policy")


class KeyBroker:
    """Holds secrets in memory only; each has its own release policy."""

    def __init__(self, audit: AuditLog, *, lab_root_der: bytes | None = None) -> None:
        self.audit = audit
        self.lab_root_der = lab_root_der
        self._secrets: dict[tuple[str, str], _Entry] = {}
        self._lock = threading.Lock()
        self.released = 0

    def register(
        self, app_id: str, name: str, secret: bytes, policy: AttestationPolicy, *, by: str,
        reason: str = "registered by the lab owner", service: AttestationPolicy | None = None,
    ) -> None:
        """Hold ``secret`` for release under ``policy`` (checked by :func:`check_release_rules`
        against ``service``, the trust service's own policy)."""
        if len(secret) < 16:
            raise PolicyViolation("refusing to register a secret shorter than 16 bytes")
        check_release_rules(policy, service)
        with self._lock:
            self._secrets[(app_id, name)] = _Entry(bytes(secret), policy)
        self.audit.record(
            "register_secret", subject=by, allowed=True, app_id=app_id, name=name,
            reason=reason,
        )

    def names(self) -> list[tuple[str, str]]:
        with self._lock:
            return sorted(self._secrets)

    def release(
        self,
        app_id: str,
        name: str,
        evidence: Evidence,
        recipient: ec.EllipticCurvePublicKey,
        *,
        binding: bytes,
        issued_at: float | None,
        requester: str,
        role: str | None = None,
    ) -> tuple[WrappedSecret, Verdict]:
        """Verify ``evidence`` against the secret's release policy and wrap it to ``recipient``.

        ``binding`` is what the evidence's REPORTDATA must carry: it ties the quote to the
        recipient key (and the broker's challenge), so a relayed quote cannot receive it.
        ``role`` must be one the release policy names; its entry holds the evidence to that
        role's own reference values (no role, or another, is refused, never judged by the
        policy's shared defaults).
        """
        with self._lock:
            entry = self._secrets.get((app_id, name))
        if entry is None:
            self.audit.record(
                "release_secret", subject=requester, allowed=False, app_id=app_id, name=name,
                reason="no such secret",
            )
            raise PolicyViolation(
                f"no secret '{name}' is registered for application '{app_id}'",
                fix="register it from notebook 02 before starting the participants",
            )
        verifier = Verifier(entry.policy, lab_root_der=self.lab_root_der, name="key-broker")
        try:
            entry.policy.require_role(role, f"secret '{app_id}/{name}' not released to "
                                      f"{requester}")
        except PolicyViolation as e:
            self.audit.record(
                "release_secret", subject=requester, allowed=False, app_id=app_id, name=name,
                reason=str(e),
            )
            raise
        try:
            verdict = verifier.verify(
                evidence, binding=binding, issued_at=issued_at, role=role, subject=requester
            )
        except AttestationError as e:
            self.audit.record(
                "release_secret", subject=requester, allowed=False, app_id=app_id, name=name,
                reason=str(e),
            )
            raise
        summary = {"quote": verdict.quote_digest, "simulated": verdict.simulated,
                   "tcb_status": verdict.tcb_status, "mr_td": verdict.measurements.get("mr_td")}
        if not verdict.accepted:
            self.audit.record(
                "release_secret", subject=requester, allowed=False, app_id=app_id, name=name,
                reason=verdict.reason, evidence=summary,
            )
            raise PolicyViolation(
                f"secret '{app_id}/{name}' not released to {requester}: {verdict.reason}"
            )
        wrapped = wrap_secret(entry.secret, recipient, release_context(app_id, name))
        with self._lock:
            self.released += 1
        self.audit.record(
            "release_secret", subject=requester, allowed=True, app_id=app_id, name=name,
            reason=verdict.reason, evidence=summary,
        )
        return wrapped, verdict

    def export_state(self) -> dict[str, dict[str, object]]:
        """For sealing only: hex secrets and policies (the caller encrypts before disk)."""
        with self._lock:
            return {
                f"{a}\0{n}": {"secret": e.secret.hex(), "policy": e.policy.to_dict()}
                for (a, n), e in self._secrets.items()
            }

    def import_state(self, state: dict[str, dict[str, object]]) -> None:
        with self._lock:
            for key, value in state.items():
                app_id, _, name = key.partition("\0")
                self._secrets[(app_id, name)] = _Entry(
                    bytes.fromhex(str(value["secret"])),
                    AttestationPolicy.from_dict(value["policy"]),
                )
