"""Fetch a peer's RA-TLS certificate from its TLS handshake, before trusting anything it says."""

from __future__ import annotations

import socket
import ssl
import time

from cryptography import x509

from hfl_lab._exceptions import AttestationError, PeerUnreachable

_HANDSHAKE = 22
_CERTIFICATE = 11
_CHANGE_CIPHER_SPEC = 20


def fetch_server_certificate(host: str, port: int, timeout: float = 5.0) -> x509.Certificate:
    """The certificate the server at ``host:port`` presents (ALPN h2, nothing verified).

    Works against servers that require a client certificate: in TLS 1.3 the client has the
    server's certificate before it sends its (empty) one, and hangs up without sending it; in
    TLS 1.2 the server's Certificate message is read from the cleartext handshake records even
    when the server then aborts.
    """
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE  # the certificate is judged by its evidence, not a CA
    ctx.set_alpn_protocols(["h2"])
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = ctx.wrap_bio(incoming, outgoing, server_hostname=host)
    received = bytearray()
    where = f"{host}:{port}"
    try:
        sock = socket.create_connection((host, port), timeout=timeout)
    except OSError as e:
        raise PeerUnreachable(
            f"cannot connect to {where} to fetch its certificate ({e.strerror or e})",
            fix="check that the peer is running and listening on that address",
        ) from None
    deadline = time.monotonic() + timeout
    failure: ssl.SSLError | None = None
    with sock:
        while True:
            try:
                tls.do_handshake()
                break
            except ssl.SSLWantReadError:
                pass
            except ssl.SSLError as e:
                failure = e
                break
            try:
                if outgoing.pending:
                    sock.sendall(outgoing.read())
                sock.settimeout(max(0.01, deadline - time.monotonic()))
                data = sock.recv(65536)
            except TimeoutError:
                raise PeerUnreachable(
                    f"{where} did not complete a TLS handshake within {timeout:.1f} s",
                    fix="check that the port serves TLS (gRPC with TLS), or raise the timeout",
                ) from None
            except OSError as e:
                failure = ssl.SSLError(str(e))
                break
            if not data:
                failure = ssl.SSLError("connection closed during the handshake")
                break
            received += data
            incoming.write(data)
        # A completed TLS 1.3 handshake leaves the client's last flight (its Certificate, empty
        # here, and Finished) unsent in ``outgoing``: it is never sent. The certificate is ours
        # already, and a server that requires client certificates (ps0, every mesh server)
        # would log that flight as a failed handshake, one line per peer check in its log; a
        # connection closed before it is dropped without a word.
    if failure is None:
        der = tls.getpeercert(binary_form=True)
    else:
        der = _tls12_certificate(bytes(received))
    if not der:
        reason = f" ({getattr(failure, 'reason', None) or failure})" if failure is not None else ""
        raise PeerUnreachable(
            f"{where} did not present a TLS server certificate{reason}",
            fix="check that the port serves TLS (gRPC with TLS), not plain text",
        )
    try:
        return x509.load_der_x509_certificate(der)
    except (ValueError, x509.InvalidVersion):
        raise AttestationError(
            f"{where} presented a certificate that is not valid X.509 DER", check="certificate"
        ) from None


def _tls12_certificate(raw: bytes) -> bytes | None:
    """The first certificate of a cleartext (TLS ≤ 1.2) Certificate handshake message."""
    handshake = bytearray()
    pos = 0
    while pos + 5 <= len(raw):
        rtype, length = raw[pos], int.from_bytes(raw[pos + 3 : pos + 5], "big")
        if raw[pos + 1] != 3 or pos + 5 + length > len(raw):
            break  # not a TLS record, or cut off
        if rtype == _CHANGE_CIPHER_SPEC:
            break  # everything after this is encrypted
        if rtype == _HANDSHAKE:
            handshake += raw[pos + 5 : pos + 5 + length]
        pos += 5 + length
    pos = 0
    while pos + 4 <= len(handshake):
        mtype, length = handshake[pos], int.from_bytes(handshake[pos + 1 : pos + 4], "big")
        body = bytes(handshake[pos + 4 : pos + 4 + length])
        if len(body) < length:
            return None
        if mtype == _CERTIFICATE and len(body) >= 6:
            first = int.from_bytes(body[3:6], "big")
            return body[6 : 6 + first] if first and 6 + first <= len(body) else None
        pos += 4 + length
    return None
