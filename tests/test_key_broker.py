"""Key broker: released only to evidence matching the secret's policy, wrapped, audited."""

from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from hfl_lab import AttestationError, PolicyViolation
from hfl_lab.tee import AttestationPolicy, SimulatedPlatform, SimulatedTdProvider, measure_workload
from hfl_lab.trust.audit import AuditLog
from hfl_lab.trust.broker import DEFAULT_APP_ID, KeyBroker, release_context
from hfl_lab.trust.sealed import seal_state, unseal_state
from hfl_lab.trust.wrap import unwrap_secret

PLATFORM = SimulatedPlatform.generate()
PS = measure_workload(role="ps0")
WORKER = measure_workload(role="worker0")


def _binding(key: ec.EllipticCurvePrivateKey, nonce: bytes) -> bytes:
    spki = key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return hashlib.sha256(spki).digest() + hashlib.sha256(nonce).digest()


def _broker(tmp_path: Path) -> tuple[KeyBroker, AuditLog, bytes]:
    audit = AuditLog(tmp_path / "audit.jsonl")
    broker = KeyBroker(audit, lab_root_der=PLATFORM.root_der)
    secret = os.urandom(32)
    policy = AttestationPolicy.from_dict(  # the secret's one role: ps0 (issue 18, item 6)
        {**PS.summary(), "allow_simulated": True, "report_data_binding": "key+nonce",
         "roles": {"ps0": {}}}
    )
    broker.register(DEFAULT_APP_ID, "volume", secret, policy, by="owner")
    return broker, audit, secret


def test_secret_is_released_wrapped_only_to_matching_evidence(tmp_path: Path) -> None:
    broker, _audit, secret = _broker(tmp_path)
    key = ec.generate_private_key(ec.SECP256R1())
    nonce = os.urandom(32)
    evidence = SimulatedTdProvider(PLATFORM, PS).get_evidence(_binding(key, nonce))

    wrapped, verdict = broker.release(
        DEFAULT_APP_ID, "volume", evidence, key.public_key(),
        binding=_binding(key, nonce), issued_at=time.time(), requester="ps0", role="ps0",
    )

    assert verdict.accepted
    assert unwrap_secret(wrapped, key, release_context(DEFAULT_APP_ID, "volume")) == secret
    with pytest.raises(AttestationError):
        unwrap_secret(wrapped, ec.generate_private_key(ec.SECP256R1()),
                      release_context(DEFAULT_APP_ID, "volume"))
    assert broker.released == 1


@pytest.mark.parametrize("case", ["worker_measurements", "debug", "relayed_quote"])
def test_secret_is_refused_and_the_refusal_audited(tmp_path: Path, case: str) -> None:
    broker, audit, secret = _broker(tmp_path)
    key = ec.generate_private_key(ec.SECP256R1())
    nonce = os.urandom(32)
    binding = _binding(key, nonce)
    if case == "worker_measurements":
        evidence = SimulatedTdProvider(PLATFORM, WORKER).get_evidence(binding)
    elif case == "debug":
        evidence = SimulatedTdProvider(PLATFORM, PS, debug=True).get_evidence(binding)
    else:  # genuine PS evidence, bound to another key: someone relays the PS's quote
        thief = ec.generate_private_key(ec.SECP256R1())
        evidence = SimulatedTdProvider(PLATFORM, PS).get_evidence(_binding(thief, nonce))

    with pytest.raises(PolicyViolation, match="not released"):
        broker.release(DEFAULT_APP_ID, "volume", evidence, key.public_key(), binding=binding,
                       issued_at=time.time(), requester="attacker", role="ps0")

    assert broker.released == 0
    last = audit.entries[-1]
    assert last["action"] == "release_secret" and last["allowed"] is False and last["reason"]
    log = (tmp_path / "audit.jsonl").read_text()
    assert secret.hex() not in log and secret not in log.encode()


def test_unknown_secret_names_the_fix(tmp_path: Path) -> None:
    broker, _, _ = _broker(tmp_path)
    key = ec.generate_private_key(ec.SECP256R1())
    evidence = SimulatedTdProvider(PLATFORM, PS).get_evidence(b"")

    with pytest.raises(PolicyViolation, match="no secret 'model'") as err:
        broker.release(DEFAULT_APP_ID, "model", evidence, key.public_key(), binding=b"",
                       issued_at=None, requester="ps0")
    assert err.value.fix


def test_state_survives_a_restart_sealed_without_plaintext(tmp_path: Path) -> None:
    broker, _, secret = _broker(tmp_path)
    owner_key = os.urandom(32)
    path = tmp_path / "state.sealed"

    seal_state(path, {"broker": broker.export_state()}, owner_key)
    restarted = KeyBroker(AuditLog(), lab_root_der=PLATFORM.root_der)
    restarted.import_state(unseal_state(path, owner_key)["broker"])

    assert restarted.names() == [(DEFAULT_APP_ID, "volume")]
    raw = path.read_bytes()
    assert secret not in raw and secret.hex().encode() not in raw
    assert json.dumps(restarted.export_state()).count(secret.hex()) == 1


def test_audit_log_refuses_raw_bytes(tmp_path: Path) -> None:
    audit = AuditLog(tmp_path / "a.jsonl")

    with pytest.raises(TypeError, match="only summaries"):
        audit.record("oops", subject="x", allowed=True, key=b"\x01" * 32)
