"""The volume passphrase lives in the key broker: the PS and the owner get it by attestation."""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from hfl_lab import HflLabError, PolicyViolation, VaultError
from hfl_lab.tee import AttestationPolicy, measure_workload
from hfl_lab.trust.broker import DEFAULT_APP_ID
from hfl_lab.vault import (
    VOLUME_SECRET_NAME,
    ModelVault,
    SealedBrokerState,
    new_passphrase,
    open_vault_for_ps,
    provision_vault,
    release_policy_from,
    retrieve_as_owner,
)
from tests.td_support import lab_policy, provider
from tests.trust_support import MEASURED, Running, connect, start
from tests.vault_support import (
    FAST_KDF,
    OWNER,
    entry,
    needs_cryptsetup,
    ps_identity,
    release_policy,
    weights,
)

pytestmark = needs_cryptsetup

SIZE_MB = 12


@pytest.fixture()
def trust(tmp_path: Path) -> Iterator[tuple[Running, bytes]]:
    owner_key = os.urandom(32)
    running = start(tmp_path, owner_key=owner_key)
    yield running, owner_key
    running.server.stop(0)


def provision(running: Running, path: Path, **options: object) -> None:
    with connect(running) as client:
        provision_vault(
            client, running.admin, path, size_mb=SIZE_MB, release_policy=release_policy(),
            data_path="userspace", kdf_iterations=FAST_KDF, **options,  # type: ignore[arg-type]
        )


def test_ps_writes_and_the_owner_retrieves_the_same_checkpoint(
    trust: tuple[Running, bytes], tmp_path: Path
) -> None:
    # Arrange: the owner provisions; ps0 opens the volume with the released key and writes
    running, _ = trust
    path = tmp_path / "model.luks"
    key, pem = ps_identity()
    payloads = {step: weights(step) for step in (1, 2)}
    with connect(running) as client:
        info = provision_vault(
            client, running.admin, path, size_mb=SIZE_MB, release_policy=release_policy(),
            data_path="userspace", kdf_iterations=FAST_KDF,
        )
        with open_vault_for_ps(client, "ps0", provider("ps0"), path,
                               data_path="userspace") as vault:
            for step, payload in payloads.items():
                vault.write_checkpoint(step, payload, {"metrics": {"loss": 1.0 / step}},
                                       entry(key, pem, 1.0 / step))

        # Act: the owner's trusted node, attested as "owner", retrieves the model
        retrieved = retrieve_as_owner(client, provider("owner", OWNER), path, [pem],
                                      data_path="userspace")

    # Assert
    assert info.created and info.path == path and info.data_path_kind == "userspace"
    assert info.size_bytes == path.stat().st_size and info.luks_version == 1
    assert retrieved.step == 2 and retrieved.payload == payloads[2]
    assert retrieved.checkpoint.payload_sha256 == hashlib.sha256(payloads[2]).hexdigest()
    assert retrieved.provenance.ok and retrieved.written_by == "ps0"
    assert running.service.broker.released == 2  # ps0 once, the owner once
    releases = [e for e in running.service.audit.entries if e["action"] == "release_secret"]
    assert [(e["subject"], e["allowed"]) for e in releases] == [("ps0", True), ("owner", True)]


