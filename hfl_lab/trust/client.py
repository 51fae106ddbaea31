"""Client of the trust service: verify its attestation, pin its certificate, then talk to it."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import grpc
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from hfl_lab._exceptions import AttestationError, PolicyViolation
from hfl_lab._resources import ClosingContext
from hfl_lab.ratls.binding import key_binding
from hfl_lab.ratls.certificate import RaTlsIdentity, verify_certificate
from hfl_lab.ratls.peer import fetch_server_certificate
from hfl_lab.tee.evidence import Evidence, EvidenceProvider
from hfl_lab.tee.policy import AttestationPolicy
from hfl_lab.tee.verdict import Verdict
from hfl_lab.tee.verifier import Verifier
from hfl_lab.trust.broker import release_context
from hfl_lab.trust.enrollment import RunDocuments
from hfl_lab.trust.owner_gate import admin_metadata
from hfl_lab.trust.proto import trust_pb2 as pb
from hfl_lab.trust.proto import trust_pb2_grpc as rpc
from hfl_lab.trust.sealed import CheckpointHead
from hfl_lab.trust.wrap import WrappedSecret, unwrap_secret


@dataclass(frozen=True)
class MeshCredentials:
    """A participant's mesh identity: its in-memory key, the issued certificate, the CA."""

    identity: RaTlsIdentity
    certificate_pem: bytes
    ca_pem: bytes
    not_after: float
    verdict: dict[str, Any]

    @property
    def certificate(self) -> x509.Certificate:
        return x509.load_pem_x509_certificate(self.certificate_pem)


def _pinned_channel(address: str, cert: x509.Certificate) -> grpc.Channel:
    cn = cert.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)
    target = str(cn[0].value) if cn else "localhost"
    # The only trusted root is this exact self-signed certificate: after its evidence was
    # checked, nothing else can stand in for the server (MITM with another key is refused).
    credentials = grpc.ssl_channel_credentials(
        root_certificates=cert.public_bytes(serialization.Encoding.PEM)
    )
    return grpc.secure_channel(
        address, credentials, options=[("grpc.ssl_target_name_override", target)]
    )


