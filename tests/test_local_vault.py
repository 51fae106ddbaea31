"""The sealed model on the local backend: ps0 checkpoints into the LUKS volume it opened by
attested key release, every checkpoint signed; the owner's trusted node opens a copy in another
process (another kernel) of the same lab session and verifies the provenance offline.

Checked independently of the code under test: the run folder is scanned byte by byte for the
serialized weights and for the passphrase (taken from the sealed state with the owner's key);
``cryptsetup luksDump`` and ``cryptsetup open --test-passphrase`` judge the volume and the key.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from hfl_lab import owner
from hfl_lab._exceptions import VaultError
from hfl_lab.backends.local import LocalBackend
from hfl_lab.vault import AttestedSigners, ModelVault, retrieve_as_owner
from hfl_lab.vault.keyrelease import owner_passphrase
from tests.local_support import FinishedRun
from trainer.checkpoint import decode_state

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]

RETRIEVE = """
import json, sys
from hfl_lab.lab.retrieval import owner_credential, provenance_signers
from hfl_lab.vault import retrieve_as_owner
from hfl_lab._exceptions import HflLabError
vault = json.loads(sys.argv[1])
try:
    model = retrieve_as_owner(None, owner_credential(vault), sys.argv[2],
                              provenance_signers(vault))
except HflLabError as e:
    print(json.dumps({"error": str(e)}))
    sys.exit(1)
print(json.dumps({"step": model.step, "ok": model.provenance.ok,
                  "summary": model.provenance.summary()}))
