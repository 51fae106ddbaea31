"""The kernel data path (dm-crypt + mount) and the automatic choice between the two paths."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from hfl_lab._exceptions import VaultError
from hfl_lab.vault import ModelVault, kernel_path_status, new_passphrase
from tests.vault_support import FAST_KDF, needs_cryptsetup, weights

AVAILABLE, REASON = kernel_path_status()
needs_dm_crypt = pytest.mark.skipif(not AVAILABLE, reason=REASON)

pytestmark = needs_cryptsetup


@needs_dm_crypt
def test_kernel_and_userspace_paths_open_each_others_volumes(tmp_path: Path) -> None:
    # Arrange: one volume written on each path
    kernel_file, user_file, passphrase = tmp_path / "k.luks", tmp_path / "u.luks", new_passphrase()
    payload = weights(1, 1_000_000)
    with ModelVault.create(
        kernel_file, passphrase, 64, path_kind="kernel", kdf_iterations=FAST_KDF
    ) as vault:
        assert vault.data_path_kind == "kernel"
        vault.write_checkpoint(1, payload, {"by": "kernel"})
    with ModelVault.create(
        user_file, passphrase, 64, path_kind="userspace", kdf_iterations=FAST_KDF
    ) as vault:
        vault.write_checkpoint(1, payload, {"by": "userspace"})

    # Act / Assert: each opens on the other path
    with ModelVault.open(kernel_file, passphrase, path_kind="userspace") as vault:
        assert vault.latest_checkpoint().payload == payload
    with ModelVault.open(user_file, passphrase, path_kind="kernel") as vault:
        assert vault.latest_checkpoint().payload == payload
        vault.write_checkpoint(2, payload[::-1], {})
    with ModelVault.open(user_file, passphrase, path_kind="userspace") as vault:
        assert vault.latest_checkpoint().payload == payload[::-1]


@pytest.mark.skipif(AVAILABLE, reason="dm-crypt is available here, so auto picks the kernel path")
def test_auto_picks_userspace_and_says_why(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="hfl_lab.vault")

    with ModelVault.create(
        tmp_path / "v.luks", new_passphrase(), 12, kdf_iterations=FAST_KDF
    ) as vault:
        kind = vault.data_path_kind

    # The reason as of now: cryptsetup's first run as root may create /dev/mapper/control, which
    # changes the reason (not its outcome) after this module was imported.
    assert kind == "userspace"
    assert f"vault data path: userspace ({kernel_path_status()[1]})" in caplog.text


@pytest.mark.skipif(AVAILABLE, reason="dm-crypt is available here")
def test_forcing_the_kernel_path_without_dm_crypt_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(VaultError, match="kernel data path is unavailable"):
        ModelVault.create(tmp_path / "v.luks", new_passphrase(), 12, path_kind="kernel")
    assert not (tmp_path / "v.luks").exists()
