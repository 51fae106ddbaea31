"""Shared set-up of the P-figures: an attested mesh in one process, and its plain-TLS baselines.

:class:`LabMesh` runs a trust service over gRPC with a simulated TD platform and hands out mesh
identities, the way the local backend's participants obtain them (attest → mesh certificate).
:class:`PlainPki` makes ordinary certificates (a CA and leaf certificates, no evidence) for the
baselines: the same gRPC mutual TLS without attestation.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
from collections.abc import Callable, Iterator, Sequence
from concurrent import futures
from typing import Any

import grpc
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID

from hfl_lab._x509 import certificate_builder, common_name
from hfl_lab.ratls import RaTlsIdentity
from hfl_lab.tee import (
    AttestationPolicy,
    Collateral,
    SimulatedPlatform,
    SimulatedTdProvider,
    TdMeasurements,
    Verifier,
    measure_workload,
)
from hfl_lab.trust.client import MeshCredentials, TrustClient
from hfl_lab.trust.mesh import AttestedPeerInterceptor, PeerCheck, server_credentials
from hfl_lab.trust.service import TrustService, serve

#: same limits as the PS and its workers (trainer.ps.MAX_MESSAGE_BYTES)
MESSAGE_OPTIONS = (
    ("grpc.max_receive_message_length", 8 << 20),
    ("grpc.max_send_message_length", 8 << 20),
)
#: a new channel gets its own TCP connection and handshake, never a pooled one
FRESH_CONNECTION = (("grpc.use_local_subchannel_pool", 1),)


class LabMesh:
    """A trust service (own RA-TLS identity, simulated TD) and the lab's policy for ``roles``."""

    def __init__(self, roles: Sequence[str] = ("ps0", "worker0")) -> None:
        self.platform = SimulatedPlatform.generate()
        self.measured: dict[str, TdMeasurements] = {
            role: measure_workload(role=role) for role in ("trust", *roles)
        }
        self.admin_token = os.urandom(32)
        self.service = TrustService(
            policy=self.policy(), admin_token=self.admin_token,
            lab_root_der=self.platform.root_der,
        )
        identity = RaTlsIdentity()
        identity.make_certificate(self.provider("trust"), subject_cn="trust", role="trust")
        self.server, port = serve(self.service, identity.certificate_pem,
                                  identity.private_key_pem())
        self.address = f"127.0.0.1:{port}"
        self._client: TrustClient | None = None

    def policy(self, roles: Sequence[str] | None = None) -> AttestationPolicy:
        """The owner's policy: this code's MR_TD, each role's MR_CONFIG_ID, simulated allowed."""
        names = list(self.measured) if roles is None else list(roles)
        return AttestationPolicy.from_dict({
            "mr_td": sorted({self.measured[r].mr_td.hex() for r in names}),
            "allow_simulated": True,
            "report_data_binding": "key+nonce",
            "roles": {r: {"mr_config_id": self.measured[r].mr_config_id.hex()} for r in names},
        })

    def provider(self, role: str) -> SimulatedTdProvider:
        return SimulatedTdProvider(self.platform, self.measured[role])

    def verifier(self, name: str) -> Verifier:
        """How a participant verifies its peers: the lab root and the lab's collateral."""
        return Verifier(self.policy(), lab_root_der=self.platform.root_der, name=name,
                        lab_collateral=Collateral(self.platform.collateral_json, "lab platform"))

    def connect(self) -> TrustClient:
        """A new client, after the trust service's own attestation was verified."""
        return TrustClient.connect(self.address, self.policy(),
                                   lab_root_der=self.platform.root_der, role="trust")

    @property
    def client(self) -> TrustClient:
        if self._client is None:
            self._client = self.connect()
        return self._client

    def attest(self, role: str) -> MeshCredentials:
        """``role``'s mesh identity, as its participant obtains it at start-up."""
        return self.client.attest(role, self.provider(role))

    def peer_check(self, creds: MeshCredentials, name: str,
                   allowed: Callable[[str], bool]) -> PeerCheck:
        return PeerCheck(self.verifier(name), creds.ca_pem, allowed)

    def close(self) -> None:
        if self._client is not None:
            self._client.close()
        self.server.stop(0)

    def __enter__(self) -> LabMesh:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class PlainPki:
    """An ordinary CA and leaf certificates (P-256, like the mesh), for plain mTLS baselines."""

    def __init__(self) -> None:
        self._key = ec.generate_private_key(ec.SECP256R1())
        name = common_name("bench plain CA")
        now = dt.datetime.now(dt.UTC)
        self._name = name
        self.ca = (
            certificate_builder(name, name, self._key.public_key(),
                                now - dt.timedelta(minutes=5), now + dt.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .sign(self._key, hashes.SHA256())
        )
        self.ca_pem = self.ca.public_bytes(serialization.Encoding.PEM)

    def issue(self, cn: str) -> tuple[bytes, bytes]:
        """(private key PEM, certificate PEM) for ``cn``, valid for cn, localhost, 127.0.0.1."""
        key = ec.generate_private_key(ec.SECP256R1())
        now = dt.datetime.now(dt.UTC)
        cert = (
            certificate_builder(common_name(cn), self._name, key.public_key(),
                                now - dt.timedelta(minutes=5), now + dt.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(
                x509.ExtendedKeyUsage(
                    [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
                ),
                critical=False,
            )
            .add_extension(
                x509.SubjectAlternativeName([
                    x509.DNSName(cn), x509.DNSName("localhost"),
                    x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
                ]),
                critical=False,
            )
            .sign(self._key, hashes.SHA256())
        )
        key_pem = key.private_bytes(serialization.Encoding.PEM,
                                    serialization.PrivateFormat.PKCS8,
                                    serialization.NoEncryption())
        return key_pem, cert.public_bytes(serialization.Encoding.PEM)

    def server_credentials(self, cn: str) -> grpc.ServerCredentials:
        return grpc.ssl_server_credentials([self.issue(cn)], root_certificates=self.ca_pem,
                                           require_client_auth=True)

    def channel(self, address: str, client_cn: str, server_cn: str,
                options: Sequence[tuple[str, Any]] = ()) -> grpc.Channel:
        key_pem, cert_pem = self.issue(client_cn)
        credentials = grpc.ssl_channel_credentials(self.ca_pem, key_pem, cert_pem)
        return grpc.secure_channel(
            address, credentials,
            options=[("grpc.ssl_target_name_override", server_cn), *options],
        )


# ------------------------------------------------------------------------------ echo service


class EchoService:
    """Raw-bytes gRPC handlers: ``Echo`` (unary), ``Upload`` (client stream, kept) and
    ``Download`` (server stream of what was last uploaded). No protobuf, no copies."""

    SERVICE = "bench.Echo"

    def __init__(self) -> None:
        self.kept: list[bytes] = []

    def _echo(self, request: bytes, context: grpc.ServicerContext) -> bytes:
        return request

    def _upload(self, chunks: Iterator[bytes], context: grpc.ServicerContext) -> bytes:
        self.kept = list(chunks)
        return b"ok"

    def _download(self, request: bytes, context: grpc.ServicerContext) -> Iterator[bytes]:
        yield from self.kept

    def handler(self) -> grpc.GenericRpcHandler[Any, Any]:
        return grpc.method_handlers_generic_handler(self.SERVICE, {
            "Echo": grpc.unary_unary_rpc_method_handler(self._echo),
            "Upload": grpc.stream_unary_rpc_method_handler(self._upload),
            "Download": grpc.unary_stream_rpc_method_handler(self._download),
        })


def echo_server(credentials: grpc.ServerCredentials, *, peer_check: PeerCheck | None = None,
                max_workers: int = 16) -> tuple[grpc.Server, int, EchoService]:
    """An echo server on 127.0.0.1 (attested like the PS when ``peer_check`` is given)."""
    interceptors: list[grpc.ServerInterceptor[Any, Any]] = (
        [AttestedPeerInterceptor(peer_check)] if peer_check is not None else []
    )
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=max_workers),
                         interceptors=interceptors, options=list(MESSAGE_OPTIONS))
    service = EchoService()
    server.add_generic_rpc_handlers((service.handler(),))
    port = server.add_secure_port("127.0.0.1:0", credentials)
    server.start()
    return server, port, service


def attested_echo_server(mesh: LabMesh, creds: MeshCredentials, name: str,
                         allowed: Callable[[str], bool]) -> tuple[grpc.Server, int, PeerCheck]:
    """An echo server behind the mesh, as ``name``: mesh mTLS plus the pairwise evidence check."""
    check = mesh.peer_check(creds, name, allowed)
    server, port, _ = echo_server(server_credentials(creds), peer_check=check)
    return server, port, check


def echo(channel: grpc.Channel, payload: bytes = b"hello", timeout: float = 10.0) -> bytes:
    method = channel.unary_unary(f"/{EchoService.SERVICE}/Echo", None, None)
    result: bytes = method(payload, timeout=timeout)
    return result


def upload(channel: grpc.Channel, chunks: Sequence[bytes], timeout: float = 600.0) -> None:
    channel.stream_unary(f"/{EchoService.SERVICE}/Upload", None, None)(iter(chunks),
                                                                     timeout=timeout)


def download(channel: grpc.Channel, timeout: float = 600.0) -> int:
    total = 0
    method = channel.unary_stream(f"/{EchoService.SERVICE}/Download", None, None)
    for chunk in method(b"", timeout=timeout):
        total += len(chunk)
    return total
