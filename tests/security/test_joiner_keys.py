"""Attack (issue 23): a joiner of a hosted simulated run turns the keys its join link bought it
against the other participants.

The first version of enrollment handed every joiner the lab platform's whole private state (root,
PCK CA, TCB signing, PCK and attestation keys): an attendee with a link could sign evidence with
ps0's or the trust service's measurements, or another worker's, and every verifier of the run
accepted it. Now the enrollment desk hands each joiner a PCK key and attestation key of its own,
certified for its slot alone, and every verifier refuses that key's evidence for any other role.
"""

from __future__ import annotations

import dataclasses
import json

import pytest

from hfl_lab import AttestationError
from hfl_lab.config.join_link import JoinLink, enrollment_key
from hfl_lab.tee import SimulatedPlatform
from hfl_lab.tee.sim.platform import slot_of
from hfl_lab.trust.enrollment import EnrollmentDesk, RunDocuments
from tests.td_support import PLATFORM, lab_policy, lab_verifier, provider

DOCUMENTS = RunDocuments(config_yaml="lab: {}\n", policy_yaml="tee_type: TDX\n",
                         policy_signature="ab" * 32)
ROLES = ("trust", "ps0", "worker0", "worker1")


def enrolled_platform(slot: str) -> SimulatedPlatform:
    """What an attendee holding a link for ``slot`` gets from the real enrollment desk."""
    key = enrollment_key()
    desk = EnrollmentDesk(DOCUMENTS, PLATFORM)
    desk.open(key)
    link = JoinLink.issue(key, trust_address="10.0.0.1:1", ps_address="10.0.0.1:2",
                          trust_measurements={"mr_td": "ab" * 48, "mr_config_id": "cd" * 48},
                          policy_sha256="ef" * 32, slot=slot)
    _, documents = desk.enroll(link.encode())
    return SimulatedPlatform.from_secret(bytes.fromhex(json.loads(documents.bootstrap)["platform"]))


def verdict_for(role: str, platform: SimulatedPlatform) -> tuple[bool, str]:
    """Evidence with ``role``'s honest measurements, signed with ``platform``'s keys, judged
    the way the run's participants judge each other (lab root, lab collateral)."""
    binding = bytes(range(64))
    evidence = provider(role, platform=platform).get_evidence(binding)
    verdict = lab_verifier(policy=lab_policy(*ROLES)).verify(evidence, binding=binding,
                                                             role=role)
    return verdict.accepted, verdict.reason


@pytest.mark.parametrize("victim", ["trust", "ps0", "worker0"])
def test_a_joiners_keys_cannot_sign_another_roles_evidence(victim: str) -> None:
    attacker = enrolled_platform("worker1")

    accepted, reason = verdict_for(victim, attacker)

    assert not accepted, f"a joiner for worker1 passed as {victim}"
    assert "enrolled for worker1" in reason and victim in reason


def test_a_joiners_keys_sign_its_own_slot_under_the_lab_root() -> None:
    platform = enrolled_platform("worker1")

    accepted, reason = verdict_for("worker1", platform)

    assert accepted, reason
    assert platform.root_der == PLATFORM.root_der
    assert slot_of(platform.pck_cert) == "worker1"
    assert slot_of(PLATFORM.pck_cert) is None


def test_a_joiner_never_receives_the_labs_ca_or_collateral_keys() -> None:
    blob = json.loads(enrolled_platform("worker1").export_secret())

    assert sorted(blob["keys"]) == ["attestation", "pck"]
    host = json.loads(PLATFORM.export_secret())["keys"]
    assert not set(host.values()) & set(blob["keys"].values()), "a host key was handed out"
    joiner = SimulatedPlatform.from_secret(json.dumps(blob).encode())
    with pytest.raises(AttestationError, match="only its own slot's signing keys"):
        joiner.for_slot("worker0")


def test_every_enrollment_gets_fresh_keys() -> None:
    first, again = enrolled_platform("worker1"), enrolled_platform("worker1")

    assert first.pck_cert.public_key() != again.pck_cert.public_key()


def test_evidence_of_a_joiners_key_without_a_role_is_refused() -> None:
    evidence = provider("worker1", platform=enrolled_platform("worker1")).get_evidence(bytes(64))

    verdict = lab_verifier(policy=lab_policy(*ROLES)).verify(evidence)

    assert not verdict.accepted
    assert any(c.name == "slot" and not c.passed for c in verdict.checks)


def test_a_pck_certificate_whose_subject_cannot_be_read_is_refused_not_raised() -> None:
    """Found by the quote fuzzer: the slot check reads the PCK certificate's subject, which
    the parser decodes lazily; an unreadable one must refuse the evidence, not crash."""
    import base64

    evidence = provider("worker0").get_evidence(bytes(64))
    quote = evidence.quote
    pem_start = quote.index(b"-----BEGIN CERTIFICATE-----\n")
    pem_end = quote.index(b"-----END CERTIFICATE-----", pem_start)
    body = quote[pem_start + 28:pem_end]
    der = bytearray(base64.b64decode(body))
    name = b"HFL Lab SIMULATED SGX PCK Certificate"
    at = der.index(name)  # the subject's common name (the issuer is the PCK Platform CA)
    der[at - 2] = 0x01  # its UTF8String tag becomes BOOLEAN: not a readable name
    broken = base64.encodebytes(bytes(der)).replace(b"\n", b"")
    lines = b"\n".join(broken[i:i + 64] for i in range(0, len(broken), 64)) + b"\n"
    assert len(lines) == len(body)
    tampered = quote[:pem_start + 28] + lines + quote[pem_end:]

    verdict = lab_verifier(policy=lab_policy(*ROLES)).verify(
        dataclasses.replace(evidence, quote=tampered), role="worker0")

    assert not verdict.accepted
