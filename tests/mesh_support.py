"""An attested mesh inside one test process: a real trust service over gRPC/TLS, mesh
identities for ps0 and the workers (simulated TDs), and the PS served behind the peer check."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc

from hfl_lab.tee import AttestationPolicy, Verifier
from hfl_lab.trust.client import MeshCredentials
from hfl_lab.trust.mesh import PeerCheck
from tests.td_support import lab_policy, lab_verifier, provider
from tests.trust_support import Running, connect, start
from trainer.ps import ParameterServer
from trainer.ps_server import serve_ps, worker_peers
from trainer.serving import channel_factory


@dataclass
class Mesh:
    trust: Running
    policy: AttestationPolicy
    creds: dict[str, MeshCredentials]
    servers: list[grpc.Server] = field(default_factory=list)
    last_address: str = ""

    def verifier(self, name: str, on_verdict: Callable[[Any], None] | None = None) -> Verifier:
        return lab_verifier(name, self.policy, on_verdict=on_verdict)

    def serve(self, servicer: ParameterServer, num_workers: int) -> str:
        """Serve ``servicer`` as ps0; returns its address."""
        check = PeerCheck(self.verifier("ps0"), self.creds["ps0"].ca_pem,
                          worker_peers(num_workers))
        server, port = serve_ps(servicer, self.creds["ps0"], check)
        self.servers.append(server)
        self.last_address = f"127.0.0.1:{port}"
        return self.last_address

    def connect(self, role: str, address: str) -> Callable[[], grpc.Channel]:
        """Attested channels from ``role`` to ps0 (the PS's evidence checked every time)."""
        return channel_factory(address, self.creds[role], self.verifier(role))

    def close(self) -> None:
        for server in self.servers:
            server.stop(0)
        self.trust.server.stop(0)


def start_mesh(tmp_path: Path, workers: int, cert_lifetime_s: float = 600.0) -> Mesh:
    roles = ["ps0", *(f"worker{i}" for i in range(workers))]
    policy = lab_policy("trust", *roles)
    trust = start(tmp_path)
    trust.service.policy = policy
    trust.service.cert_lifetime_s = cert_lifetime_s
    creds = {}
    with connect(trust) as client:
        for role in roles:
            creds[role] = client.attest(role, provider(role))
    return Mesh(trust, policy, creds)


def mesh_fixture(tmp_path: Path, workers: int) -> Iterator[Mesh]:
    mesh = start_mesh(tmp_path, workers)
    try:
        yield mesh
    finally:
        mesh.close()
