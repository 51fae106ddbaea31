"""A real OCI registry for one run: Debian's ``docker-registry`` on loopback, TLS from a lab CA.

The CA and the registry's TLS key are made in memory; the CA's key signs the server certificate
and is dropped, and the server's key reaches ``docker-registry`` as an in-memory fd
(``REGISTRY_HTTP_TLS_KEY=/dev/fd/N``), so neither is ever in a file. The folder keeps the
public parts (``certs.d/ca.crt`` for clients, ``tls/server.crt``), the config
(``config.yml``, no secrets), the storage (``storage/``) and the log (``registry.log``).
:meth:`LabRegistry.close` stops it, and so does the end of this process, however it ends (the
registry's shell watches a pipe this process holds).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import hashlib
import ipaddress
import os
import signal
import ssl
import subprocess
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from hfl_lab._exceptions import ImageError
from hfl_lab._ports import free_listen_port
from hfl_lab._resources import ClosingContext
from hfl_lab._x509 import certificate_builder, common_name
from hfl_lab.image.tools import ToolRunner, secret_fd

__all__ = ["LabRegistry", "RegistryTarget"]

_HOST = "127.0.0.1"
# The registry runs under a shell that also reads its stdin, a pipe this process holds: when
# this process ends, even by SIGKILL (no teardown), the pipe closes and the registry is stopped,
# as a participant stops when its launcher's pipe closes. The shell exits with the registry.
# (A background job's stdin is /dev/null, so the watcher reads a copy, made once the registry
# has started: the copy's number cannot clobber the key's descriptor in the registry.)
# Stopped (SIGTERM to the group, LabRegistry.close), the shell passes the stop on and exits only
# once the registry and the watcher have: close() waits for the shell, so nothing of the
# registry is left when it returns (the shell died at once and the registry, stopping on its
# own time, could still be running then). Its exit code is the registry's, or 143 when stopped.
_LIFELINE = (
    '"$@" </dev/null & registry=$!; exec 7<&0; '
    '(cat <&7 >/dev/null; kill "$registry" 2>/dev/null) & lifeline=$!; exec 7<&-; '
    'trap \'kill "$registry" "$lifeline" 2>/dev/null\' TERM; '
    'wait "$registry"; status=$?; kill "$lifeline" 2>/dev/null; '
    'until wait; do :; done; exit "$status"'
)


@dataclass(frozen=True)
class RegistryTarget:
    """A registry the owner pushes to and checks the pushed image in: the run's own
    (:attr:`LabRegistry.target`) or the user's, for a cluster (``host[:port]``). ``cert_dir``
    holds the CA certificates its TLS is checked with (skopeo's ``--cert-dir``; an empty folder:
    the system's CAs alone); ``tls_verify=False`` only for a registry without TLS (a test
    cluster's)."""

    address: str
    cert_dir: Path
    tls_verify: bool = True

    def flags(self, side: str) -> list[str]:
        """skopeo's TLS options for this registry as the ``src`` or ``dest`` of a copy."""
        flags = [f"--{side}-cert-dir", str(self.cert_dir)]
        return flags if self.tls_verify else [*flags, f"--{side}-tls-verify=false"]


def _lab_tls() -> tuple[bytes, bytes, bytes]:
    """(CA certificate PEM, server certificate PEM, server key PEM), made in memory."""
    now = dt.datetime.now(dt.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = common_name("hfl-lab registry CA", "HFL-TDX Lab")
    ca = (certificate_builder(ca_name, ca_name, ca_key.public_key(),
                              now - dt.timedelta(minutes=5), now + dt.timedelta(days=2))
          .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
          .sign(ca_key, hashes.SHA256()))
    key = ec.generate_private_key(ec.SECP256R1())
    server = (certificate_builder(common_name("localhost"), ca_name, key.public_key(),
                                  now - dt.timedelta(minutes=5), now + dt.timedelta(days=2))
              .add_extension(x509.SubjectAlternativeName(
                  [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address(_HOST))]),
                  critical=False)
              .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
              .sign(ca_key, hashes.SHA256()))
    del ca_key
    pem = serialization.Encoding.PEM
    return (ca.public_bytes(pem), server.public_bytes(pem),
            key.private_bytes(pem, serialization.PrivateFormat.PKCS8,
                              serialization.NoEncryption()))


class LabRegistry(ClosingContext):
    """``docker-registry`` serving ``folder/storage`` on ``127.0.0.1:<port>`` over TLS."""

    def __init__(self, folder: Path, runner: ToolRunner, *, start_timeout_s: float = 20.0):
        self.folder = Path(folder)
        self.runner = runner
        self.start_timeout_s = start_timeout_s
        self.port = 0
        self.cert_dir = self.folder / "certs.d"
        self.config_path = self.folder / "config.yml"
        self.log_path = self.folder / "registry.log"
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def address(self) -> str:
        return f"{_HOST}:{self.port}"

    @property
    def target(self) -> RegistryTarget:
        return RegistryTarget(self.address, self.cert_dir)

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def start(self) -> LabRegistry:
        """Start it and wait until it answers ``/v2/`` over TLS with the lab CA."""
        if self.running:
            return self
        ca_pem, server_pem, key_pem = _lab_tls()
        (self.folder / "storage").mkdir(parents=True, exist_ok=True)
        (self.folder / "tls").mkdir(exist_ok=True)
        self.cert_dir.mkdir(exist_ok=True)
        (self.cert_dir / "ca.crt").write_bytes(ca_pem)
        server_cert = self.folder / "tls" / "server.crt"
        server_cert.write_bytes(server_pem)
        self.port = free_listen_port(_HOST)  # written into its configuration first
        self.config_path.write_text(
            "# docker-registry for one lab run (hfl_lab.image.registry). The TLS key is not in\n"
            "# a file: it is handed over as an in-memory fd (REGISTRY_HTTP_TLS_KEY=/dev/fd/N).\n"
            "version: 0.1\n"
            "log:\n  level: warn\n"
            f"storage:\n  filesystem:\n    rootdirectory: {self.folder / 'storage'}\n"
            "  delete:\n    enabled: true\n"
            f"http:\n  addr: {self.address}\n  tls:\n    certificate: {server_cert}\n"
        )
        argv = ["docker-registry", "serve", str(self.config_path)]
        started = time.monotonic()
        with secret_fd(key_pem) as fd, open(self.log_path, "ab") as log:
            self._process = self.runner.spawn(
                "registry", ["sh", "-c", _LIFELINE, "hfl-lab-registry", *argv], log=log,
                tool="docker-registry",
                env={"REGISTRY_HTTP_TLS_KEY": f"/dev/fd/{fd}"}, pass_fds=(fd,))
            del key_pem
            self._wait_until_serving(ca_pem)
        self.runner.record("registry", argv, time.monotonic() - started,
                           "sha256:" + hashlib.sha256(ca_pem).hexdigest())
        return self

    def _wait_until_serving(self, ca_pem: bytes) -> None:
        context = ssl.create_default_context(cadata=ca_pem.decode())
        deadline = time.monotonic() + self.start_timeout_s
        while True:
            assert self._process is not None
            if self._process.poll() is not None:
                tail = self.log_path.read_text(errors="replace").strip().splitlines()[-1:]
                raise ImageError(
                    f"docker-registry exited with code {self._process.returncode} at start: "
                    f"{tail[0] if tail else '(no output)'}",
                    fix=f"read {self.log_path}; the line above names the cause.")
            try:
                with urllib.request.urlopen(  # https, our loopback registry
                        f"https://{self.address}/v2/", context=context, timeout=2) as answer:
                    if answer.status == 200:
                        return
            except (urllib.error.URLError, OSError):
                pass
            if time.monotonic() > deadline:
                self.close()
                raise ImageError(
                    f"docker-registry did not serve on {self.address} within "
                    f"{self.start_timeout_s:.0f} s.",
                    fix=f"read {self.log_path}; on a busy machine retry.")
            time.sleep(0.05)

    def close(self) -> None:
        """Stop the registry (SIGTERM, then SIGKILL); its storage stays in the folder."""
        process, self._process = self._process, None
        if process is None:
            return
        if process.stdin is not None:
            process.stdin.close()  # the lifeline: the shell stops the registry
        if process.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=10)

    def __repr__(self) -> str:
        return f"LabRegistry({self.address}, running={self.running})"