class TrustClient(ClosingContext):
    """Talks to a trust service only after its RA-TLS evidence satisfied ``policy``."""

    def __init__(self, address: str, channel: grpc.Channel, verdict: Verdict) -> None:
        self.address = address
        self.channel = channel
        self.verdict = verdict
        self.stub = rpc.TrustServiceStub(channel)  # type: ignore[no-untyped-call]

    @classmethod
    def connect(
        cls,
        address: str,
        policy: AttestationPolicy,
        *,
        lab_root_der: bytes | None = None,
        role: str | None = None,
        verifier_name: str = "lab",
        on_verdict: Callable[[Verdict], None] | None = None,
    ) -> TrustClient:
        host, _, port = address.rpartition(":")
        cert = fetch_server_certificate(host, int(port))
        # A server's own RA-TLS certificate is made before any client exists, so it cannot
        # carry our nonce: its evidence must bind its key, and the pinned TLS session proves
        # the server holds that key now.
        if policy.report_data_binding == "key+nonce":
            policy = policy.replace(report_data_binding="key")
        verifier = Verifier(policy, lab_root_der=lab_root_der, name=verifier_name,
                            on_verdict=on_verdict)
        verdict = verify_certificate(cert, verifier, role=role)
        if not verdict.accepted:
            # named by the first check it failed (e.g. mr_config_id), with the values compared
            failed = verdict.failures[0] if verdict.failures else None
            raise AttestationError(
                f"the trust service at {address} failed attestation: {verdict.reason}",
                check=failed.name if failed else "trust_service",
                expected=failed.expected if failed else None,
                actual=failed.actual if failed else None,
                fix="do not hand it anything; check that the right service runs there",
            )
        return cls(address, _pinned_channel(address, cert), verdict)

    def close(self) -> None:
        self.channel.close()

    # -- participants ------------------------------------------------------------------------

    def attest(
        self, role: str, provider: EvidenceProvider, identity: RaTlsIdentity | None = None
    ) -> MeshCredentials:
        """Prove ``role``'s TD to the service and obtain a mesh certificate for its key."""
        identity = identity or RaTlsIdentity()
        nonce, evidence = self._bound_evidence(role, provider, identity)
        reply = self._call(
            self.stub.Attest,
            pb.AttestRequest(
                role=role, nonce=nonce, public_key=identity.spki_der,
                evidence_json=evidence.to_json(),
            ),
        )
        identity.certificate = x509.load_pem_x509_certificate(reply.mesh_certificate_pem)
        return MeshCredentials(identity, reply.mesh_certificate_pem, reply.ca_certificate_pem,
                               reply.not_after, json.loads(reply.verdict_json))

    def release_secret(
        self, app_id: str, name: str, role: str, provider: EvidenceProvider,
        identity: RaTlsIdentity | None = None,
    ) -> bytes:
        """Obtain a secret through attested key release; it is unwrapped in this process only."""
        identity = identity or RaTlsIdentity()
        nonce, evidence = self._bound_evidence(role, provider, identity)
        reply = self._call(
            self.stub.ReleaseSecret,
            pb.ReleaseRequest(
                app_id=app_id, name=name, role=role, nonce=nonce,
                public_key=identity.spki_der, evidence_json=evidence.to_json(),
            ),
        )
        wrapped = WrappedSecret(reply.ephemeral_public, reply.gcm_nonce, reply.ciphertext)
        return unwrap_secret(wrapped, identity.private_key, release_context(app_id, name))

    # -- checkpoint heads (rollback protection) -------------------------------------------

    def report_checkpoint_head(
        self, head: CheckpointHead, role: str, provider: EvidenceProvider,
        identity: RaTlsIdentity | None = None,
    ) -> int:
        """As the attested PS: record ``head`` as its volume's newest checkpoint (fresh evidence
        bound to a key and a challenge, the head signed with that key). Returns the sealed
        state's counter after the record."""
        identity = identity or RaTlsIdentity()
        nonce, evidence = self._bound_evidence(role, provider, identity)
        key = identity.private_key
        digest = hashes.SHA384() if key.curve.key_size >= 384 else hashes.SHA256()
        reply = self._call(
            self.stub.ReportCheckpointHead,
            pb.ReportHeadRequest(
                role=role, nonce=nonce, public_key=identity.spki_der,
                evidence_json=evidence.to_json(), head=pb.CheckpointHead(**head.to_dict()),
                signature=key.sign(head.signed_message(nonce), ec.ECDSA(digest)),
            ),
        )
        return int(reply.state_counter)

    def checkpoint_head(self, volume_uuid: str = "") -> tuple[CheckpointHead | None, int]:
        """The head recorded for ``volume_uuid`` (None when none is) and the sealed state's
        counter; an empty UUID asks for the counter only."""
        reply = self._call(self.stub.GetCheckpointHead,
                           pb.GetHeadRequest(volume_uuid=volume_uuid))
        head = None
        if reply.recorded:
            raw = reply.head
            head = CheckpointHead(raw.volume_uuid, int(raw.step), int(raw.index),
                                  raw.record_sha256)
        return head, int(reply.state_counter)

    def _bound_evidence(
        self, role: str, provider: EvidenceProvider, identity: RaTlsIdentity
    ) -> tuple[bytes, Evidence]:
        """A fresh challenge, and evidence binding it together with the identity's key."""
        challenge = self._call(self.stub.GetChallenge, pb.ChallengeRequest(role=role))
        nonce: bytes = challenge.nonce
        return nonce, provider.get_evidence(key_binding(identity.spki_der, nonce))

    # -- the lab owner --------------------------------------------------------------------

    def provision(self, admin_token: bytes) -> str:
        """Hand the service the owner's admin credential, over this channel only: ``connect``
        verified the service's evidence against the owner's policy and pinned its certificate,
        so the credential reaches that TD and nothing else. Returns the service's answer
        ("provisioned", or "already provisioned" when it has this credential already)."""
        reply = self._call(self.stub.Provision, pb.ProvisionRequest(admin_token=admin_token))
        return str(reply.detail)

    def check_open(self) -> None:
        """Return when the service serves (provisioned by its owner); otherwise raise an
        ``AttestationError`` with ``check="connection"``, which callers retry."""
        self._call(self.stub.GetCheckpointHead, pb.GetHeadRequest(volume_uuid=""))

    def install_policy(self, policy: AttestationPolicy, admin_token: bytes) -> None:
        import yaml

        self._call(
            self.stub.InstallPolicy,
            pb.InstallPolicyRequest(policy_yaml=yaml.safe_dump(policy.to_dict())),
            metadata=admin_metadata(admin_token),
        )

    def register_secret(
        self, app_id: str, name: str, secret: bytes, release_policy: AttestationPolicy,
        admin_token: bytes,
    ) -> None:
        import yaml

        self._call(
            self.stub.RegisterSecret,
            pb.RegisterSecretRequest(
                app_id=app_id, name=name, secret=secret,
                release_policy_yaml=yaml.safe_dump(release_policy.to_dict()),
            ),
            metadata=admin_metadata(admin_token),
        )

    def open_enrollment(self, enrollment_key: bytes, admin_token: bytes) -> None:
        """The owner: honour join links MAC'd with ``enrollment_key`` (a hosted run)."""
        self._call(self.stub.OpenEnrollment,
                   pb.OpenEnrollmentRequest(enrollment_key=enrollment_key),
                   metadata=admin_metadata(admin_token))

    def enroll(self, join_link: str) -> RunDocuments:
        """A joiner: present the link, receive the run's documents (see
        :mod:`hfl_lab.trust.enrollment`)."""
        reply = self._call(self.stub.Enroll, pb.EnrollRequest(join_link=join_link))
        return RunDocuments(config_yaml=reply.config_yaml, policy_yaml=reply.policy_yaml,
                            policy_signature=reply.policy_signature,
                            bootstrap=bytes(reply.bootstrap))

    def audit(self, admin_token: bytes, since: int = 0) -> Iterator[dict[str, Any]]:
        stream = self.stub.ReadAudit(
            pb.ReadAuditRequest(since=since), metadata=admin_metadata(admin_token)
        )
        try:
            for entry in stream:
                yield json.loads(entry.json)
        except grpc.RpcError as e:
            raise _translate(e) from None

    @staticmethod
    def _call(method: Any, request: Any, metadata: Any = None) -> Any:
        try:
            return method(request, metadata=metadata, timeout=30)
        except grpc.RpcError as e:
            raise _translate(e) from None


def _translate(e: grpc.RpcError) -> Exception:
    code = e.code() if hasattr(e, "code") else None
    detail = e.details() if hasattr(e, "details") else str(e)
    if code in (grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.UNAUTHENTICATED):
        return PolicyViolation(f"trust service refused: {detail}")
    message, _, fix = str(detail).partition(" Fix: ")
    if code == grpc.StatusCode.UNAVAILABLE:
        # not up yet, restarting, or not provisioned by its owner yet: worth retrying
        return AttestationError(
            f"trust service not available: {message}", check="connection",
            fix=fix or "check that the trust service is running and reachable",
        )
    if code in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.FAILED_PRECONDITION,
                grpc.StatusCode.RESOURCE_EXHAUSTED):
        return AttestationError(
            f"trust service refused the request ({code.name}): {message}",
            check="trust_service", fix=fix or "correct what the message names and retry",
        )
    return AttestationError(
        f"trust service call failed ({code.name if code else 'error'}): {detail}",
        check="trust_service",
        fix="check that the trust service is running and reachable",
    )
