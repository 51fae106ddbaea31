"""Drive the ``cryptsetup`` binary; the passphrase goes through stdin, never argv or a file."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

from hfl_lab._exceptions import VaultError

# LUKS2 keeps a 16 MiB header by default; these sizes keep small lab volumes small.
_LUKS2_METADATA = "16k"
_LUKS2_KEYSLOTS = "2064k"


def cryptsetup_binary() -> str:
    """Path of ``cryptsetup``, or a ``VaultError`` naming the package to install."""
    found = shutil.which("cryptsetup") or next(
        (str(p) for p in (Path("/usr/sbin/cryptsetup"), Path("/sbin/cryptsetup")) if p.exists()),
        None,
    )
    if found is None:
        raise VaultError(
            "cryptsetup is not installed, so no LUKS header can be written or checked.",
            fix="install it (Debian/Ubuntu: apt-get install cryptsetup-bin).",
        )
    return found


def _run(args: list[str], passphrase: bytes, what: str) -> subprocess.CompletedProcess[bytes]:
    result = subprocess.run(
        [cryptsetup_binary(), *args], input=passphrase, capture_output=True, check=False
    )
    if result.returncode != 0:
        # cryptsetup's stderr never contains the passphrase, so it is safe to show.
        lines = result.stderr.decode(errors="replace").strip().splitlines()
        detail = lines[-1] if lines else f"exit status {result.returncode}"
        raise VaultError(
            f"cryptsetup could not {what}: {detail}.",
            fix="check the volume path, free space and the passphrase.",
        )
    return result


def format_volume(
    path: Path,
    passphrase: bytes,
    *,
    luks_version: int,
    kdf_iterations: int | None,
    iter_time_ms: int,
) -> None:
    """``cryptsetup luksFormat`` an existing file with aes-xts-plain64 and a pbkdf2 key slot."""
    args = [
        "luksFormat",
        "--batch-mode",
        "--type",
        f"luks{luks_version}",
        "--cipher",
        "aes-xts-plain64",
        "--key-size",
        "512",
        "--hash",
        "sha256",
        "--key-file",
        "-",
    ]
    if luks_version == 2:
        # pbkdf2 and 512-byte sectors keep the volume readable by the user-space path.
        args += [
            "--pbkdf",
            "pbkdf2",
            "--sector-size",
            "512",
            "--luks2-metadata-size",
            _LUKS2_METADATA,
            "--luks2-keyslots-size",
            _LUKS2_KEYSLOTS,
        ]
    if kdf_iterations is not None:
        args += ["--pbkdf-force-iterations", str(kdf_iterations)]
    else:
        args += ["--iter-time", str(iter_time_ms)]
    _run([*args, str(path)], passphrase, f"format {path.name} as LUKS{luks_version}")


def create_volume_file(
    path: Path,
    passphrase: bytes,
    size_mb: int,
    *,
    luks_version: int,
    kdf_iterations: int | None,
    iter_time_ms: int,
) -> int:
    """Create ``path`` (never an existing file), ``size_mb`` long and owner-only, and LUKS-format
    it; returns its open read-write descriptor. On any failure nothing is left behind."""
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    except FileExistsError:
        raise VaultError(
            f"{path} already exists; a vault is never overwritten.",
            fix="choose a new path or delete the old volume first.",
        ) from None
    try:
        os.ftruncate(fd, size_mb * 1024 * 1024)
        format_volume(path, passphrase, luks_version=luks_version,
                      kdf_iterations=kdf_iterations, iter_time_ms=iter_time_ms)
    except BaseException:
        os.close(fd)
        path.unlink(missing_ok=True)
        raise
    return fd


def passphrase_opens(path: Path, passphrase: bytes) -> bool:
    """True when ``cryptsetup open --test-passphrase`` accepts ``passphrase`` for ``path``."""
    result = subprocess.run(
        [cryptsetup_binary(), "open", "--test-passphrase", "--key-file", "-", str(path)],
        input=passphrase,
        capture_output=True,
        check=False,
    )
    return result.returncode == 0


def open_mapping(path: Path, passphrase: bytes, name: str, *, read_only: bool = False) -> Path:
    """``cryptsetup open`` (dm-crypt); returns the /dev/mapper device."""
    extra = ["--readonly"] if read_only else []
    _run(
        ["open", "--type", "luks", *extra, "--key-file", "-", str(path), name],
        passphrase,
        f"open {path.name} with dm-crypt",
    )
    return Path("/dev/mapper") / name


def close_mapping(name: str) -> None:
    """``cryptsetup close`` a mapping made by ``open_mapping``."""
    _run(["close", name], b"", f"close the mapping {name}")


def dump_volume_key(path: Path, passphrase: bytes) -> bytearray:
    """The volume key as cryptsetup derives it (read from its stdout; never logged or stored).

    Used to cross-check the Python key derivation, and for key slots whose KDF (argon2) the
    Python code does not implement.
    """
    result = _run(
        ["luksDump", "--dump-volume-key", "--batch-mode", "--key-file", "-", str(path)],
        passphrase,
        f"read the volume key of {path.name}",
    )
    text = result.stdout.decode()
    marker = text.find("MK dump:")
    if marker < 0:
        raise VaultError("cryptsetup did not print a volume key.", fix="update cryptsetup.")
    hex_lines: list[str] = []
    for line in text[marker + len("MK dump:") :].splitlines():
        if hex_lines and ":" in line:
            break
        hex_lines.append(line.replace(":", " "))
    return bytearray.fromhex("".join("".join(hex_lines).split()))
