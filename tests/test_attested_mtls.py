"""Attested mTLS between participants: nothing reaches a handler without a good mesh identity."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path

import grpc
import pytest
from cryptography.hazmat.primitives.serialization import Encoding

from hfl_lab import AttestationError
from hfl_lab._x509 import peer_certificate
from hfl_lab.ratls import RaTlsIdentity
from hfl_lab.tee import Verifier, measure_workload
from hfl_lab.trust.client import MeshCredentials
from hfl_lab.trust.mesh import (
    AttestedPeerInterceptor,
    PeerCheck,
    attested_channel,
    roles,
    server_credentials,
)
from hfl_lab.trust.service import TrustService, serve
from tests.td_support import lab_policy, lab_verifier, provider
from tests.trust_support import Running, connect, start

calls: list[str] = []

#: the `mesh` fixture: trust service, ps0's credentials, its server, port and peer check
Mesh = tuple[Running, MeshCredentials, grpc.Server, int, PeerCheck]


def _echo(request: bytes, context: grpc.ServicerContext) -> bytes:
    calls.append("echo")
    return request


def ps_server(creds: MeshCredentials, verifier: Verifier) -> tuple[grpc.Server, int, PeerCheck]:
    check = PeerCheck(verifier, creds.ca_pem, roles(prefixes=("worker",)))
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=4), interceptors=[AttestedPeerInterceptor(check)]
    )
    handler = grpc.method_handlers_generic_handler(
        "test.Echo", {"Echo": grpc.unary_unary_rpc_method_handler(_echo)}
    )
    server.add_generic_rpc_handlers((handler,))
    port = server.add_secure_port("127.0.0.1:0", server_credentials(creds))
    server.start()
    return server, port, check


def call(channel: grpc.Channel) -> bytes:
    method = channel.unary_unary("/test.Echo/Echo", None, None)
    # a deadline far past any handshake: the codes asserted come from the handshake and the
    # interceptor, which a busy machine can slow past a short deadline (DEADLINE_EXCEEDED)
    result: bytes = method(b"gradient", timeout=60)
    return result


@pytest.fixture()
def mesh(tmp_path: Path) -> Iterator[Mesh]:
    trust = start(tmp_path)
    with connect(trust) as client:
        ps = client.attest("ps0", provider("ps0"))
    verifier = lab_verifier("ps0")
    server, port, check = ps_server(ps, verifier)
    calls.clear()
    yield trust, ps, server, port, check
    server.stop(0)
    trust.server.stop(0)


def _creds_channel(port: int, ca_pem: bytes, key_pem: bytes | None,
                   cert_pem: bytes | None) -> grpc.Channel:
    credentials = grpc.ssl_channel_credentials(ca_pem, key_pem, cert_pem)
    return grpc.secure_channel(f"127.0.0.1:{port}", credentials,
                               options=[("grpc.ssl_target_name_override", "ps0")])


def test_attested_worker_reaches_the_handler(mesh: Mesh) -> None:
    trust, _ps, _server, port, _check = mesh
    with connect(trust) as client:
        worker = client.attest("worker0", provider("worker0"))
    verifier = lab_verifier("worker0")

    channel, verdict = attested_channel(f"127.0.0.1:{port}", worker, verifier, "ps0")

    assert verdict.accepted
    assert call(channel) == b"gradient"
    assert calls == ["echo"]


@pytest.mark.parametrize("case", ["no_certificate", "self_signed_ratls", "foreign_ca"])
def test_clients_without_a_mesh_certificate_fail_the_handshake(
    mesh: Mesh, tmp_path: Path, case: str
) -> None:
    _trust, ps, _server, port, _check = mesh
    if case == "no_certificate":
        channel = _creds_channel(port, ps.ca_pem, None, None)
    elif case == "self_signed_ratls":
        ident = RaTlsIdentity()
        ident.make_certificate(provider("worker0"), subject_cn="worker0", role="worker0")
        channel = _creds_channel(port, ps.ca_pem, ident.private_key_pem(), ident.certificate_pem)
    else:
        other = start(tmp_path / "other")  # another lab: its own CA
        with connect(other) as client:
            foreign = client.attest("worker0", provider("worker0"))
        other.server.stop(0)
        channel = _creds_channel(port, ps.ca_pem, foreign.identity.private_key_pem(),
                                 foreign.certificate_pem)

    with pytest.raises(grpc.RpcError) as err:
        call(channel)

    assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    assert calls == []


def test_wrong_role_and_wrong_measurements_are_denied_before_the_handler(
    mesh: Mesh,
) -> None:
    trust, ps, _server, port, check = mesh
    service: TrustService = trust.service
    # A lenient policy at the trust service (e.g. an old one) issues a certificate for a
    # tampered worker; the PS re-checks the evidence itself and refuses it.
    tampered = measure_workload(role="worker0")
    tampered.mr_td = os.urandom(48)
    service.policy = lab_policy(mr_td="any")
    with connect(trust) as client:
        bad = client.attest("worker0", provider("worker0", tampered))
        other_ps = client.attest("ps0", provider("ps0"))

    for creds in (bad, other_ps):
        channel = _creds_channel(port, ps.ca_pem, creds.identity.private_key_pem(),
                                 creds.certificate_pem)
        with pytest.raises(grpc.RpcError) as err:
            call(channel)
        assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED

    assert calls == []
    assert check.refused == 2


def test_expired_mesh_certificate_fails_the_handshake(tmp_path: Path) -> None:
    trust = start(tmp_path)
    trust.service.cert_lifetime_s = 1
    with connect(trust) as client:
        ps = client.attest("ps0", provider("ps0"))
        trust.service.cert_lifetime_s = 600
        worker = client.attest("worker0", provider("worker0"))
        trust.service.cert_lifetime_s = 1
        expired = client.attest("worker0", provider("worker0"))
    verifier = lab_verifier()
    trust.service.cert_lifetime_s = 600
    with connect(trust) as client:
        ps = client.attest("ps0", provider("ps0"))
    server, port, _ = ps_server(ps, verifier)
    calls.clear()
    time.sleep(2.5)
    try:
        good = _creds_channel(port, ps.ca_pem, worker.identity.private_key_pem(),
                              worker.certificate_pem)
        assert call(good) == b"gradient"
        stale = _creds_channel(port, ps.ca_pem, expired.identity.private_key_pem(),
                               expired.certificate_pem)
        with pytest.raises(grpc.RpcError):
            call(stale)
    finally:
        server.stop(0)
        trust.server.stop(0)
    assert calls == ["echo"]


def test_client_refuses_a_mitm_server_before_sending(mesh: Mesh) -> None:
    trust, _ps, _server, _port, _check = mesh
    with connect(trust) as client:
        worker = client.attest("worker0", provider("worker0"))
    impostor = RaTlsIdentity()
    impostor.make_certificate(provider("worker0"), subject_cn="ps0", role="ps0")
    rogue, rogue_port = serve(trust.service, impostor.certificate_pem,
                              impostor.private_key_pem())
    verifier = lab_verifier()
    try:
        with pytest.raises(AttestationError, match="refused"):
            attested_channel(f"127.0.0.1:{rogue_port}", worker, verifier, "ps0")
    finally:
        rogue.stop(0)


def test_a_callers_certificate_is_parsed_once_and_checked_on_every_call(mesh: Mesh) -> None:
    """``peer_certificate`` caches the parse by the exact PEM bytes: the same bytes give the
    same certificate, other bytes their own, and the peer check still runs on every call (an
    expired certificate is refused even though its parse is cached)."""
    trust, ps, _server, _port, check = mesh
    pem = ps.certificate_pem
    assert peer_certificate(pem) is peer_certificate(bytes(pem))
    with connect(trust) as client:
        other = client.attest("worker0", provider("worker0")).certificate_pem
    assert peer_certificate(other) is not peer_certificate(pem)
    assert peer_certificate(other).public_bytes(Encoding.PEM) == other
    with pytest.raises(ValueError):
        peer_certificate(b"-----BEGIN CERTIFICATE-----\nnot one\n-----END CERTIFICATE-----\n")
    worker = peer_certificate(other)
    assert check.check(worker).accepted
    later = check.verifier.clock
    check.verifier.clock = lambda: worker.not_valid_after_utc.timestamp() + 1
    try:
        with pytest.raises(AttestationError):
            check.check(peer_certificate(other))
    finally:
        check.verifier.clock = later
