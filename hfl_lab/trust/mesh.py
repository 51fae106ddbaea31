"""Attested channels between participants: mutual TLS with mesh certificates, plus a pairwise
re-check of the peer's embedded evidence before any handler runs or any request is sent."""

from __future__ import annotations

import hashlib
import threading
from collections.abc import Callable, Collection, Sequence
from typing import Any

import grpc
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization

from hfl_lab._exceptions import AttestationError, HflLabError
from hfl_lab._x509 import peer_certificate
from hfl_lab.ratls.certificate import verify_certificate
from hfl_lab.ratls.peer import fetch_server_certificate
from hfl_lab.tee.verdict import Verdict
from hfl_lab.tee.verifier import Verifier
from hfl_lab.trust.client import MeshCredentials


def role_of(cert: x509.Certificate) -> str:
    cn = cert.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)
    return str(cn[0].value) if cn else ""


def issued_by(cert: x509.Certificate, ca_pem: bytes) -> bool:
    ca = x509.load_pem_x509_certificate(ca_pem)
    try:
        cert.verify_directly_issued_by(ca)
    except (ValueError, TypeError, InvalidSignature):
        return False
    return True


def server_credentials(creds: MeshCredentials) -> grpc.ServerCredentials:
    """mTLS: only clients with a certificate from the mesh CA complete the handshake."""
    return grpc.ssl_server_credentials(
        [(creds.identity.private_key_pem(), creds.certificate_pem)],
        root_certificates=creds.ca_pem,
        require_client_auth=True,
    )


def dynamic_server_credentials(current: Callable[[], MeshCredentials]) -> grpc.ServerCredentials:
    """mTLS whose certificate follows ``current()``: a renewed mesh certificate is served from
    the next new connection on, without restarting the server."""

    def config_of(creds: MeshCredentials) -> Any:
        return grpc.ssl_server_certificate_configuration(
            [(creds.identity.private_key_pem(), creds.certificate_pem)],
            root_certificates=creds.ca_pem,
        )

    served = [current()]

    def fetch() -> Any:
        latest = current()
        if latest is served[0]:
            return None  # keep the current configuration
        served[0] = latest
        return config_of(latest)

    return grpc.dynamic_ssl_server_credentials(
        config_of(served[0]), fetch, require_client_authentication=True
    )


#: the check a peer fails whose certificate another mesh CA issued
MESH_CA_CHECK = "mesh_ca"


class PeerCheck:
    """Verifies a peer's mesh certificate and its embedded evidence, once per certificate."""

    def __init__(
        self,
        verifier: Verifier,
        ca_pem: bytes,
        allowed_roles: Callable[[str], bool],
        on_refusal: Callable[[str], None] | None = None,
    ) -> None:
        self.verifier = verifier
        self.ca_pem = ca_pem
        self.allowed_roles = allowed_roles
        self.on_refusal = on_refusal
        self._accepted: dict[str, Verdict] = {}
        self._lock = threading.Lock()
        self.refused = 0

    def check(self, cert: x509.Certificate) -> Verdict:
        """The verdict; raises ``AttestationError`` when the peer must not be served."""
        fingerprint = hashlib.sha256(cert.public_bytes(serialization.Encoding.DER)).hexdigest()
        with self._lock:
            cached = self._accepted.get(fingerprint)
        if cached is not None and cert.not_valid_after_utc.timestamp() > self.verifier.clock():
            return cached
        role = role_of(cert)
        reason, check = "", "peer"
        verdict: Verdict | None = None
        if not issued_by(cert, self.ca_pem):
            # also what a restarted trust service (a new mesh CA) looks like to a participant
            # that still holds the old one: it attests again (Worker._reconnect)
            reason, check = "certificate not issued by this lab's mesh CA", MESH_CA_CHECK
        elif not self.allowed_roles(role):
            reason = f"role {role or '(none)'} may not use this service"
        else:
            try:
                # a role the policy does not name has no reference values of its own: its
                # evidence would be judged by the defaults every role shares
                self.verifier.policy.require_role(role, "mesh certificate refused")
                verdict = verify_certificate(cert, self.verifier, role=role)
            except HflLabError as e:
                reason = str(e)
            else:
                if not verdict.accepted:
                    reason = verdict.reason
        if reason or verdict is None:
            with self._lock:
                self.refused += 1
            if self.on_refusal is not None:
                self.on_refusal(reason)
            raise AttestationError(f"peer {role or '?'} refused: {reason}", check=check)
        with self._lock:
            self._accepted[fingerprint] = verdict
        return verdict

    def forget(self) -> None:
        """Drop cached verdicts (after a policy change or re-attestation)."""
        with self._lock:
            self._accepted.clear()


class AttestedPeerInterceptor(grpc.ServerInterceptor):  # type: ignore[type-arg]
    """Runs ``PeerCheck`` on the caller's certificate before the handler of every RPC."""

    def __init__(self, peer_check: PeerCheck) -> None:
        self.peer_check = peer_check

    def intercept_service(self, continuation: Any, handler_call_details: Any) -> Any:
        handler = continuation(handler_call_details)
        if handler is None:
            return None
        check = self.peer_check

        def guard(behavior: Callable[..., Any]) -> Callable[..., Any]:
            def guarded(request_or_iterator: Any, context: grpc.ServicerContext) -> Any:
                pem = bytes((context.auth_context().get("x509_pem_cert") or [b""])[0])
                try:
                    check.check(peer_certificate(pem))
                except (HflLabError, ValueError) as e:
                    context.abort(grpc.StatusCode.PERMISSION_DENIED, str(e))
                return behavior(request_or_iterator, context)

            return guarded

        kinds = ("unary_unary", "unary_stream", "stream_unary", "stream_stream")
        for kind in kinds:
            behavior = getattr(handler, kind)
            if behavior is not None:
                return handler._replace(**{kind: guard(behavior)})
        return handler


def attested_channel(
    address: str,
    creds: MeshCredentials,
    verifier: Verifier,
    expected_role: str,
    options: Sequence[tuple[str, Any]] = (),
) -> tuple[grpc.Channel, Verdict]:
    """Verify the server's mesh certificate and evidence first; then open an mTLS channel."""
    host, _, port = address.rpartition(":")
    server_cert = fetch_server_certificate(host, int(port))
    check = PeerCheck(verifier, creds.ca_pem, lambda role: role == expected_role)
    verdict = check.check(server_cert)
    credentials = grpc.ssl_channel_credentials(
        root_certificates=creds.ca_pem,
        private_key=creds.identity.private_key_pem(),
        certificate_chain=creds.certificate_pem,
    )
    channel_options = [("grpc.ssl_target_name_override", expected_role), *options]
    return grpc.secure_channel(address, credentials, options=channel_options), verdict


def roles(*names: str, prefixes: Collection[str] = ()) -> Callable[[str], bool]:
    """A role predicate: exact names, or any name starting with one of ``prefixes``."""
    return lambda role: role in names or any(role.startswith(p) for p in prefixes)
