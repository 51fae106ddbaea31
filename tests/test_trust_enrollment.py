"""The trust service's enrollment desk (issue 23): only the owner opens it; a link it did not
issue, an expired or edited one gets nothing; a valid one gets the run's documents; every
answer is audited without the link's code or MAC."""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from hfl_lab import AttestationError, ConfigError, PolicyViolation
from hfl_lab.config.join_link import JoinLink, enrollment_key
from hfl_lab.ratls import RaTlsIdentity
from hfl_lab.tee import SimulatedPlatform
from hfl_lab.tee.sim.platform import slot_of
from hfl_lab.trust.client import TrustClient
from hfl_lab.trust.enrollment import EnrollmentDesk, RunDocuments
from hfl_lab.trust.service import TrustService, serve
from tests.td_support import PLATFORM, lab_policy, provider

DOCUMENTS = RunDocuments(config_yaml="deployment: {}\nlab: {}\n", policy_yaml="tee_type: TDX\n",
                         policy_signature="ab" * 32)


def link_for(key: bytes, slot: str = "worker0", ttl_s: float = 600.0) -> JoinLink:
    return JoinLink.issue(key, trust_address="127.0.0.1:1", ps_address="127.0.0.1:2",
                          trust_measurements={"mr_td": "ab" * 48, "mr_config_id": "cd" * 48},
                          policy_sha256="ef" * 32, slot=slot, ttl_s=ttl_s)


@pytest.fixture()
def hosted(tmp_path: Path) -> Iterator[tuple[TrustService, TrustClient, bytes]]:
    admin = os.urandom(32)
    service = TrustService(policy=lab_policy(), admin_token=admin,
                           lab_root_der=PLATFORM.root_der, owner_key=os.urandom(32),
                           state_path=tmp_path / "trust.sealed",
                           enrollment=EnrollmentDesk(DOCUMENTS, PLATFORM))
    identity = RaTlsIdentity()
    identity.make_certificate(provider("trust"), subject_cn="trust", role="trust")
    server, port = serve(service, identity.certificate_pem, identity.private_key_pem())
    client = TrustClient.connect(f"127.0.0.1:{port}", lab_policy(),
                                 lab_root_der=PLATFORM.root_der, role="trust")
    yield service, client, admin
    client.close()
    server.stop(0)


def test_a_valid_link_gets_the_run_documents_once_the_owner_opened_enrollment(hosted) -> None:
    service, client, admin = hosted
    key = enrollment_key()
    link = link_for(key, "worker1")

    with pytest.raises(PolicyViolation, match="takes no joiners"):
        client.enroll(link.encode())
    client.open_enrollment(key, admin)
    documents = client.enroll(link.encode())

    assert dataclasses.replace(documents, bootstrap=b"") == DOCUMENTS
    platform = SimulatedPlatform.from_secret(
        bytes.fromhex(json.loads(documents.bootstrap)["platform"]))
    assert slot_of(platform.pck_cert) == "worker1", "keys for the link's slot alone"
    assert service.enrollment is not None and service.enrollment.enrolled == {"worker1": 1}
    audit = [json.dumps(e) for e in client.audit(admin)]
    assert any('"enroll"' in e and '"allowed": true' in e for e in audit)
    assert not any(link.mac in e or link.code in e for e in audit), "no code or MAC in the log"


@pytest.mark.parametrize(
    ("case", "error", "words"),
    [("other host", PolicyViolation, "not issued by this host"),
     ("expired", PolicyViolation, "expired"),
     ("edited", PolicyViolation, "altered"),
     ("garbage", AttestationError, "join_link is 5009 characters")],
)
def test_a_bad_link_gets_nothing(hosted, case: str, error: type, words: str) -> None:
    service, client, admin = hosted
    key = enrollment_key()
    client.open_enrollment(key, admin)
    text = {
        "other host": link_for(enrollment_key()).encode(),
        "expired": link_for(key, ttl_s=1e-3).encode(),
        "edited": dataclasses.replace(link_for(key), slot="worker1").encode(),
        "garbage": "hfl-join:" + "A" * 5000,
    }[case]

    with pytest.raises(error, match=words):
        client.enroll(text)

    assert service.enrollment is not None and service.enrollment.enrolled == {}


def test_only_the_owner_opens_enrollment(hosted) -> None:
    _, client, _ = hosted

    with pytest.raises(PolicyViolation, match="owner credential"):
        client.open_enrollment(enrollment_key(), os.urandom(32))
    with pytest.raises(PolicyViolation, match="takes no joiners"):
        client.enroll(link_for(enrollment_key()).encode())


def test_the_desk_refuses_a_short_key() -> None:
    with pytest.raises(ConfigError, match="16 to 64 bytes"):
        EnrollmentDesk(DOCUMENTS).open(b"short")


def test_documents_never_show_the_bootstrap_in_their_repr() -> None:
    secret = PLATFORM.for_slot("worker0").export_secret()
    documents = dataclasses.replace(DOCUMENTS, bootstrap=secret)

    assert "keys" not in repr(documents) and secret.decode()[:40] not in repr(documents)
