"""A real trust service over gRPC/TLS for tests: start one, connect to it as the lab does.

Shared by the trust-service, vault, mesh, image and security tests, so that no test module
imports another one."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import grpc

from hfl_lab.ratls import RaTlsIdentity
from hfl_lab.trust.client import TrustClient
from hfl_lab.trust.service import TrustService, serve
from tests.td_support import LAB_ROLES, PLATFORM, lab_policy, measured, provider

MEASURED = {role: measured(role) for role in LAB_ROLES}


@dataclass
class Running:
    service: TrustService
    server: grpc.Server
    address: str
    admin: bytes
    events: list[object]


def start(tmp_path: Path, owner_key: bytes | None = None,
          identity_role: str = "trust") -> Running:
    admin = os.urandom(32)
    events: list[object] = []
    service = TrustService(
        policy=lab_policy(), admin_token=admin, lab_root_der=PLATFORM.root_der,
        on_event=events.append, state_path=tmp_path / "trust.sealed", owner_key=owner_key,
    )
    identity = RaTlsIdentity()
    identity.make_certificate(provider(identity_role), subject_cn="trust", role="trust")
    server, port = serve(service, identity.certificate_pem, identity.private_key_pem())
    return Running(service, server, f"127.0.0.1:{port}", admin, events)


def connect(r: Running) -> TrustClient:
    return TrustClient.connect(r.address, lab_policy(), lab_root_der=PLATFORM.root_der,
                               role="trust")
