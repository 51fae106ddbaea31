"""``ModelVault``: the LUKS model volume the parameter server checkpoints into.

One interface, two data paths: ``kernel`` (dm-crypt + mount, where the host allows it) and
``userspace`` (everywhere else). Both read and write the same volume file, which also opens with
a stock ``cryptsetup open`` on any Linux host.
"""

from __future__ import annotations

import base64
import json
import logging
import secrets
import threading
from collections.abc import Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

from hfl_lab._exceptions import VaultError
from hfl_lab._resources import ClosingContext
from hfl_lab.trust.sealed import CheckpointHead
from hfl_lab.vault.archive import CheckpointArchive
from hfl_lab.vault.checkpoints import Checkpoint, CheckpointInfo
from hfl_lab.vault.files import VolumeFiles
from hfl_lab.vault.integrity import derive_mac_key
from hfl_lab.vault.kernel import KernelVolume, kernel_path_status
from hfl_lab.vault.provenance import (
    ProvenanceEntry,
    ProvenanceReport,
    SignerResolver,
    Signers,
    genesis_hash,
)
from hfl_lab.vault.userspace import UserspaceVolume

log = logging.getLogger(__name__)

PathKind = Literal["auto", "kernel", "userspace"]
MIN_PASSPHRASE_BYTES = 32
_MARKER = "vault.json"


def new_passphrase() -> bytes:
    """A fresh volume passphrase: 256 random bits, URL-safe base64 (43 printable bytes)."""
    return base64.urlsafe_b64encode(secrets.token_bytes(32)).rstrip(b"=")


def choose_data_path(path_kind: PathKind) -> Literal["kernel", "userspace"]:
    """Resolve ``auto``; refuse ``kernel`` where dm-crypt cannot be used, saying why."""
    available, reason = kernel_path_status()
    if path_kind == "kernel" and not available:
        raise VaultError(
            f"the kernel data path is unavailable: {reason}.",
            fix='use path_kind="userspace" (or "auto").',
        )
    if path_kind == "auto":
        chosen: Literal["kernel", "userspace"] = "kernel" if available else "userspace"
        log.info("vault data path: %s (%s)", chosen, reason)
        return chosen
    if path_kind not in ("kernel", "userspace"):
        raise VaultError(
            f"unknown path_kind {path_kind!r}.", fix='use "auto", "kernel" or "userspace".'
        )
    return path_kind


