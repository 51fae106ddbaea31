"""The trust service (gRPC): challenges, attestation → mesh certificates, key release, admin API."""

from __future__ import annotations

import hashlib
import hmac
import re
import threading
import time
from collections.abc import Callable, Iterator
from concurrent import futures
from pathlib import Path
from typing import Any

import grpc
import yaml
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from hfl_lab._exceptions import ConfigError, HflLabError, PolicyViolation
from hfl_lab.events import LabEvent
from hfl_lab.ratls.binding import key_binding
from hfl_lab.tee.evidence import Evidence
from hfl_lab.tee.policy import AttestationPolicy
from hfl_lab.tee.verdict import Verdict
from hfl_lab.tee.verifier import Verifier
from hfl_lab.trust.audit import AuditLog
from hfl_lab.trust.broker import KeyBroker
from hfl_lab.trust.mesh_ca import MeshCA
from hfl_lab.trust.nonces import NonceStore
from hfl_lab.trust.proto import trust_pb2 as pb
from hfl_lab.trust.proto import trust_pb2_grpc as rpc
from hfl_lab.trust.sealed import seal_state, unseal_state

ROLE_PATTERN = re.compile(r"^(ps\d+|worker\d+|owner)$")
ADMIN_HEADER = "authorization"


def admin_metadata(token: bytes) -> tuple[tuple[str, str], ...]:
    return ((ADMIN_HEADER, f"Bearer {token.hex()}"),)


def event_for(verdict: Verdict) -> LabEvent:
    """The dashboard's attestation event for a verdict (who verified whom, and why)."""
    return LabEvent(
        "attestation",
        verdict.verifier,
        {
            "verifier": verdict.verifier,
            "subject": verdict.subject,
            "accepted": verdict.accepted,
            "reason": verdict.reason,
            "simulated": verdict.simulated,
            "measurements": verdict.measurements,
            "checks": [c.__dict__ for c in verdict.checks],
        },
    )