@pytest.mark.parametrize(
    ("case", "check"),
    [
        ("worker_role", "role"),  # the release policy names ps0 and the owner only
        ("worker_claims_ps0", "mr_config_id"),
        ("debug_td", "debug"),
        ("wrong_measurements", "mr_td"),
    ],
)
def test_refused_release_opens_no_volume(
    trust: tuple[Running, bytes], tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    case: str, check: str,
) -> None:
    # Arrange
    running, _ = trust
    path = tmp_path / "model.luks"
    provision(running, path)
    before = hashlib.sha256(path.read_bytes()).hexdigest()
    wrong = measure_workload(role="ps0")
    wrong.mr_td = b"\x42" * 48  # another TD image with the PS's configuration
    role, prov = {
        "worker_role": ("worker0", provider("worker0")),
        "worker_claims_ps0": ("ps0", provider("worker0")),
        "debug_td": ("ps0", provider("ps0", debug=True)),
        "wrong_measurements": ("ps0", provider("ps0", wrong)),
    }[case]
    opened: list[object] = []
    monkeypatch.setattr(ModelVault, "open", lambda *a, **k: opened.append(a))

    # Act
    with connect(running) as client, pytest.raises(PolicyViolation) as refused:
        open_vault_for_ps(client, role, prov, path, data_path="userspace")

    # Assert: the refusal names the failed check, nothing was released or opened
    assert f"{check}:" in str(refused.value) and "stays closed" in str(refused.value)
    assert running.service.broker.released == 0 and opened == []
    last = running.service.audit.entries[-1]
    assert last["action"] == "release_secret" and last["allowed"] is False
    assert hashlib.sha256(path.read_bytes()).hexdigest() == before