class ModelVault(ClosingContext):
    """A LUKS volume holding checkpoints (MAC-protected) and their signed provenance log."""

    def __init__(
        self, volume: UserspaceVolume | KernelVolume, *, keep_last: int | None = None
    ) -> None:
        self._volume = volume
        self._lock = threading.Lock()
        self._archive = CheckpointArchive(
            volume,
            mac_key=derive_mac_key(volume.volume_key, volume.uuid),
            genesis=genesis_hash(volume.uuid),
            data_path=volume.kind,
            keep_last=keep_last,
        )

    # -- lifecycle -------------------------------------------------------------------------

    @classmethod
    def create(
        cls,
        path: Path | str,
        passphrase: bytes,
        size_mb: int,
        luks_version: int = 1,
        path_kind: PathKind = "auto",
        *,
        kdf_iterations: int | None = None,
        iter_time_ms: int = 500,
        keep_last: int | None = None,
        durable: bool = True,
    ) -> ModelVault:
        """Create a new volume file (never overwrites) and open it for writing.

        ``kdf_iterations`` fixes the PBKDF2 count (fast tests); otherwise cryptsetup calibrates
        it to ``iter_time_ms``. The passphrase is random, so stretching adds little.
        """
        if len(passphrase) < MIN_PASSPHRASE_BYTES:
            raise VaultError(
                f"the vault passphrase has {len(passphrase)} bytes; at least "
                f"{MIN_PASSPHRASE_BYTES} random bytes are required.",
                fix="generate it with hfl_lab.vault.new_passphrase() (the key broker does).",
            )
        if luks_version not in (1, 2):
            raise VaultError(f"unsupported LUKS version {luks_version}.", fix="use 1 or 2.")
        if size_mb < 8:
            raise VaultError(f"a {size_mb} MB volume is too small.", fix="use at least 8 MB.")
        kind = choose_data_path(path_kind)
        volume_type = KernelVolume if kind == "kernel" else UserspaceVolume
        volume = volume_type.create(
            Path(path),
            passphrase,
            size_mb,
            luks_version=luks_version,
            kdf_iterations=kdf_iterations,
            iter_time_ms=iter_time_ms,
            durable=durable,
        )
        vault = cls(volume, keep_last=keep_last)
        marker = {
            "format": "hfl-lab-vault/1",
            "volume_uuid": volume.uuid,
            "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
            "created_on": kind,
        }
        volume.commit([(_MARKER, json.dumps(marker, indent=1).encode())])
        return vault

    @classmethod
    def open(
        cls,
        path: Path | str,
        passphrase: bytes,
        path_kind: PathKind = "auto",
        *,
        read_only: bool = False,
        keep_last: int | None = None,
        durable: bool = True,
    ) -> ModelVault:
        """Open an existing volume file; ``read_only`` leaves the file byte-for-byte unchanged."""
        kind = choose_data_path(path_kind)
        volume_type = KernelVolume if kind == "kernel" else UserspaceVolume
        volume = volume_type.open(Path(path), passphrase, writable=not read_only, durable=durable)
        try:
            vault = cls(volume, keep_last=keep_last)
            if kind == "kernel" and not read_only:
                vault._archive.recover()  # file-by-file writes can leave leftovers on a crash
        except BaseException:
            volume.close()
            raise
        return vault

    def close(self) -> None:
        with self._lock:
            self._volume.close()

    # -- properties ------------------------------------------------------------------------

    @property
    def data_path_kind(self) -> Literal["kernel", "userspace"]:
        return "kernel" if isinstance(self._volume, KernelVolume) else "userspace"

    @property
    def path(self) -> Path:
        return self._volume.path

    @property
    def volume_uuid(self) -> str:
        return self._volume.uuid

    @property
    def files(self) -> VolumeFiles:
        """Raw file access inside the volume (no MACs): for recovery tools and tests."""
        return self._volume

    # -- checkpoints ------------------------------------------------------------------------

    def write_checkpoint(
        self,
        step: int,
        payload: bytes,
        metadata: Mapping[str, Any] | None = None,
        provenance: ProvenanceEntry | None = None,
    ) -> CheckpointInfo:
        """Store a checkpoint atomically: a crash leaves the previous checkpoints intact."""
        with self._lock:
            return self._archive.write(step, payload, metadata, provenance)

    def latest_checkpoint(self, *, skip_corrupt: bool = False) -> Checkpoint:
        """The newest checkpoint, verified; a corrupt one raises unless ``skip_corrupt``."""
        with self._lock:
            found = self._archive.latest(skip_corrupt=skip_corrupt)
        if found is None:
            raise VaultError(
                "the vault holds no intact checkpoint.",
                fix="train at least until the first checkpoint is written.",
            )
        return found

    def checkpoint(self, step: int) -> Checkpoint:
        """One checkpoint by step, verified."""
        with self._lock:
            for info in self._archive.infos():
                if info.step == step:
                    return self._archive.load(info)
        raise VaultError(
            f"the vault holds no checkpoint for step {step}.",
            fix="call list_checkpoints() to see the steps it holds.",
        )

    def list_checkpoints(self) -> list[CheckpointInfo]:
        with self._lock:
            return self._archive.infos()

    def verify_provenance(self, trusted_ps_keys: Signers) -> ProvenanceReport:
        """Verify the signed, hash-chained log against the PS keys the owner trusts (offline):
        a list of keys/certificates, or a ``SignerResolver`` such as ``AttestedSigners``."""
        trusted = (
            trusted_ps_keys
            if isinstance(trusted_ps_keys, SignerResolver)
            else list(trusted_ps_keys)
        )
        with self._lock:
            return self._archive.verify_provenance(trusted)

    def provenance_head(self) -> CheckpointHead | None:
        """The newest provenance record in the volume as a head (step, index, hash), unverified;
        None when the volume holds no record."""
        with self._lock:
            found = self._archive.provenance_head()
        if found is None:
            return None
        index, digest, step = found
        return CheckpointHead(self.volume_uuid, max(step, 0), index, digest)

    def record_sha256(self, index: int) -> str | None:
        """The hash of provenance record ``index``; None when it is missing or unreadable."""
        with self._lock:
            return self._archive.record_sha256(index)

    # -- CheckpointStore -------------------------------------------------------------------

    def save(
        self,
        step: int,
        payload: bytes,
        metadata: Mapping[str, Any],
        provenance: ProvenanceEntry | None = None,
    ) -> CheckpointInfo:
        return self.write_checkpoint(step, payload, metadata, provenance)

    def load_latest(self) -> Checkpoint | None:
        with self._lock:
            return self._archive.latest(skip_corrupt=True)

    # -- small files -----------------------------------------------------------------------

    def write_file(self, name: str, data: bytes) -> None:
        with self._lock:
            self._archive.write_file(name, data)

    def read_file(self, name: str) -> bytes:
        with self._lock:
            return self._archive.read_file(name)
