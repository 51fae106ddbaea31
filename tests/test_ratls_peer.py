"""Fetching a peer's certificate from the TLS handshake, also from servers that demand ours."""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from hfl_lab._exceptions import AttestationError
from hfl_lab.ratls import RaTlsIdentity, fetch_server_certificate, read_evidence
from hfl_lab.ratls.peer import _tls12_certificate
from tests.td_support import provider


@pytest.fixture(scope="module")
def identity() -> RaTlsIdentity:
    ident = RaTlsIdentity()
    ident.make_certificate(provider("ps0"), subject_cn="ps0", role="ps0")
    return ident


@pytest.fixture
def grpc_mtls_port(identity: RaTlsIdentity) -> Iterator[int]:
    server = grpc.server(ThreadPoolExecutor(1))
    creds = grpc.ssl_server_credentials(
        [(identity.private_key_pem(), identity.certificate_pem)],
        root_certificates=identity.certificate_pem,
        require_client_auth=True,
    )
    port = server.add_secure_port("127.0.0.1:0", creds)
    server.start()
    yield port
    server.stop(None)


def test_fetches_the_exact_certificate_from_a_grpc_server_requiring_client_auth(
    identity: RaTlsIdentity, grpc_mtls_port: int
) -> None:
    cert = fetch_server_certificate("127.0.0.1", grpc_mtls_port)

    assert cert.public_bytes(serialization.Encoding.PEM) == identity.certificate_pem
    assert read_evidence(cert).spki == identity.spki_der


def test_nothing_listening_is_a_clear_error() -> None:
    # the port stays bound, not listening, for the call: a port let go before it could be
    # taken meanwhile by another process (or a server of this one) that listens on it
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]

        with pytest.raises(AttestationError, match="cannot connect") as e:
            fetch_server_certificate("127.0.0.1", port, timeout=2.0)
    assert e.value.check == "connection"


def _serve_once(reply: bytes | None) -> tuple[int, threading.Event]:
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)
    done = threading.Event()

    def run() -> None:
        with listener:
            conn, _ = listener.accept()
            with conn:
                conn.recv(4096)
                if reply is not None:
                    conn.sendall(reply)
                done.wait(5)

    threading.Thread(target=run, daemon=True).start()
    return listener.getsockname()[1], done


def test_plain_text_server_is_a_clear_error() -> None:
    port, done = _serve_once(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n")

    # a limit the server thread's reply comes well within, however late it is scheduled
    with pytest.raises(AttestationError, match="did not present a TLS server certificate"):
        fetch_server_certificate("127.0.0.1", port, timeout=60.0)
    done.set()


def test_silent_server_times_out_clearly() -> None:
    port, done = _serve_once(None)

    with pytest.raises(AttestationError, match=r"within 0\.3 s"):
        fetch_server_certificate("127.0.0.1", port, timeout=0.3)
    done.set()


def test_tls12_certificate_is_read_from_cleartext_handshake_records(
    identity: RaTlsIdentity,
) -> None:
    assert identity.certificate is not None
    der = identity.certificate.public_bytes(serialization.Encoding.DER)
    server_hello = bytes([2]) + (4).to_bytes(3, "big") + b"\x03\x03\x00\x00"
    chain = len(der).to_bytes(3, "big") + der
    certificate = (
        bytes([11]) + (len(chain) + 3).to_bytes(3, "big") + (len(chain)).to_bytes(3, "big") + chain
    )
    handshake = server_hello + certificate
    # split across records, as servers do for large certificates
    records = b"".join(
        b"\x16\x03\x03" + len(part).to_bytes(2, "big") + part
        for part in (handshake[:3000], handshake[3000:])
    )

    found = _tls12_certificate(records + b"\x15\x03\x03\x00\x02\x02\x2a")

    assert (
        found is not None
        and x509.load_der_x509_certificate(found).public_bytes(serialization.Encoding.DER) == der
    )
    assert _tls12_certificate(b"HTTP/1.1 400") is None