"""


@pytest.fixture(scope="module")
def sealed_run(sync_run: FinishedRun) -> LocalBackend:
    """The session's shared sync run (tests/conftest.py; test_local_backend checks its
    training): ps0 checkpointed into the volume, which the tests here only copy and read."""
    config, result = sync_run.config, sync_run.result
    assert config.vault and config.steps == 2 * config.checkpoint_every  # two checkpoints
    assert result.final_step == config.steps and result.checkpoint_step == config.steps
    return sync_run.backend


def _retrieve_elsewhere(backend: LocalBackend, volume: Path,
                        env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    record = {"trust_state_path": str(backend.trust_state_path),
              "owner_salt_path": str(backend.owner_salt_path), "trust_dir": str(backend.trust_dir)}
    return subprocess.run(
        [sys.executable, "-c", RETRIEVE, json.dumps(record), str(volume)],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300,
    )


def test_ps0_checkpoints_into_the_volume_and_nowhere_else(sealed_run: LocalBackend) -> None:
    run = sealed_run.run_dir
    assert sealed_run.vault_path is not None and sealed_run.vault_path.is_file()
    assert not (run / "checkpoints").exists()
    dump = subprocess.run(["cryptsetup", "luksDump", str(sealed_run.vault_path)],
                          capture_output=True, text=True)
    assert dump.returncode == 0 and "LUKS header information" in dump.stdout
    # the key slot takes the PBKDF2 count the config fixed (vault_kdf_iterations), not a
    # calibrated one
    slot = re.search(r"Key Slot 0: ENABLED\s+Iterations:\s+(\d+)", dump.stdout)
    assert slot is not None and int(slot[1]) == sealed_run.config.vault_kdf_iterations
    log = (run / "logs" / "ps0.log").read_text()
    assert "opened the model volume model.luks with the attested key release" in log


def test_another_process_of_the_session_retrieves_the_model_and_verifies_its_provenance(
    sealed_run: LocalBackend, tmp_path: Path
) -> None:
    volume = sealed_run.fetch_vault(tmp_path / "trusted-node" / "model.luks")

    done = _retrieve_elsewhere(sealed_run, volume, dict(os.environ))

    assert done.returncode == 0, done.stdout + done.stderr
    found = json.loads(done.stdout.strip().splitlines()[-1])
    assert found["step"] == sealed_run.config.steps and found["ok"], found
    assert "provenance intact: 2 signed records" in found["summary"]


def test_provenance_names_ps0s_attested_key_and_the_workers_evidence(
    sealed_run: LocalBackend, tmp_path: Path
) -> None:
    volume = sealed_run.fetch_vault(tmp_path / "model.luks")
    credential = sealed_run.owner_credential()

    model = retrieve_as_owner(None, credential, volume,
                              AttestedSigners.from_folder(sealed_run.trust_dir))

    (signer,) = {e["signer_sha256"]: e for e in model.provenance.signer_evidence}.values()
    assert signer["accepted"] and signer["simulated"] and signer["role"] == "ps0"
    assert signer["mr_td"] == sealed_run.measurements["ps0"].mr_td.hex()
    assert signer["mr_config_id"] == sealed_run.measurements["ps0"].mr_config_id.hex()
    passphrase = owner_passphrase(credential)
    with ModelVault.open(volume, passphrase, read_only=True) as vault:
        names = sorted(vault.files.list_dir("provenance"))
        last = json.loads(vault.files.read(f"provenance/{names[-1]}"))
    assert sorted(w["id"] for w in last["workers"]) == ["worker0", "worker1"]
    assert all(len(w["evidence_digest"]) == 64 for w in last["workers"])


def test_a_signer_outside_the_release_policy_breaks_the_chain(
    sealed_run: LocalBackend, tmp_path: Path
) -> None:
    from hfl_lab.tee.policy import AttestationPolicy

    volume = sealed_run.fetch_vault(tmp_path / "model.luks")
    trust = tmp_path / "trust"
    shutil.copytree(sealed_run.trust_dir, trust)
    fields = AttestationPolicy.load(trust / "volume_policy.yaml").to_dict()
    # the owner expects another PS build: ps0's signatures must no longer count
    fields["mr_td"] = fields["roles"]["ps0"]["mr_td"] = "00" * 48
    AttestationPolicy.from_dict(fields).save(trust / "volume_policy.yaml")
    signers = AttestedSigners.from_folder(trust)

    with pytest.raises(VaultError) as refused:
        retrieve_as_owner(None, sealed_run.owner_credential(), volume, signers)

    assert "provenance broken" in str(refused.value)
    assert "attestation was refused" in str(refused.value) and "mr_td" in str(refused.value)


def test_a_kernel_of_another_session_cannot_unseal_and_is_told_why(
    sealed_run: LocalBackend, tmp_path: Path
) -> None:
    volume = sealed_run.fetch_vault(tmp_path / "model.luks")
    env = dict(os.environ, **{owner.OWNER_SECRET_ENV: os.urandom(32).hex()})

    done = _retrieve_elsewhere(sealed_run, volume, env)

    assert done.returncode == 1
    error = json.loads(done.stdout.strip().splitlines()[-1])["error"]
    assert "sealed in another lab session" in error and "hfl-lab lab" in error
    assert "Traceback" not in done.stderr


def test_no_plaintext_weights_and_no_passphrase_in_the_run_folder(
    sealed_run: LocalBackend, tmp_path: Path
) -> None:
    volume = sealed_run.fetch_vault(tmp_path / "model.luks")
    credential = sealed_run.owner_credential()
    model = retrieve_as_owner(None, credential, volume,
                              AttestedSigners.from_folder(sealed_run.trust_dir))
    state = decode_state(model.payload)
    # 48-byte windows from the largest weight tensors and from the serialized checkpoint
    probes = []
    for array in sorted(state.weights.values(), key=lambda a: -a.size)[:3]:
        raw = np.ascontiguousarray(array).tobytes()
        probes += [raw[i:i + 48] for i in (0, len(raw) // 2, len(raw) - 48)]
    payload = model.payload
    probes += [payload[i:i + 48] for i in range(4096, len(payload) - 48, len(payload) // 7)]
    passphrase = owner_passphrase(credential)
    secrets = [passphrase, passphrase.hex().encode(), sealed_run.admin_token,
               sealed_run.admin_token.hex().encode()]

    scanned = 0
    for path in sealed_run.run_dir.rglob("*"):
        if not path.is_file():
            continue
        data = path.read_bytes()
        scanned += 1
        for probe in probes:
            assert probe not in data, f"plaintext model bytes in {path}"
        for secret in secrets:
            assert secret not in data, f"a secret in {path}"
    assert scanned >= 8  # config, policies, logs, the volume, the sealed state, ...

    check = subprocess.run(
        ["cryptsetup", "open", "--test-passphrase", "--key-file=-", str(volume)],
        input=passphrase, capture_output=True,
    )
    assert check.returncode == 0, check.stderr