def test_passphrase_never_reaches_files_audit_or_logs(
    trust: tuple[Running, bytes], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # Arrange: the audit log also goes to a file in the run folder
    caplog.set_level(logging.DEBUG)
    running, _ = trust
    running.service.audit.path = tmp_path / "audit.jsonl"
    path = tmp_path / "model.luks"
    key, pem = ps_identity()

    # Act: the whole life cycle, a refusal included
    with connect(running) as client:
        provision_vault(
            client, running.admin, path, size_mb=SIZE_MB, release_policy=release_policy(),
            data_path="userspace", kdf_iterations=FAST_KDF,
        )
        with open_vault_for_ps(client, "ps0", provider("ps0"), path,
                               data_path="userspace") as vault:
            vault.write_checkpoint(1, weights(1), {"metrics": {"loss": 0.5}},
                                   entry(key, pem, 0.5))
        with pytest.raises(PolicyViolation):
            open_vault_for_ps(client, "worker0", provider("worker0"), path)
        retrieve_as_owner(client, provider("owner", OWNER), path, [pem], data_path="userspace")
        audit = list(client.audit(running.admin))
        passphrase = client.release_secret(DEFAULT_APP_ID, VOLUME_SECRET_NAME, "ps0",
                                           provider("ps0"))

    # Assert: scan every file of the run folder, the audit trail and the captured logs
    with ModelVault.open(path, passphrase, path_kind="userspace", read_only=True) as vault:
        assert vault.latest_checkpoint().step == 1  # it is the volume's passphrase
    forms = [passphrase, passphrase.hex().encode(), passphrase.hex().upper().encode()]
    files = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert tmp_path / "audit.jsonl" in files and tmp_path / "trust.sealed" in files
    for file in files:
        data = file.read_bytes()
        assert not any(form in data for form in forms), f"passphrase found in {file}"
    text = (repr(audit) + repr(running.service.audit.entries) + repr(running.events)
            + caplog.text).encode()
    assert b"provisioned model.luks" in text  # the logs were captured
    assert not any(form in text for form in forms)


def test_existing_volume_is_refused_unless_reused(
    trust: tuple[Running, bytes], tmp_path: Path
) -> None:
    running, _ = trust
    path = tmp_path / "model.luks"
    provision(running, path)
    before = path.read_bytes()

    with pytest.raises(VaultError, match=r"model\.luks already exists.*reuse=True"):
        provision(running, path)
    with connect(running) as client:
        info = provision_vault(
            client, running.admin, path, size_mb=SIZE_MB, release_policy=release_policy(),
            reuse=True,
        )
        with open_vault_for_ps(client, "ps0", provider("ps0"), path,
                               data_path="userspace") as vault:
            uuid = vault.volume_uuid

    assert not info.created and info.uuid == uuid and info.size_bytes == len(before)
    assert len([e for e in running.service.audit.entries if e["action"] == "register_secret"]) == 1


def test_missing_or_truncated_volume_is_reported_before_any_release(
    trust: tuple[Running, bytes], tmp_path: Path
) -> None:
    running, _ = trust
    path = tmp_path / "model.luks"
    provision(running, path)
    cut = tmp_path / "cut.luks"
    cut.write_bytes(path.read_bytes()[: 3 * 1024 * 1024])

    with connect(running) as client:
        with pytest.raises(VaultError, match=r"no volume file at .*missing\.luks"):
            open_vault_for_ps(client, "ps0", provider("ps0"), tmp_path / "missing.luks")
        with pytest.raises(VaultError, match="truncated"):
            open_vault_for_ps(client, "ps0", provider("ps0"), cut)
        with pytest.raises(VaultError, match="truncated"):
            retrieve_as_owner(client, provider("owner", OWNER), cut, [])

    assert running.service.broker.released == 0


@pytest.mark.parametrize(
    ("policy", "problem"),
    [
        (lambda: lab_policy(), "names role.*worker0"),
        (lambda: release_policy().replace(mr_config_id=None), "mr_config_id open"),
        (lambda: release_policy().replace(allow_debug=True), "DEBUG"),
    ],
)
def test_a_release_policy_that_would_leak_the_passphrase_is_refused(
    trust: tuple[Running, bytes], tmp_path: Path, policy: Callable[[], AttestationPolicy],
    problem: str,
) -> None:
    running, _ = trust
    path = tmp_path / "model.luks"

    with connect(running) as client, pytest.raises(VaultError, match=problem):
        provision_vault(client, running.admin, path, size_mb=SIZE_MB,
                        release_policy=policy())

    assert not path.exists() and running.service.broker.names() == []


def test_wrong_admin_token_leaves_no_volume_behind(
    trust: tuple[Running, bytes], tmp_path: Path
) -> None:
    running, _ = trust
    path = tmp_path / "model.luks"

    with connect(running) as client, pytest.raises(VaultError, match="removed"):
        provision_vault(client, os.urandom(32), path, size_mb=SIZE_MB,
                        release_policy=release_policy(), data_path="userspace",
                        kdf_iterations=FAST_KDF)

    assert not path.exists() and running.service.broker.names() == []


def test_owner_retrieves_offline_with_the_sealed_state_and_owner_key(
    trust: tuple[Running, bytes], tmp_path: Path
) -> None:
    # Arrange
    running, owner_key = trust
    path = tmp_path / "model.luks"
    key, pem = ps_identity()
    payload = weights(3)
    provision(running, path)
    with connect(running) as client, open_vault_for_ps(
        client, "ps0", provider("ps0"), path, data_path="userspace"
    ) as vault:
        vault.write_checkpoint(3, payload, {}, entry(key, pem, 0.1))
    running.server.stop(0)  # the trust service is gone; its sealed state file remains
    credential = SealedBrokerState(tmp_path / "trust.sealed", owner_key)

    # Act
    retrieved = retrieve_as_owner(None, credential, path, [pem], data_path="userspace")

    # Assert
    assert retrieved.payload == payload and retrieved.provenance.ok
    assert owner_key.hex() not in repr(credential)
    with pytest.raises(HflLabError, match="wrong owner key"):
        retrieve_as_owner(None, SealedBrokerState(credential.state_path, os.urandom(32)), path,
                          [pem], data_path="userspace")
    with pytest.raises(VaultError, match="needs a TrustClient"):
        retrieve_as_owner(None, provider("owner", OWNER), path, [pem])
    with pytest.raises(VaultError, match="cannot obtain the volume passphrase"):
        retrieve_as_owner(None, owner_key, path, [pem])  # type: ignore[arg-type]


# -- the cluster way: the passphrase is born in the trust service's TD ----------------------------


def test_passphrase_generated_in_the_trust_service_creates_the_volume_at_ps0(
    trust: tuple[Running, bytes], tmp_path: Path
) -> None:
    # Arrange: no owner provisioning; the service makes the passphrase for ps0 only
    running, owner_key = trust
    path = tmp_path / "pvc" / "model.luks"
    key, pem = ps_identity()
    payloads = {step: weights(step) for step in (1, 2)}
    made = running.service.generate_secret(DEFAULT_APP_ID, VOLUME_SECRET_NAME, release_policy(),
                                           new_passphrase)

    # Act: ps0 finds no volume and creates it with the released passphrase; a second start of
    # ps0 (a restarted pod) opens the same volume
    with connect(running) as client:
        with open_vault_for_ps(client, "ps0", provider("ps0"), path, data_path="userspace",
                               create_size_mb=SIZE_MB) as vault:
            vault.write_checkpoint(1, payloads[1], {}, entry(key, pem, 1.0))
        with open_vault_for_ps(client, "ps0", provider("ps0"), path, data_path="userspace",
                               create_size_mb=SIZE_MB) as vault:
            vault.write_checkpoint(2, payloads[2], {}, entry(key, pem, 0.5))
        with pytest.raises(PolicyViolation, match="refused the passphrase"):
            open_vault_for_ps(client, "worker0", provider("worker0"), tmp_path / "w.luks",
                              data_path="userspace", create_size_mb=SIZE_MB)
    running.server.stop(0)
    retrieved = retrieve_as_owner(None, SealedBrokerState(tmp_path / "trust.sealed", owner_key),
                                  path, [pem], data_path="userspace")

    # Assert
    assert made and retrieved.step == 2 and retrieved.payload == payloads[2]
    assert retrieved.provenance.ok and retrieved.provenance.verified_steps == [1, 2]
    assert not (tmp_path / "w.luks").exists()  # a refused release creates nothing
    generated = [e for e in running.service.audit.entries if e["action"] == "register_secret"]
    assert [(e["subject"], e["reason"]) for e in generated] == [
        ("trust", "generated in the trust service's TD")]


def test_a_restarted_trust_service_keeps_the_generated_passphrase(tmp_path: Path) -> None:
    owner_key = os.urandom(32)
    first = start(tmp_path, owner_key=owner_key)
    assert first.service.generate_secret(DEFAULT_APP_ID, VOLUME_SECRET_NAME, release_policy(),
                                         new_passphrase)
    before = first.service.broker.export_state()
    first.server.stop(0)

    again = start(tmp_path, owner_key=owner_key)
    made = again.service.generate_secret(DEFAULT_APP_ID, VOLUME_SECRET_NAME, release_policy(),
                                         new_passphrase)
    again.server.stop(0)

    assert not made and again.service.broker.export_state() == before
    sealed = (tmp_path / "trust.sealed").read_bytes()
    secret = bytes.fromhex(next(iter(before.values()))["secret"])  # type: ignore[arg-type]
    assert secret not in sealed and secret.hex().encode() not in sealed


def test_a_generated_secret_needs_the_sealed_state(tmp_path: Path) -> None:
    running = start(tmp_path)  # no owner key: nothing is sealed
    try:
        with pytest.raises(HflLabError, match="needs its sealed state") as info:
            running.service.generate_secret(DEFAULT_APP_ID, VOLUME_SECRET_NAME,
                                            release_policy(), new_passphrase)
        assert "--state" in str(info.value)
        assert running.service.broker.names() == []
    finally:
        running.server.stop(0)


def test_release_policy_from_the_run_policy_pins_ps0_or_says_what_is_missing() -> None:
    run_policy = AttestationPolicy.from_dict({
        "allow_simulated": True,
        "mr_td": [MEASURED["ps0"].mr_td.hex()],
        "roles": {role: {"mr_config_id": m.mr_config_id.hex()} for role, m in MEASURED.items()},
    })

    release = release_policy_from(run_policy)

    assert sorted(release.roles) == ["ps0"]
    assert release.reference_for("worker0", "mr_config_id") == (
        MEASURED["ps0"].mr_config_id.hex(),)
    assert release.allow_simulated and not release.allow_debug
    with pytest.raises(VaultError, match=r"cannot guard the model volume.*mr_td") as info:
        release_policy_from(AttestationPolicy.from_dict({"allow_simulated": False}))
    assert "vault=false" in str(info.value)
