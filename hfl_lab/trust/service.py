"""The trust service (gRPC): challenges, attestation → mesh certificates, key release, admin API.

Started in its TD it knows only the owner's public policy key; it serves nothing until the owner,
after verifying its RA-TLS evidence, provisions it with the admin credential over that attested
channel (``Provision``, see :mod:`hfl_lab.trust.owner_gate`). Only then does it derive its
sealing key, resume its sealed state and run its ``on_provisioned`` hook (the model volume's
passphrase is born there).
"""

from __future__ import annotations

import json
import re
import threading
import time
from collections.abc import Callable, Iterator
from concurrent import futures
from pathlib import Path
from typing import Any, NoReturn

import grpc
import yaml
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from hfl_lab import owner
from hfl_lab._exceptions import ConfigError, HflLabError, PolicyViolation, TooManyChallenges
from hfl_lab.events import LabEvent
from hfl_lab.ratls.binding import key_binding
from hfl_lab.tee.evidence import Evidence
from hfl_lab.tee.policy import AttestationPolicy
from hfl_lab.tee.verdict import Verdict
from hfl_lab.tee.verifier import Verifier
from hfl_lab.trust.audit import AuditLog
from hfl_lab.trust.broker import REQUESTER_ROLE, KeyBroker
from hfl_lab.trust.enrollment import EnrollmentDesk
from hfl_lab.trust.mesh_ca import MeshCA
from hfl_lab.trust.nonces import (
    CHALLENGE_BURST,
    CHALLENGES_PER_S,
    ChallengeRate,
    NonceStore,
    address_of,
)
from hfl_lab.trust.owner_gate import (
    ADMIN_HEADER,
    MAX_TOKEN_BYTES,
    OwnerGate,
    admin_metadata,
    token_of,
)
from hfl_lab.trust.proto import trust_pb2 as pb
from hfl_lab.trust.proto import trust_pb2_grpc as rpc
from hfl_lab.trust.sealed import (
    COUNTER,
    HEADS,
    CheckpointHead,
    CheckpointHeads,
    check_not_rolled_back,
    seal_state,
    state_counter,
    unseal_state,
)

__all__ = ["ADMIN_HEADER", "TrustService", "admin_metadata", "serve", "shown"]

#: the largest request fields any participant or owner sends, checked before anything of the
#: request is logged or kept: a role ("worker123"), an application ID or secret name, the
#: evidence (a quote with its collateral is tens of kB), a key (P-256 SPKI: 91 bytes), a
#: challenge (32 bytes), a secret and a policy
MAX_ROLE_CHARS = 32
MAX_NAME_CHARS = 128
MAX_EVIDENCE_CHARS = 256 * 1024
MAX_KEY_BYTES = 1024
MAX_NONCE_BYTES = 64
MAX_SECRET_BYTES = 64 * 1024
MAX_POLICY_CHARS = 256 * 1024
MAX_JOIN_LINK_CHARS = 4096
#: the largest request the service reads at all; gRPC refuses bigger ones unread
MAX_REQUEST_BYTES = 1 << 20
#: who may report a model volume's checkpoint head: the parameter server
PS_ROLE = re.compile(r"^ps\d+$")