class TrustService(rpc.TrustServiceServicer):
    """Attests participants against the owner's policy; nothing is issued or released otherwise."""

    def __init__(
        self,
        *,
        policy: AttestationPolicy,
        admin_token: bytes,
        lab_root_der: bytes | None = None,
        audit: AuditLog | None = None,
        on_event: Callable[[LabEvent], None] | None = None,
        state_path: Path | None = None,
        owner_key: bytes | None = None,
        cert_lifetime_s: float = 600.0,
        nonce_ttl_s: float = 60.0,
    ) -> None:
        if len(admin_token) < 16:
            raise ConfigError("the admin credential must be at least 16 random bytes")
        self.policy = policy
        self.lab_root_der = lab_root_der
        self.on_event = on_event
        self.audit = audit or AuditLog(on_event=on_event)
        self.broker = KeyBroker(self.audit, lab_root_der=lab_root_der)
        self.ca = MeshCA()
        self.nonces = NonceStore(ttl_s=nonce_ttl_s)
        self.cert_lifetime_s = cert_lifetime_s
        self.state_path = state_path
        self._owner_key = owner_key
        self._admin_hash = hashlib.sha256(admin_token).digest()
        self._lock = threading.Lock()
        self.issued = 0
        if state_path is not None and owner_key is not None and state_path.exists():
            self._load_state()

    def __repr__(self) -> str:
        return "TrustService(<secrets in memory>)"

    # -- state ---------------------------------------------------------------------------

    def _load_state(self) -> None:
        assert self.state_path is not None and self._owner_key is not None
        state = unseal_state(self.state_path, self._owner_key)
        self.policy = AttestationPolicy.from_dict(state["policy"])
        self.broker.import_state(state["broker"])

    def _save_state(self) -> None:
        if self.state_path is None or self._owner_key is None:
            return
        seal_state(
            self.state_path,
            {"policy": self.policy.to_dict(), "broker": self.broker.export_state()},
            self._owner_key,
        )

    def generate_secret(
        self, app_id: str, name: str, release_policy: AttestationPolicy,
        make: Callable[[], bytes],
    ) -> bool:
        """Register a secret born here, in this TD (``make()``), under ``release_policy``,
        unless the sealed state this service resumed from already holds one under that name
        (a restarted service must keep the passphrase of a volume that exists). True when a new
        one was made. Only with a sealed state: it is the owner's one way to the secret after
        the run, so without it the secret could never leave the TDs it is released to."""
        if self.state_path is None or self._owner_key is None:
            raise ConfigError(
                f"a secret generated in the trust service ({app_id}/{name}) needs its sealed "
                "state, or the owner could never obtain it.",
                fix="start the service with --state PATH (on storage that outlives the pod).",
            )
        with self._lock:
            if (app_id, name) in self.broker.names():
                return False
            secret = make()
            try:
                self.broker.register(app_id, name, secret, release_policy, by="trust",
                                     reason="generated in the trust service's TD")
            finally:
                del secret
            self._save_state()
        return True

    # -- attestation -----------------------------------------------------------------------

    def GetChallenge(self, request: Any, context: grpc.ServicerContext) -> Any:
        nonce, issued = self.nonces.issue()
        return pb.Challenge(nonce=nonce, issued_at=issued, expires_at=issued + self.nonces.ttl_s)

    def _verify(
        self, context: grpc.ServicerContext, role: str, nonce: bytes, spki: bytes,
        evidence_json: str, policy: AttestationPolicy, verifier_name: str,
    ) -> tuple[Verdict, Evidence]:
        if not ROLE_PATTERN.match(role):
            self._deny(context, grpc.StatusCode.INVALID_ARGUMENT, role, "attest",
                       f"'{role}' is not a role (ps<N>, worker<N> or owner)")
        if role not in policy.roles and role != "owner":
            self._deny(context, grpc.StatusCode.PERMISSION_DENIED, role, "attest",
                       f"the policy has no reference values for role {role}")
        try:
            issued_at = self.nonces.consume(nonce)
            evidence = Evidence.from_json(evidence_json)
            verdict = Verifier(
                policy, lab_root_der=self.lab_root_der, name=verifier_name
            ).verify(
                evidence, binding=key_binding(spki, nonce), issued_at=issued_at, role=role,
                subject=role,
            )
        except HflLabError as e:
            self._deny(context, grpc.StatusCode.PERMISSION_DENIED, role, "attest", str(e))
        if self.on_event is not None:
            self.on_event(event_for(verdict))
        return verdict, evidence

    def Attest(self, request: Any, context: grpc.ServicerContext) -> Any:
        with self._lock:
            policy = self.policy
        verdict, evidence = self._verify(
            context, request.role, request.nonce, request.public_key, request.evidence_json,
            policy, "trust",
        )
        summary = {"quote": verdict.quote_digest, "simulated": verdict.simulated,
                   "mr_td": verdict.measurements.get("mr_td", "")}
        if not verdict.accepted:
            self.audit.record("issue_mesh_certificate", subject=request.role, allowed=False,
                              reason=verdict.reason, evidence=summary)
            context.abort(grpc.StatusCode.PERMISSION_DENIED,
                          f"attestation of {request.role} refused: {verdict.reason}")
        cert = self.ca.issue(
            request.role, request.public_key, evidence, request.nonce, self.cert_lifetime_s
        )
        with self._lock:
            self.issued += 1
        self.audit.record("issue_mesh_certificate", subject=request.role, allowed=True,
                          reason=verdict.reason, evidence=summary,
                          not_after=cert.not_valid_after_utc.timestamp())
        return pb.AttestReply(
            verdict_json=verdict.to_json(indent=None),
            mesh_certificate_pem=cert.public_bytes(serialization.Encoding.PEM),
            ca_certificate_pem=self.ca.certificate_pem,
            not_after=cert.not_valid_after_utc.timestamp(),
        )

    def ReleaseSecret(self, request: Any, context: grpc.ServicerContext) -> Any:
        try:
            recipient = serialization.load_der_public_key(request.public_key)
            if not isinstance(recipient, ec.EllipticCurvePublicKey):
                raise ValueError("not an EC key")
            issued_at = self.nonces.consume(request.nonce)
            evidence = Evidence.from_json(request.evidence_json)
            wrapped, verdict = self.broker.release(
                request.app_id, request.name, evidence, recipient,
                binding=key_binding(request.public_key, request.nonce), issued_at=issued_at,
                requester=request.role or "unknown", role=request.role or None,
            )
        except (HflLabError, ValueError) as e:
            if not isinstance(e, PolicyViolation):  # the broker audits its own refusals
                self.audit.record("release_secret", subject=request.role or "unknown",
                                  allowed=False, reason=str(e), app_id=request.app_id,
                                  name=request.name)
            context.abort(grpc.StatusCode.PERMISSION_DENIED, str(e))
        if self.on_event is not None:
            self.on_event(event_for(verdict))
        return pb.ReleaseReply(
            ephemeral_public=wrapped.ephemeral_public, gcm_nonce=wrapped.nonce,
            ciphertext=wrapped.ciphertext, verdict_json=verdict.to_json(indent=None),
        )

    # -- admin -----------------------------------------------------------------------------

    def _require_admin(self, context: grpc.ServicerContext, action: str) -> None:
        presented = dict(context.invocation_metadata()).get(ADMIN_HEADER, "")
        text = presented.decode(errors="replace") if isinstance(presented, bytes) else presented
        token = text.removeprefix("Bearer ").strip()
        try:
            digest = hashlib.sha256(bytes.fromhex(token)).digest()
        except ValueError:
            digest = b""
        if not hmac.compare_digest(digest, self._admin_hash):
            self._deny(context, grpc.StatusCode.UNAUTHENTICATED, "anonymous", action,
                       "admin API: missing or wrong owner credential")

    def InstallPolicy(self, request: Any, context: grpc.ServicerContext) -> Any:
        self._require_admin(context, "install_policy")
        try:
            policy = AttestationPolicy.from_dict(yaml.safe_load(request.policy_yaml))
        except (HflLabError, yaml.YAMLError) as e:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"policy refused: {e}")
        with self._lock:
            self.policy = policy
            self._save_state()
        self.audit.record("install_policy", subject="owner", allowed=True,
                          reason=f"roles: {', '.join(sorted(policy.roles)) or 'none'}")
        return pb.AdminReply(ok=True, detail="policy installed")

    def RegisterSecret(self, request: Any, context: grpc.ServicerContext) -> Any:
        self._require_admin(context, "register_secret")
        try:
            policy = AttestationPolicy.from_dict(yaml.safe_load(request.release_policy_yaml))
            self.broker.register(request.app_id, request.name, request.secret, policy, by="owner")
        except (HflLabError, yaml.YAMLError) as e:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"secret refused: {e}")
        with self._lock:
            self._save_state()
        return pb.AdminReply(ok=True, detail=f"secret {request.app_id}/{request.name} registered")

    def ReadAudit(self, request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
        self._require_admin(context, "read_audit")
        index = int(request.since)
        while True:
            entries = self.audit.entries[index:]
            for entry in entries:
                yield pb.AuditEntry(index=index, json=__import__("json").dumps(entry))
                index += 1
            if not request.follow or not context.is_active():
                return
            time.sleep(0.2)

    def _deny(self, context: grpc.ServicerContext, code: grpc.StatusCode, subject: str,
              action: str, reason: str) -> None:
        self.audit.record(action, subject=subject, allowed=False, reason=reason)
        context.abort(code, reason)


def serve(
    service: TrustService,
    certificate_pem: bytes,
    private_key_pem: bytes,
    *,
    host: str = "127.0.0.1",
    port: int = 0,
    max_workers: int = 8,
) -> tuple[grpc.Server, int]:
    """Start the service over TLS with its RA-TLS certificate; returns the server and port."""
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=max_workers))
    rpc.add_TrustServiceServicer_to_server(service, server)  # type: ignore[no-untyped-call]
    credentials = grpc.ssl_server_credentials([(private_key_pem, certificate_pem)])
    bound = server.add_secure_port(f"{host}:{port}", credentials)
    if bound == 0:
        raise ConfigError(f"cannot listen on {host}:{port}", fix="choose a free port")
    server.start()
    return server, bound
