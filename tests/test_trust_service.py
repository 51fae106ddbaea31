"""Trust service over real gRPC/TLS: attestation, role certificates, key release, admin API."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from hfl_lab import AttestationError, PolicyViolation
from hfl_lab.ratls import RaTlsIdentity, verify_certificate
from hfl_lab.tee import AttestationPolicy, measure_workload
from hfl_lab.trust.broker import DEFAULT_APP_ID
from hfl_lab.trust.proto import trust_pb2 as pb
from hfl_lab.trust.proto import trust_pb2_grpc as rpc
from tests.td_support import lab_policy, lab_verifier, provider
from tests.trust_support import MEASURED, Running, connect, start


@pytest.fixture()
def trust(tmp_path: Path) -> Iterator[Running]:
    running = start(tmp_path, owner_key=os.urandom(32))
    yield running
    running.server.stop(0)


def test_participant_gets_a_role_certificate_that_carries_its_evidence(trust: Running) -> None:
    with connect(trust) as client:
        creds = client.attest("worker0", provider("worker0"))

    cert = creds.certificate
    assert "CN=worker0" in cert.subject.rfc4514_string()
    peer_check = verify_certificate(cert, lab_verifier(), role="worker0")
    assert peer_check.accepted, peer_check.to_table()
    assert trust.service.issued == 1
    assert any(getattr(e, "kind", "") == "attestation" for e in trust.events)


@pytest.mark.parametrize(
    "case", ["worker_asks_for_ps0", "debug", "wrong_mr_td", "unknown_role"]
)
def test_bad_evidence_gets_no_certificate(trust: Running, case: str) -> None:
    role, prov = {
        "worker_asks_for_ps0": ("ps0", provider("worker0")),
        "debug": ("worker0", provider("worker0", debug=True)),
        "wrong_mr_td": ("worker0", provider(
            "worker0", measure_workload(role="worker0", virtual_hardware={"vcpus": 2}))),
        "unknown_role": ("worker7", provider("worker0")),
    }[case]
    if case == "wrong_mr_td":  # different measurements: the MR_TD stays, RTMR0 changes
        prov.measurements.mr_td = b"\x42" * 48

    with connect(trust) as client, pytest.raises(PolicyViolation, match="refused"):
        client.attest(role, prov)

    assert trust.service.issued == 0
    assert trust.service.audit.entries[-1]["allowed"] is False


def test_replayed_nonce_is_refused(trust: Running) -> None:
    identity = RaTlsIdentity()
    with connect(trust) as client:
        challenge = client.stub.GetChallenge(pb.ChallengeRequest(role="worker0"))
        from hfl_lab.ratls.binding import key_binding

        evidence = provider("worker0").get_evidence(key_binding(identity.spki_der,
                                                                challenge.nonce))
        request = pb.AttestRequest(role="worker0", nonce=challenge.nonce,
                                   public_key=identity.spki_der, evidence_json=evidence.to_json())
        client.stub.Attest(request)
        with pytest.raises(grpc.RpcError) as err:
            client.stub.Attest(request)

    assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert "already used" in str(err.value.details())
    assert trust.service.issued == 1


def test_secret_released_only_to_the_ps_and_never_logged(trust: Running) -> None:
    secret = os.urandom(32)
    ps_only = AttestationPolicy.from_dict(  # a release names its roles (issue 18, item 6)
        {"mr_td": MEASURED["ps0"].mr_td.hex(), "mr_config_id": MEASURED["ps0"].mr_config_id.hex(),
         "allow_simulated": True, "report_data_binding": "key+nonce", "roles": {"ps0": {}}}
    )
    with connect(trust) as client:
        client.register_secret(DEFAULT_APP_ID, "volume", secret, ps_only, trust.admin)
        released = client.release_secret(DEFAULT_APP_ID, "volume", "ps0", provider("ps0"))
        with pytest.raises(PolicyViolation, match="not released"):
            client.release_secret(DEFAULT_APP_ID, "volume", "worker0", provider("worker0"))
        audit = list(client.audit(trust.admin))

    assert released == secret
    assert trust.service.broker.released == 1
    text = repr(audit) + repr(trust.events)
    assert secret.hex() not in text and trust.admin.hex() not in text


def test_admin_api_refuses_unauthenticated_calls(trust: Running) -> None:
    with connect(trust) as client:
        with pytest.raises(PolicyViolation, match="credential"):
            client.install_policy(lab_policy(), os.urandom(32))
        stub = rpc.TrustServiceStub(client.channel)
        with pytest.raises(grpc.RpcError) as err:
            stub.RegisterSecret(pb.RegisterSecretRequest(app_id="a", name="n", secret=b"x" * 32))

    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert trust.service.broker.names() == []


def test_restart_keeps_secrets_and_policy_without_plaintext_on_disk(tmp_path: Path) -> None:
    owner_key = os.urandom(32)
    secret = os.urandom(32)
    first = start(tmp_path, owner_key)
    with connect(first) as client:
        client.register_secret(DEFAULT_APP_ID, "volume", secret, lab_policy("ps0"),
                               first.admin)
    first.server.stop(0)

    second = start(tmp_path, owner_key)
    try:
        with connect(second) as client:
            released = client.release_secret(DEFAULT_APP_ID, "volume", "ps0", provider("ps0"))
    finally:
        second.server.stop(0)

    assert released == secret
    for path in tmp_path.rglob("*"):
        if path.is_file():
            data = path.read_bytes()
            assert secret not in data and secret.hex().encode() not in data, path


def test_lab_refuses_a_trust_service_with_other_measurements(tmp_path: Path) -> None:
    impostor = start(tmp_path, identity_role="worker0")  # genuine TD, wrong workload config
    try:
        with pytest.raises(AttestationError, match="failed attestation"):
            connect(impostor)
    finally:
        impostor.server.stop(0)
