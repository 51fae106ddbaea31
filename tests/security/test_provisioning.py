"""R8, issue 18 item 2 (the credential half): the owner's admin credential reaches the trust
service only over its attested channel.

The attack it closes: the credential (which derives the sealing key of ``state.sealed`` and the
key that signs the run's policies) used to sit in the trust pod's bootstrap Secret, readable by
whoever may ``get secrets`` in the namespace, stored in etcd, and mounted by the node. Now the
trust service starts knowing only the owner's *public* policy key (in its measured config),
serves nothing until provisioned, and takes only the credential that key names; the owner
sends it only after the service's RA-TLS evidence passed the owner's policy, over the session
pinned to that certificate. Each case below was an open door before (the service took the
credential from its bootstrap, and the Kubernetes backend put it into a Secret).
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest

from hfl_lab import AttestationError, owner
from hfl_lab.backends.base import OWNER_REFUSED
from hfl_lab.backends.kubernetes.provision import provision_trust
from hfl_lab.ratls import RaTlsIdentity
from hfl_lab.tee import measure_workload
from hfl_lab.trust.broker import DEFAULT_APP_ID
from hfl_lab.trust.client import TrustClient
from hfl_lab.trust.owner_gate import admin_metadata
from hfl_lab.trust.proto import trust_pb2 as pb
from hfl_lab.trust.proto import trust_pb2_grpc as rpc
from hfl_lab.trust.service import TrustService, serve
from tests.reliability_report import record
from tests.td_support import PLATFORM, lab_policy, provider

TOKEN = os.urandom(32)


@dataclass
class Unprovisioned:
    service: TrustService
    server: grpc.Server
    address: str
    hooked: list[int]


def start(tmp_path: Path, *, evidence_role: str = "trust",
          identity_provider: Any = None) -> Unprovisioned:
    hooked: list[int] = []
    service = TrustService(
        policy=lab_policy(), policy_key=owner.policy_key(TOKEN),
        on_provisioned=lambda s: hooked.append(s.state_counter),
        lab_root_der=PLATFORM.root_der, state_path=tmp_path / "state.sealed",
    )
    identity = RaTlsIdentity()
    identity.make_certificate(identity_provider or provider(evidence_role), subject_cn="trust",
                              role="trust")
    server, port = serve(service, identity.certificate_pem, identity.private_key_pem())
    return Unprovisioned(service, server, f"127.0.0.1:{port}", hooked)


@pytest.fixture()
def waiting(tmp_path: Path) -> Iterator[Unprovisioned]:
    running = start(tmp_path)
    yield running
    running.server.stop(0)


def raw_stub(address: str) -> tuple[grpc.Channel, Any]:
    """A client that skips the attestation check: what an attacker on the network runs."""
    with TrustClient.connect(address, lab_policy(), lab_root_der=PLATFORM.root_der,
                             role="trust") as verified:
        channel = verified.channel
        stub = rpc.TrustServiceStub(channel)
        # keep the pinned channel open past the with-block for raw calls
        verified.channel = grpc.insecure_channel("127.0.0.1:1")
    return channel, stub


def provision_call(stub: Any, token: bytes) -> Any:
    return stub.Provision(pb.ProvisionRequest(admin_token=token))


def code_of(call: Callable[[], Any]) -> grpc.StatusCode | None:
    try:
        call()
    except grpc.RpcError as e:
        return e.code()
    return None


def test_an_unprovisioned_service_serves_nothing(waiting: Unprovisioned) -> None:
    channel, stub = raw_stub(waiting.address)
    with channel:
        codes = {
            "GetChallenge": code_of(lambda: stub.GetChallenge(pb.ChallengeRequest(role="ps0"))),
            "Attest": code_of(lambda: stub.Attest(pb.AttestRequest(role="ps0"))),
            "ReleaseSecret": code_of(lambda: stub.ReleaseSecret(pb.ReleaseRequest(role="ps0"))),
            "GetCheckpointHead": code_of(lambda: stub.GetCheckpointHead(pb.GetHeadRequest())),
            "RegisterSecret": code_of(lambda: stub.RegisterSecret(
                pb.RegisterSecretRequest(app_id="a", name="b", secret=b"s"),
                metadata=admin_metadata(TOKEN))),
            "OpenEnrollment": code_of(lambda: stub.OpenEnrollment(
                pb.OpenEnrollmentRequest(enrollment_key=b"k" * 32),
                metadata=admin_metadata(TOKEN))),
            "Enroll": code_of(lambda: stub.Enroll(pb.EnrollRequest(join_link="hfl-join:x"))),
        }
    held = all(c == grpc.StatusCode.UNAVAILABLE for c in codes.values())
    record("R8", "calls to a trust service its owner has not provisioned", tried=len(codes),
           held=sum(c == grpc.StatusCode.UNAVAILABLE for c in codes.values()))
    assert held, codes
    assert not waiting.service.provisioned and waiting.hooked == []
    assert not (waiting.service.state_path or Path("/nonexistent")).exists()


def test_a_credential_the_measured_policy_key_does_not_name_is_refused(
    waiting: Unprovisioned,
) -> None:
    channel, stub = raw_stub(waiting.address)
    attempts = {"another owner's credential": os.urandom(32), "too short": b"\x01" * 8,
                "empty": b""}
    with channel:
        codes = {case: code_of(functools.partial(provision_call, stub, token))
                 for case, token in attempts.items()}
        oversize = code_of(lambda: stub.Provision(pb.ProvisionRequest(admin_token=b"x" * 4096)))
    held = (all(c == grpc.StatusCode.PERMISSION_DENIED for c in codes.values())
            and oversize == grpc.StatusCode.INVALID_ARGUMENT and not waiting.service.provisioned)
    record("R8", "a cluster admin provisions the trust service with its own credential",
           tried=len(attempts) + 1, held=(len(attempts) + 1) if held else 0)
    assert held, (codes, oversize)
    refusals = [e for e in waiting.service.audit.since(0) if e[1]["action"] == "provision"]
    assert len(refusals) == 4 and not any(e[1]["allowed"] for e in refusals)
    for token in attempts.values():  # no credential, not even a refused one, is in the audit
        assert not token or token.hex() not in repr(refusals)


def test_the_owner_provisions_once_and_the_service_opens(waiting: Unprovisioned) -> None:
    detail = provision_trust(waiting.address, lab_policy(), TOKEN,
                             lab_root_der=PLATFORM.root_der, timeout_s=30)

    assert detail == "provisioned" and waiting.service.provisioned and waiting.hooked == [0]
    with TrustClient.connect(waiting.address, lab_policy(), lab_root_der=PLATFORM.root_der,
                             role="trust") as client:
        client.check_open()
        assert client.provision(TOKEN) == "already provisioned"
        client.register_secret(DEFAULT_APP_ID, "volume", b"k" * 32, lab_policy("ps0"), TOKEN)
        assert client.release_secret(DEFAULT_APP_ID, "volume", "ps0",
                                     provider("ps0")) == b"k" * 32
        channel, stub = raw_stub(waiting.address)
        with channel:
            second = code_of(lambda: stub.Provision(pb.ProvisionRequest(
                admin_token=os.urandom(32))))
    record("R8", "a second credential after the owner's", held=int(
        second == grpc.StatusCode.PERMISSION_DENIED))
    assert second == grpc.StatusCode.PERMISSION_DENIED
    assert waiting.hooked == [0]  # the hook ran once


def test_a_restarted_service_resumes_its_sealed_state_only_when_provisioned(
    tmp_path: Path,
) -> None:
    first = start(tmp_path)
    provision_trust(first.address, lab_policy(), TOKEN, lab_root_der=PLATFORM.root_der)
    with TrustClient.connect(first.address, lab_policy(), lab_root_der=PLATFORM.root_der,
                             role="trust") as client:
        client.register_secret(DEFAULT_APP_ID, "volume", b"v" * 32, lab_policy("ps0"), TOKEN)
    first.server.stop(0)

    again = start(tmp_path)
    try:
        assert not again.service.broker.names()  # nothing unsealed before the owner came
        provision_trust(again.address, lab_policy(), TOKEN, lab_root_der=PLATFORM.root_der)
        assert (DEFAULT_APP_ID, "volume") in again.service.broker.names()
        assert again.hooked == [1]
    finally:
        again.server.stop(0)


@pytest.mark.parametrize("impostor", ["other_code", "other_role", "debug_td"])
def test_the_owner_gives_an_impostor_nothing(tmp_path: Path, impostor: str) -> None:
    """A service that is not the run's trust service in the run's TD (the host swapped the pod,
    or a worker's TD answers at the trust address) never sees the credential."""
    fake = {
        "other_code": provider("trust", measure_workload(role="trust",
                                                         config={"tampered": True})),
        "other_role": provider("worker0"),
        "debug_td": provider("trust", debug=True),
    }[impostor]
    rogue = start(tmp_path, identity_provider=fake)
    try:
        with pytest.raises(AttestationError) as refused:
            provision_trust(rogue.address, lab_policy(), TOKEN, lab_root_der=PLATFORM.root_der,
                            timeout_s=10)
        failed = refused.value  # named as the local backend names it, its check kept
        assert str(failed).startswith(OWNER_REFUSED)
        assert failed.check == {"other_code": "mr_config_id", "other_role": "mr_config_id",
                                "debug_td": "dcap"}[impostor], failed.check
        assert failed.expected != failed.actual
        held = not rogue.service.provisioned and "nothing" in str(refused.value)
        sent = [e for e in rogue.service.audit.since(0) if e[1]["action"] == "provision"]
        record("R8", f"an impostor trust service ({impostor}) asks for the credential",
               held=int(held and not sent))
        assert held and not sent, str(refused.value)
    finally:
        rogue.server.stop(0)
