"""No plaintext checkpoint, volume key or passphrase reaches the disk or the logs."""

from __future__ import annotations

import logging
import os
import tempfile
from pathlib import Path

import pytest

from hfl_lab.vault import ModelVault, new_passphrase, retrieve_model
from hfl_lab.vault.userspace import UserspaceVolume
from tests.vault_support import make_vault, needs_cryptsetup, weights

pytestmark = needs_cryptsetup


def files_under(roots: list[Path]) -> list[Path]:
    found = []
    for root in roots:
        for folder, _, names in os.walk(root):
            found += [Path(folder) / name for name in names]
    return [path for path in found if path.is_file() and not path.is_symlink()]


def test_no_plaintext_or_key_on_disk_or_in_logs(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # Arrange
    caplog.set_level(logging.DEBUG)
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    volume, passphrase = run_dir / "model.luks", new_passphrase()
    payload = weights(5, 500_000)
    probes = [payload[i : i + 64] for i in range(0, len(payload), 50_000)]

    # Act: the whole life cycle, including retrieval and a journal replay-free reopen
    with make_vault(volume, passphrase) as vault:
        vault.write_checkpoint(5, payload, {"metrics": {"loss": 0.3}})
        files = vault.files
        assert isinstance(files, UserspaceVolume)
        key = files.volume_key
    with ModelVault.open(volume, passphrase, path_kind="userspace") as vault:
        assert vault.latest_checkpoint().payload == payload
    retrieve_model(volume, passphrase, [], path_kind="userspace", require_provenance=False)

    # Assert: scan the run folder and the temp folders for the secrets and plaintext
    secrets = [passphrase, key, key.hex().encode(), key[:32], key[32:]]
    roots = [run_dir, Path(tempfile.gettempdir()), Path("/dev/shm"), Path("/var/tmp")]
    for path in files_under([r for r in roots if r.exists()]):
        try:
            if path.stat().st_size > 512 * 1024 * 1024:
                continue
            data = path.read_bytes()
        except OSError:
            continue
        assert not any(probe in data for probe in probes), f"plaintext found in {path}"
        assert not any(secret in data for secret in secrets), f"secret found in {path}"
    log_text = caplog.text
    assert "checkpoint step 5 written" in log_text  # the logs were captured
    for secret in (passphrase.decode(), key.hex(), repr(key), repr(passphrase)):
        assert secret not in log_text