def shown(text: str, limit: int = MAX_ROLE_CHARS) -> str:
    """A request field as logs and errors show it: itself, or its start and its length."""
    if len(text) <= limit:
        return text
    return f"{text[:limit]}… ({len(text)} characters)"


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
        admin_token: bytes | None = None,
        policy_key: str = "",
        on_provisioned: Callable[[TrustService], None] | None = None,
        lab_root_der: bytes | None = None,
        audit: AuditLog | None = None,
        on_event: Callable[[LabEvent], None] | None = None,
        state_path: Path | None = None,
        owner_key: bytes | None = None,
        cert_lifetime_s: float = 600.0,
        nonce_ttl_s: float = 60.0,
        min_state_counter: int | None = None,
        challenges_per_s: float = CHALLENGES_PER_S,
        challenge_burst: int = CHALLENGE_BURST,
        enrollment: EnrollmentDesk | None = None,
    ) -> None:
        """With ``admin_token`` the service is provisioned from the start (in-process use);
        without it, ``policy_key`` (the owner's public key from the measured config) names the
        only credential ``Provision`` accepts, and ``on_provisioned`` runs once it has (with the
        sealed state loaded). ``owner_key``: the sealing key for ``state_path`` (default: derived
        from the credential). ``min_state_counter``: the newest sealed-state counter the owner
        has seen (see :mod:`hfl_lab.trust.sealed`); a state file with a lower one is refused as
        rolled back."""
        self.gate = OwnerGate(admin_token, policy_key)
        #: join links of a hosted run (None: this service hands joiners nothing)
        self.enrollment = enrollment
        self.on_provisioned = on_provisioned
        self.policy = policy
        self.lab_root_der = lab_root_der
        self.on_event = on_event
        # the newest records in memory; with a state folder, every record also in its
        # rotated audit.jsonl there (summaries only: never a secret)
        self.audit = audit or AuditLog(
            state_path.parent / "audit.jsonl" if state_path is not None else None,
            on_event=on_event,
        )
        self.broker = KeyBroker(self.audit, lab_root_der=lab_root_der)
        self.ca = MeshCA()
        self.nonces = NonceStore(ttl_s=nonce_ttl_s)
        self.challenge_rate = ChallengeRate(challenges_per_s, challenge_burst)
        self.cert_lifetime_s = cert_lifetime_s
        self.state_path = state_path
        self._owner_key = owner_key
        self._lock = threading.Lock()
        self._provision_lock = threading.Lock()
        self.issued = 0
        #: each volume's newest checkpoint as ps0 reported it, and the sealed state's version
        self.heads = CheckpointHeads()
        self.state_counter = 0
        self._min_state_counter = min_state_counter
        if admin_token is not None:
            self._take_credential(admin_token, derive_key=False)

    @property
    def provisioned(self) -> bool:
        """Whether the owner's credential has arrived (nothing is served before)."""
        return self.gate.provisioned.is_set()

    def wait_provisioned(self, timeout_s: float | None = None) -> bool:
        return self.gate.provisioned.wait(timeout_s)

    def _take_credential(self, token: bytes, *, derive_key: bool = True) -> None:
        """Derive the sealing key, resume the sealed state, run the hook; then open."""
        if derive_key and self.state_path is not None and self._owner_key is None:
            self._owner_key = owner.sealing_key(token)
        if self.state_path is not None and self._owner_key is not None and (
            self.state_path.exists() or self._min_state_counter
        ):
            self._load_state()
        if self.on_provisioned is not None:
            self.on_provisioned(self)
        self.gate.accept(token)

    def __repr__(self) -> str:
        return "TrustService(<secrets in memory>)"

    # -- state ---------------------------------------------------------------------------

    def _load_state(self) -> None:
        assert self.state_path is not None and self._owner_key is not None
        if not self.state_path.exists():  # the owner saw a state here: it was removed
            check_not_rolled_back(self.state_path, None, self._min_state_counter)
        state = unseal_state(self.state_path, self._owner_key)
        check_not_rolled_back(self.state_path, state, self._min_state_counter)
        self.policy = AttestationPolicy.from_dict(state["policy"])
        self.broker.import_state(state["broker"])
        self.heads.import_state(state.get(HEADS, {}))
        self.state_counter = state_counter(state)

    def _save_state(self) -> None:
        counter = self.state_counter + 1  # counted once sealed: the owner compares with the file
        if self.state_path is not None and self._owner_key is not None:
            seal_state(
                self.state_path,
                {"policy": self.policy.to_dict(), "broker": self.broker.export_state(),
                 HEADS: self.heads.export_state(), COUNTER: counter},
                self._owner_key,
            )
        self.state_counter = counter

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
                                     reason="generated in the trust service's TD",
                                     service=self.policy)
            finally:
                del secret
            self._save_state()
        return True

    # -- attestation -----------------------------------------------------------------------

    def GetChallenge(self, request: Any, context: grpc.ServicerContext) -> Any:
        # Refusals are not audited: a flood of them would be a flood in the log.
        self._require_provisioned(context)
        try:
            self.challenge_rate.take(address_of(context.peer()))
            nonce, issued = self.nonces.issue()
        except TooManyChallenges as e:
            context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, str(e))
        return pb.Challenge(nonce=nonce, issued_at=issued, expires_at=issued + self.nonces.ttl_s)

    def _verify(
        self, context: grpc.ServicerContext, role: str, nonce: bytes, spki: bytes,
        evidence_json: str, policy: AttestationPolicy, verifier_name: str,
    ) -> tuple[Verdict, Evidence]:
        self._check_sizes(context, "attest", role, role=(role, MAX_ROLE_CHARS),
                          nonce=(nonce, MAX_NONCE_BYTES), public_key=(spki, MAX_KEY_BYTES),
                          evidence_json=(evidence_json, MAX_EVIDENCE_CHARS))
        self._check_role(context, "attest", role)
        try:
            policy.require_role(role, f"attestation of {role} refused")
        except PolicyViolation as e:
            self._deny(context, grpc.StatusCode.PERMISSION_DENIED, role, "attest", str(e))
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
        self._require_provisioned(context)
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
        self._require_provisioned(context)
        role = request.role
        self._check_sizes(context, "release_secret", role, role=(role, MAX_ROLE_CHARS),
                          app_id=(request.app_id, MAX_NAME_CHARS),
                          name=(request.name, MAX_NAME_CHARS),
                          nonce=(request.nonce, MAX_NONCE_BYTES),
                          public_key=(request.public_key, MAX_KEY_BYTES),
                          evidence_json=(request.evidence_json, MAX_EVIDENCE_CHARS))
        self._check_role(context, "release_secret", role)
        try:
            recipient = serialization.load_der_public_key(request.public_key)
            if not isinstance(recipient, ec.EllipticCurvePublicKey):
                raise ValueError("not an EC key")
            issued_at = self.nonces.consume(request.nonce)
            evidence = Evidence.from_json(request.evidence_json)
            wrapped, verdict = self.broker.release(
                request.app_id, request.name, evidence, recipient,
                binding=key_binding(request.public_key, request.nonce), issued_at=issued_at,
                requester=role, role=role,
            )
        except (HflLabError, ValueError) as e:
            if not isinstance(e, PolicyViolation):  # the broker audits its own refusals
                self.audit.record("release_secret", subject=role, allowed=False,
                                  reason=str(e), app_id=request.app_id, name=request.name)
            context.abort(grpc.StatusCode.PERMISSION_DENIED, str(e))
        if self.on_event is not None:
            self.on_event(event_for(verdict))
        return pb.ReleaseReply(
            ephemeral_public=wrapped.ephemeral_public, gcm_nonce=wrapped.nonce,
            ciphertext=wrapped.ciphertext, verdict_json=verdict.to_json(indent=None),
        )

    # -- admin -----------------------------------------------------------------------------

    def _require_provisioned(self, context: grpc.ServicerContext) -> None:
        if not self.gate.provisioned.is_set():
            context.abort(
                grpc.StatusCode.UNAVAILABLE,
                "the trust service awaits its owner's credential and serves nothing before. "
                "Fix: the owner provisions it over the attested channel once it is up (the "
                "lab's backends do so by themselves; by hand: TrustClient.provision)",
            )

    def _require_admin(self, context: grpc.ServicerContext, action: str) -> None:
        self._require_provisioned(context)
        if not self.gate.is_owner(token_of(dict(context.invocation_metadata()))):
            self._deny(context, grpc.StatusCode.UNAUTHENTICATED, "anonymous", action,
                       "admin API: missing or wrong owner credential")

    def Provision(self, request: Any, context: grpc.ServicerContext) -> Any:
        """The owner's credential, over the channel the owner verified. Once per start."""
        token = bytes(request.admin_token)
        if len(token) > MAX_TOKEN_BYTES:
            self._deny(context, grpc.StatusCode.INVALID_ARGUMENT, "anonymous", "provision",
                       f"admin_token is {len(token)} bytes, more than any credential "
                       f"({MAX_TOKEN_BYTES}). Fix: send the run's admin credential")
        with self._provision_lock:
            refused = self.gate.refusal(token)
            if refused:
                self._deny(context, grpc.StatusCode.PERMISSION_DENIED, "anonymous", "provision",
                           f"provisioning refused: {refused}")
            if self.gate.provisioned.is_set():
                return pb.AdminReply(ok=True, detail="already provisioned")
            try:
                self._take_credential(token)
            except HflLabError as e:
                self._owner_key = None
                self._deny(context, grpc.StatusCode.FAILED_PRECONDITION, "owner", "provision",
                           "the credential is the owner's, but the service cannot open with "
                           f"it: {e}")
        self.audit.record("provision", subject="owner", allowed=True,
                          reason="the owner's credential arrived over the attested channel; "
                          f"sealed state counter {self.state_counter}")
        return pb.AdminReply(ok=True, detail="provisioned")

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
        self._check_sizes(context, "register_secret", "owner",
                          app_id=(request.app_id, MAX_NAME_CHARS),
                          name=(request.name, MAX_NAME_CHARS),
                          secret=(request.secret, MAX_SECRET_BYTES),
                          release_policy_yaml=(request.release_policy_yaml, MAX_POLICY_CHARS))
        with self._lock:
            service = self.policy
        try:
            policy = AttestationPolicy.from_dict(yaml.safe_load(request.release_policy_yaml))
            self.broker.register(request.app_id, request.name, request.secret, policy,
                                 by="owner", service=service)
        except (HflLabError, yaml.YAMLError) as e:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"secret refused: {e}")
        with self._lock:
            self._save_state()
        return pb.AdminReply(ok=True, detail=f"secret {request.app_id}/{request.name} registered")

    def ReadAudit(self, request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
        self._require_admin(context, "read_audit")
        index = int(request.since)
        while True:
            for position, entry in self.audit.since(index):
                yield pb.AuditEntry(index=position, json=json.dumps(entry))
                index = position + 1
            if not request.follow or not context.is_active():
                return
            time.sleep(0.2)

    def OpenEnrollment(self, request: Any, context: grpc.ServicerContext) -> Any:
        self._require_admin(context, "open_enrollment")
        if self.enrollment is None:
            context.abort(grpc.StatusCode.FAILED_PRECONDITION,
                          "this trust service was started without an enrollment desk. Fix: "
                          "start it through the local backend (hfl-lab host)")
        try:
            self.enrollment.open(bytes(request.enrollment_key))
        except HflLabError as e:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"enrollment refused: {e}")
        self.audit.record("open_enrollment", subject="owner", allowed=True,
                          reason="join links MAC'd with the host's key are honoured")
        return pb.AdminReply(ok=True, detail="enrollment open")

    def Enroll(self, request: Any, context: grpc.ServicerContext) -> Any:
        """A joiner's link → the run's documents; every answer is audited, no secret logged."""
        self._require_provisioned(context)
        self._check_sizes(context, "enroll", "anonymous",
                          join_link=(request.join_link, MAX_JOIN_LINK_CHARS))
        if self.enrollment is None:
            self._deny(context, grpc.StatusCode.FAILED_PRECONDITION, "anonymous", "enroll",
                       "this trust service takes no joiners: its run is not hosted. Fix: ask "
                       "the host for a link of a run started with `hfl-lab host`")
        try:
            link, documents = self.enrollment.enroll(request.join_link)
        except HflLabError as e:
            self._deny(context, grpc.StatusCode.PERMISSION_DENIED, "anonymous", "enroll",
                       f"join link refused: {e}")
        self.audit.record("enroll", subject=link.slot, allowed=True,
                          reason=f"join link for {link.slot} (code {link.code[:6]}...) accepted; "
                          "the worker must still attest")
        return pb.EnrollReply(slot=link.slot, config_yaml=documents.config_yaml,
                              policy_yaml=documents.policy_yaml,
                              policy_signature=documents.policy_signature,
                              bootstrap=documents.bootstrap)

    def _deny(self, context: grpc.ServicerContext, code: grpc.StatusCode, subject: str,
              action: str, reason: str) -> NoReturn:
        self.audit.record(action, subject=shown(subject), allowed=False, reason=reason)
        context.abort(code, reason)
        raise AssertionError("context.abort raises")  # pragma: no cover

    def _check_sizes(self, context: grpc.ServicerContext, action: str, subject: str,
                     **fields: tuple[str | bytes, int]) -> None:
        """Refuse a request with a field larger than any valid one, before it is used."""
        for name, (value, limit) in fields.items():
            if len(value) > limit:
                unit = "bytes" if isinstance(value, bytes) else "characters"
                self._deny(context, grpc.StatusCode.INVALID_ARGUMENT, subject, action,
                           f"{name} is {len(value)} {unit}, more than any valid request "
                           f"carries ({limit}). Fix: send the field as the lab's client does "
                           "(hfl_lab.trust.client.TrustClient)")

    def _check_role(self, context: grpc.ServicerContext, action: str, role: str) -> None:
        if not REQUESTER_ROLE.fullmatch(role):
            self._deny(context, grpc.StatusCode.INVALID_ARGUMENT, role, action,
                       f"{shown(role) or '(no role)'!r} is not a role. Fix: ask as ps<N>, "
                       "worker<N> or owner, the role the policy names for this TD")

    # -- checkpoint heads (rollback protection) ------------------------------------------------

    def ReportCheckpointHead(self, request: Any, context: grpc.ServicerContext) -> Any:
        """Record ps0's newest checkpoint in the sealed state: only a TD attested now, with
        fresh evidence, as a PS role may report, and the head only moves forward."""
        self._require_provisioned(context)
        role = shown(request.role) or "unknown"
        head = self._reported_head(request, context, role)
        try:
            verdict, key = self._attested_reporter(request, role)
        except (HflLabError, ValueError) as e:
            self._refuse_head(context, grpc.StatusCode.PERMISSION_DENIED, role, str(e))
        if self.on_event is not None:
            self.on_event(event_for(verdict))
        if not verdict.accepted:
            self._refuse_head(context, grpc.StatusCode.PERMISSION_DENIED, role,
                              f"attestation of {role} refused: {verdict.reason}")
        digest = hashes.SHA384() if key.curve.key_size >= 384 else hashes.SHA256()
        try:
            key.verify(request.signature, head.signed_message(request.nonce), ec.ECDSA(digest))
        except InvalidSignature:
            self._refuse_head(context, grpc.StatusCode.PERMISSION_DENIED, role,
                              "the head's signature does not verify with the attested key")
        with self._lock:
            try:
                changed = self.heads.advance(head)
            except ValueError as e:
                self._refuse_head(context, grpc.StatusCode.FAILED_PRECONDITION, role, str(e))
            if changed:
                self._save_state()
            counter = self.state_counter
        self.audit.record("record_checkpoint_head", subject=role, allowed=True,
                          reason=head.describe(), volume_uuid=head.volume_uuid,
                          state_counter=counter)
        return pb.HeadReply(recorded=True, head=pb.CheckpointHead(**head.to_dict()),
                            state_counter=counter)

    def _reported_head(self, request: Any, context: grpc.ServicerContext,
                       role: str) -> CheckpointHead:
        if not PS_ROLE.match(role):
            self._refuse_head(context, grpc.StatusCode.PERMISSION_DENIED, role,
                              f"only the parameter server may report a checkpoint head, not "
                              f"{role!r}")
        if (len(request.evidence_json) > MAX_EVIDENCE_CHARS
                or len(request.public_key) > MAX_KEY_BYTES or len(request.signature) > 256
                or len(request.nonce) > MAX_NONCE_BYTES):
            self._refuse_head(context, grpc.StatusCode.INVALID_ARGUMENT, role,
                              "the head report is larger than any valid one")
        raw = request.head
        try:
            return CheckpointHead(raw.volume_uuid, int(raw.step), int(raw.index),
                                  raw.record_sha256)
        except ValueError as e:
            self._refuse_head(context, grpc.StatusCode.INVALID_ARGUMENT, role, str(e))

    def _attested_reporter(
        self, request: Any, role: str
    ) -> tuple[Verdict, ec.EllipticCurvePublicKey]:
        """The verdict on the reporter's fresh evidence (bound to its key and the nonce) and
        that key; ``HflLabError``/``ValueError`` when it cannot be checked at all."""
        with self._lock:
            policy = self.policy
        if role not in policy.roles:
            raise ValueError(f"the policy has no reference values for role {role}")
        issued_at = self.nonces.consume(request.nonce)
        evidence = Evidence.from_json(request.evidence_json)
        verdict = Verifier(policy, lab_root_der=self.lab_root_der, name="trust").verify(
            evidence, binding=key_binding(request.public_key, request.nonce),
            issued_at=issued_at, role=role, subject=role,
        )
        key = serialization.load_der_public_key(request.public_key)
        if not isinstance(key, ec.EllipticCurvePublicKey):
            raise ValueError("the reporting key is not an EC key")
        return verdict, key

    def _refuse_head(self, context: grpc.ServicerContext, code: grpc.StatusCode, role: str,
                     reason: str) -> NoReturn:
        self._deny(context, code, role, "record_checkpoint_head", reason)
        raise AssertionError("context.abort raises")  # pragma: no cover

    def GetCheckpointHead(self, request: Any, context: grpc.ServicerContext) -> Any:
        """The head recorded for a volume and the state's counter. Not secret; the pinned,
        attested channel makes the answer authentic."""
        self._require_provisioned(context)
        if len(request.volume_uuid) > MAX_NAME_CHARS:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                          f"a volume UUID is at most {MAX_NAME_CHARS} characters")
        with self._lock:
            head = self.heads.get(request.volume_uuid) if request.volume_uuid else None
            counter = self.state_counter
        if head is None:
            return pb.HeadReply(recorded=False, state_counter=counter)
        return pb.HeadReply(recorded=True, head=pb.CheckpointHead(**head.to_dict()),
                            state_counter=counter)


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
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=max_workers),
        options=[("grpc.max_receive_message_length", MAX_REQUEST_BYTES)],
    )
    rpc.add_TrustServiceServicer_to_server(service, server)  # type: ignore[no-untyped-call]
    credentials = grpc.ssl_server_credentials([(private_key_pem, certificate_pem)])
    bound = server.add_secure_port(f"{host}:{port}", credentials)
    if bound == 0:
        raise ConfigError(f"cannot listen on {host}:{port}", fix="choose a free port")
    server.start()
    return server, bound
