"""Key broker: secrets per application ID, released wrapped to attested TDs only."""

from __future__ import annotations

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


@dataclass
class _Entry:
    secret: bytes
    policy: AttestationPolicy

    def __repr__(self) -> str:
        return "_Entry(<secret>)"


def release_context(app_id: str, name: str) -> bytes:
    return f"{app_id}/{name}".encode()


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
        reason: str = "registered by the lab owner",
    ) -> None:
        if len(secret) < 16:
            raise PolicyViolation("refusing to register a secret shorter than 16 bytes")
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
