"""R8, issue 18 item 6: a role is one the policy names, never a fallback to its defaults.

A policy's top-level reference values are what its roles share (the lab's MR_TD); what tells
the roles apart is each role's own entry (its MR_CONFIG_ID). So a request for a role the
policy does not name (none, ``anything``, ``owner`` without an ``owner`` entry) must be
refused: judged by the shared defaults alone, any TD running the lab's code would pass, and a
worker's TD would receive the PS's secret or an ``owner`` mesh certificate (which ps0 admits to
``WatchEvents`` and ``Status``). And the owner cannot register a secret under a release policy
that would do the same (no role named, a role's configuration left open, DEBUG or simulated
TDs where the service's own policy forbids them, evidence not bound to the requester's key).

Everything runs against the real trust service over gRPC/TLS and a real PS on the attested
mesh, with simulated TDs; the figures are the servers' own counters.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
import yaml
from cryptography.hazmat.primitives.serialization import Encoding

from hfl_lab.ratls import RaTlsIdentity, key_binding
from hfl_lab.tee import AttestationPolicy, SimulatedTdProvider
from hfl_lab.trust.broker import DEFAULT_APP_ID
from hfl_lab.trust.client import MeshCredentials, TrustClient
from hfl_lab.trust.proto import trust_pb2 as tpb
from hfl_lab.trust.service import admin_metadata
from hfl_lab.vault import volume_release_policy
from tests.mesh_support import Mesh, start_mesh
from tests.reliability_report import record
from tests.td_support import lab_policy, measured, provider
from tests.trust_support import Running, connect, start
from trainer.aggregation import Mode
from trainer.optim import MomentumSGD
from trainer.proto import parameter_server_pb2 as pb
from trainer.proto import parameter_server_pb2_grpc as ps_rpc
from trainer.ps import ParameterServer, PsOptions
from trainer.tensors import TensorSpec

SECRET = "role-bound"
#: every role's measurements, once (as tests.test_trust_service does for the lab roles)
MEASURED = {role: measured(role) for role in ("trust", "ps0", "worker0", "worker1", "owner")}


@pytest.fixture()
def trust(tmp_path: Path) -> Iterator[Running]:
    running = start(tmp_path, owner_key=os.urandom(32))
    yield running
    running.server.stop(0)


def tiny_ps(workers: int = 2, total_steps: int = 10) -> ParameterServer:
    """A parameter server over one small tensor: the RPC surface without a model."""
    spec = TensorSpec("w", "float32", (4,))
    return ParameterServer([spec], {"w": np.zeros(4, np.float32)}, MomentumSGD([], 0.1),
                           PsOptions(mode=Mode.SYNC, num_workers=workers,
                                     total_steps=total_steps))


def ask(client: TrustClient, what: str, role: str, prov: SimulatedTdProvider) -> grpc.StatusCode:
    """Attest (``what="attest"``) or ask for the secret as ``role`` with ``prov``'s evidence
    bound to a fresh key and challenge; the status code the service answered with."""
    identity = RaTlsIdentity()
    nonce = client.stub.GetChallenge(tpb.ChallengeRequest(role=role), timeout=30).nonce
    evidence = prov.get_evidence(key_binding(identity.spki_der, nonce)).to_json()
    try:
        if what == "attest":
            client.stub.Attest(tpb.AttestRequest(role=role, nonce=nonce,
                                                 public_key=identity.spki_der,
                                                 evidence_json=evidence), timeout=30)
        else:
            client.stub.ReleaseSecret(tpb.ReleaseRequest(
                app_id=DEFAULT_APP_ID, name=SECRET, role=role, nonce=nonce,
                public_key=identity.spki_der, evidence_json=evidence), timeout=30)
    except grpc.RpcError as e:
        assert e.details(), "every refusal says why"
        return e.code()
    return grpc.StatusCode.OK


def register(
    client: TrustClient, running: Running, policy: AttestationPolicy
) -> grpc.RpcError | None:
    """Register the secret under ``policy`` through the admin API; the refusal, if any."""
    try:
        client.stub.RegisterSecret(
            tpb.RegisterSecretRequest(app_id=DEFAULT_APP_ID, name=SECRET, secret=os.urandom(32),
                                      release_policy_yaml=yaml.safe_dump(policy.to_dict())),
            metadata=admin_metadata(running.admin), timeout=30)
    except grpc.RpcError as e:
        return e
    return None


@pytest.mark.parametrize("role", ["", "anything", "worker0", "ps1"])
def test_a_secret_goes_only_to_a_role_its_release_policy_names(trust: Running, role: str) -> None:
    # Arrange: the secret is ps0's (the lab's code, ps0's configuration); worker0's TD runs
    # the same code, so the policy's shared defaults alone would let its evidence through
    with connect(trust) as client:
        assert register(client, trust, lab_policy("ps0")) is None
        assert ask(client, "release", "ps0", provider("ps0")) == grpc.StatusCode.OK
        before = trust.service.broker.released

        # Act: worker0's genuine evidence asks as a role the release policy does not name
        code = ask(client, "release", role, provider("worker0"))

    released = trust.service.broker.released - before
    refused = trust.service.audit.entries[-1]
    record("R8", f"secret asked as role {role or '(none)'!r} with a worker's evidence",
           held=int(released == 0 and code != grpc.StatusCode.OK), lost=0,
           secrets_released=released, certificates_wrongly_issued=0)
    assert released == 0
    assert code in (grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.INVALID_ARGUMENT), code
    assert refused["action"] == "release_secret" and refused["allowed"] is False


def test_owner_certificates_need_an_owner_entry_in_the_policy(trust: Running) -> None:
    # Arrange: the service's policy names trust, ps0 and worker0, no owner
    assert "owner" not in trust.service.policy.roles
    with connect(trust) as client:
        # Act: worker0's TD asks for an owner certificate; then the owner gets an entry
        unnamed = ask(client, "attest", "owner", provider("worker0"))
        why = trust.service.audit.entries[-1]["reason"]
        wrongly_issued = trust.service.issued
        trust.service.policy = lab_policy("trust", "ps0", "worker0", "owner")
        impostor = ask(client, "attest", "owner", provider("worker0"))
        wrongly_issued += trust.service.issued
        genuine = ask(client, "attest", "owner", provider("owner"))

    record("R8", "owner certificate for a worker's evidence", held=int(wrongly_issued == 0),
           lost=0, secrets_released=0, certificates_wrongly_issued=wrongly_issued)
    assert unnamed == grpc.StatusCode.PERMISSION_DENIED
    assert "names no role 'owner'" in why and "roles.owner" in why, why
    assert impostor == grpc.StatusCode.PERMISSION_DENIED
    assert wrongly_issued == 0
    assert genuine == grpc.StatusCode.OK and trust.service.issued == 1  # the owner's own TD


def owner_certificate_for(mesh: Mesh, prov: SimulatedTdProvider) -> MeshCredentials:
    """An ``owner`` certificate the mesh CA signed for ``prov``'s evidence without the trust
    service's checks (a bypassed issuance): what only the PS's own peer check can stop."""
    identity = RaTlsIdentity()
    nonce = os.urandom(32)
    evidence = prov.get_evidence(key_binding(identity.spki_der, nonce))
    ca = mesh.trust.service.ca
    cert = ca.issue("owner", identity.spki_der, evidence, nonce, 600)
    return MeshCredentials(identity, cert.public_bytes(Encoding.PEM), ca.certificate_pem,
                           cert.not_valid_after_utc.timestamp(), {})


def test_ps_refuses_an_owner_certificate_its_policy_does_not_name(tmp_path: Path) -> None:
    mesh = start_mesh(tmp_path, workers=2)  # the mesh policy: trust, ps0, worker0, worker1
    servicer = tiny_ps()
    try:
        address = mesh.serve(servicer, num_workers=2)
        forged = owner_certificate_for(mesh, provider("worker0"))
        channel = grpc.secure_channel(
            address, grpc.ssl_channel_credentials(forged.ca_pem, forged.identity.private_key_pem(),
                                                  forged.certificate_pem),
            options=[("grpc.ssl_target_name_override", "ps0")])
        stub = ps_rpc.ParameterServerStub(channel)
        codes = {}
        for name, call in {
            "Status": lambda: stub.Status(pb.StatusRequest(), timeout=30),
            "WatchEvents": lambda: next(iter(stub.WatchEvents(pb.WatchRequest(), timeout=30))),
        }.items():
            try:
                call()
            except grpc.RpcError as e:
                codes[name] = e.code()
            else:
                codes[name] = grpc.StatusCode.OK
        channel.close()
    finally:
        servicer.close()
        mesh.close()

    admitted = sum(code == grpc.StatusCode.OK for code in codes.values())
    record("R8", "owner certificate of a worker TD at ps0", held=int(admitted == 0), lost=0,
           secrets_released=0, certificates_wrongly_issued=0, admitted_calls=admitted)
    assert codes == {"Status": grpc.StatusCode.PERMISSION_DENIED,
                     "WatchEvents": grpc.StatusCode.PERMISSION_DENIED}


def _release_policies() -> dict[str, AttestationPolicy]:
    ps0 = measured("ps0")
    shared = {"mr_td": ps0.mr_td.hex(), "allow_simulated": True,
              "report_data_binding": "key+nonce"}
    named = {"ps0": {"mr_config_id": ps0.mr_config_id.hex()}}
    return {
        # ps0's values at the top and no role: any role asked for falls back to them
        "names no role": AttestationPolicy.from_dict({**shared, **named["ps0"]}),
        "names a role nobody can ask as": AttestationPolicy.from_dict(
            {**shared, "roles": {**named, "anything": named["ps0"]}}),
        "leaves a role's configuration open": AttestationPolicy.from_dict(
            {**shared, "roles": {"ps0": {}}}),
        "allows DEBUG TDs": AttestationPolicy.from_dict(
            {**shared, "roles": named, "allow_debug": True}),
        "does not bind the requester's key": AttestationPolicy.from_dict(
            {**shared, "roles": named, "report_data_binding": "none"}),
    }


@pytest.mark.parametrize("case", [*_release_policies(), "allows simulated TDs"])
def test_register_secret_refuses_a_release_policy_that_could_leak_it(
    trust: Running, case: str
) -> None:
    if case == "allows simulated TDs":  # on a service whose own policy refuses them
        trust.service.policy = lab_policy(allow_simulated=False)
        policy = lab_policy("ps0")
    else:
        policy = _release_policies()[case]
    with connect(trust) as client:
        refusal = register(client, trust, policy)

    record("R8", f"release policy that {case}", held=int(refusal is not None), lost=0,
           secrets_released=0, certificates_wrongly_issued=0)
    assert refusal is not None, f"a release policy that {case} was accepted"
    assert refusal.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "Fix:" in (refusal.details() or ""), refusal.details()
    assert trust.service.broker.names() == []


def test_the_lab_release_policies_are_still_accepted(trust: Running) -> None:
    # the volume's policy as the lab builds it: ps0 and the owner's trusted node, pinned
    policy = volume_release_policy(measured("ps0"), measured("owner"),
                                   base=AttestationPolicy.from_dict({"allow_simulated": True}))
    with connect(trust) as client:
        assert register(client, trust, policy) is None
        assert ask(client, "release", "ps0", provider("ps0")) == grpc.StatusCode.OK
        assert ask(client, "release", "owner", provider("owner")) == grpc.StatusCode.OK
        assert ask(client, "release", "owner", provider("worker0")) != grpc.StatusCode.OK
    assert trust.service.broker.released == 2
