"""The kernel data path: ``cryptsetup open`` (dm-crypt) and mount, where the host allows it.

This is what runs inside a TD on Kubernetes, and what native/luks/*.sh do by hand for
operators. Files are then ordinary files on the mounted ext4 (written via temp file + rename).
"""

from __future__ import annotations

import logging
import os
import secrets
import shutil
import subprocess
import tempfile
from collections.abc import Sequence
from pathlib import Path

from hfl_lab._exceptions import VaultError
from hfl_lab.vault.cryptsetup import (
    close_mapping,
    create_volume_file,
    dump_volume_key,
    open_mapping,
)
from hfl_lab.vault.files import DirectoryFiles, Write
from hfl_lab.vault.luks_header import LuksHeader, read_header
from hfl_lab.vault.luks_keyslot import unlock_volume_key

log = logging.getLogger(__name__)

LABEL = "hfl-model"


def kernel_path_status() -> tuple[bool, str]:
    """Whether dm-crypt can be used here, and if not, why (one phrase)."""
    if not Path("/dev/mapper/control").exists():
        return False, "no dm-crypt on this machine (/dev/mapper/control is missing)"
    if not Path("/sys/module/dm_crypt").exists():
        return False, "no dm-crypt on this machine (the dm_crypt kernel module is not loaded)"
    if os.geteuid() != 0:
        return False, "cryptsetup open and mount need root, and this process is not root"
    missing = [
        tool
        for tool in ("cryptsetup", "mount", "umount", "mkfs.ext4")
        if shutil.which(tool) is None
    ]
    if missing:
        return False, f"missing tools for the kernel path: {', '.join(missing)}"
    return True, "dm-crypt available"


def _run(args: list[str], what: str) -> None:
    result = subprocess.run(args, capture_output=True, check=False)
    if result.returncode != 0:
        raise VaultError(
            f"{what} failed: {result.stderr.decode(errors='replace').strip()}.",
            fix="check that this host allows dm-crypt and mounts (root, /dev/mapper).",
        )


class KernelVolume:
    """A LUKS volume opened with dm-crypt and mounted on a private temporary directory."""

    kind = "kernel"

    def __init__(
        self,
        path: Path,
        header: LuksHeader,
        key: bytearray,
        mapping: str,
        mountpoint: Path,
        *,
        writable: bool,
        durable: bool,
    ) -> None:
        self.path = path
        self.header = header
        self._key = key
        self._mapping = mapping
        self.mountpoint = mountpoint
        self.writable = writable
        self._files = DirectoryFiles(mountpoint, durable=durable)

    @property
    def uuid(self) -> str:
        return self.header.uuid

    @property
    def volume_key(self) -> bytes:
        return bytes(self._key)

    @classmethod
    def create(
        cls,
        path: Path,
        passphrase: bytes,
        size_mb: int,
        *,
        luks_version: int = 1,
        kdf_iterations: int | None = None,
        iter_time_ms: int = 500,
        durable: bool = True,
    ) -> KernelVolume:
        os.close(create_volume_file(path, passphrase, size_mb, luks_version=luks_version,
                                    kdf_iterations=kdf_iterations, iter_time_ms=iter_time_ms))
        try:
            return cls._attach(path, passphrase, writable=True, durable=durable, make_fs=True)
        except BaseException:
            path.unlink(missing_ok=True)
            raise

    @classmethod
    def open(
        cls, path: Path, passphrase: bytes, *, writable: bool = True, durable: bool = True
    ) -> KernelVolume:
        if not path.is_file():
            raise VaultError(f"no volume file at {path}.", fix="check the path.")
        return cls._attach(path, passphrase, writable=writable, durable=durable, make_fs=False)

    @classmethod
    def _attach(
        cls, path: Path, passphrase: bytes, *, writable: bool, durable: bool, make_fs: bool
    ) -> KernelVolume:
        with path.open("rb") as stream:
            header = read_header(stream, path.stat().st_size)
            # The MAC key needs the volume key in this process too; derive it here (memory
            # only) rather than asking dm-crypt, which never hands it out.
            if all(slot.kdf == "pbkdf2" for slot in header.slots):
                key = unlock_volume_key(header, stream, passphrase)
            else:  # argon2 slots (an operator's LUKS2 volume): let cryptsetup derive it
                key = dump_volume_key(path, passphrase)
        mapping = f"hfl-vault-{secrets.token_hex(4)}"
        device = open_mapping(path, passphrase, mapping, read_only=not writable)
        mountpoint = Path(tempfile.mkdtemp(prefix="hfl-vault-"))
        try:
            if make_fs:
                _run(["mkfs.ext4", "-q", "-L", LABEL, "-m", "0", str(device)], "mkfs.ext4")
            options = "nosuid,nodev,noexec" + ("" if writable else ",ro")
            _run(["mount", "-o", options, str(device), str(mountpoint)], "mount")
        except BaseException:
            mountpoint.rmdir()
            close_mapping(mapping)
            raise
        log.info("opened %s with dm-crypt (kernel data path)", path.name)
        return cls(path, header, key, mapping, mountpoint, writable=writable, durable=durable)

    def read(self, path: str) -> bytes:
        return self._files.read(path)

    def list_dir(self, path: str) -> dict[str, int]:
        return self._files.list_dir(path)

    def commit(self, writes: Sequence[Write], deletes: Sequence[str] = ()) -> None:
        if not self.writable:
            raise VaultError(
                "the volume was opened read-only.",
                fix="open it with ModelVault.open(...) for writing.",
            )
        self._files.commit(writes, deletes)

    def close(self) -> None:
        self._key[:] = bytes(len(self._key))
        if self._mapping:
            os.sync()
            _run(["umount", str(self.mountpoint)], "umount")
            self.mountpoint.rmdir()
            close_mapping(self._mapping)
            self._mapping = ""
