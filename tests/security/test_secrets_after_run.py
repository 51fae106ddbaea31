"""R6: after a full `hfl-lab run`, no secret is in any file of the run folder: logs, configs,
policies, executed notebooks (their outputs included), plots, the sealed state, the volume.

Searched for, byte for byte (raw and hex, upper and lower case):
- the volume passphrase (taken from the trust service's sealed state with the owner's key);
- the volume key (dumped by stock ``cryptsetup luksDump --dump-volume-key``, not by our code);
- the admin credential (derived from this session's owner secret and the run's salt);
- the owner secret itself.
The TD private keys (mesh and RA-TLS keys) and the trust service's CA key exist only inside
their processes, so no test can name them; instead every file is searched for any private key
encoding at all: PEM ``PRIVATE KEY`` blocks, DER PKCS#8 and SEC1 EC private keys, and armored
OpenPGP secret keys (the workload image's signer: notebook 03 signs it, ``image/`` is scanned).
"""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import pytest

from hfl_lab import owner
from hfl_lab.vault.keyrelease import SealedBrokerState, owner_passphrase
from tests.reliability_report import record
from tests.secret_support import PRIVATE_KEY_PATTERNS

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]


def _volume_key(volume: Path, passphrase: bytes) -> bytes:
    done = subprocess.run(
        ["cryptsetup", "luksDump", "--dump-volume-key", "--batch-mode", "--key-file=-",
         str(volume)], input=passphrase, capture_output=True, check=True,
    )
    text = done.stdout.decode()
    hexes = re.findall(r"(?:MK dump|Volume key):\s*((?:[0-9a-f]{2}\s*)+)", text)
    assert hexes, "cryptsetup printed no volume key"
    return bytes.fromhex("".join(hexes[0].split()))


def _forms(secret: bytes) -> list[bytes]:
    return [secret, secret.hex().encode(), secret.hex().upper().encode()]


def test_no_secret_anywhere_in_the_run_folder_after_a_full_run(lab_run: Path) -> None:
    run_dir = lab_run  # the session's full `hfl-lab run` (tests/conftest.py), read only here
    trust = run_dir / "trust"
    salt = bytes.fromhex(json.loads((trust / "owner.json").read_text())["salt"])
    admin = owner.admin_token(salt)  # the same session: this process's owner secret
    passphrase = owner_passphrase(
        SealedBrokerState(trust / "state.sealed", owner.sealing_key(admin)), "model-volume"
    )
    volume = run_dir / "vault" / "model.luks"
    secrets = {
        "volume passphrase": passphrase,
        "volume key": _volume_key(volume, passphrase),
        "admin credential": admin,
        "owner secret": owner.owner_secret(),
    }
    files = [p for p in run_dir.rglob("*") if p.is_file()]
    notebooks = [p for p in files if p.suffix == ".ipynb"]
    logs = [p for p in files if p.suffix == ".log"]

    found = []
    for path in files:
        data = path.read_bytes()
        found += [f"{name} in {path}" for name, secret in secrets.items()
                  if any(form in data for form in _forms(secret))]
        if path.name not in ("model.luks", "state.sealed"):  # ciphertext: random bytes
            found += [f"a private key encoding in {path}"
                      for pattern in PRIVATE_KEY_PATTERNS if pattern.search(data)]

    record("R6", "full hfl-lab run", tried=len(files), held=len(files) - len(found),
           lost=len(found), files=len(files), notebooks=len(notebooks), logs=len(logs),
           secrets=sorted(secrets), found=found)
    assert len(notebooks) == 7 and len(logs) >= 4
    assert found == []
