"""The trust service's state at rest, sealed (AES-256-GCM) under a key the lab owner holds."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from hfl_lab._exceptions import AttestationError, ConfigError

_MAGIC = b"HFLSEAL1"


def _key(owner_key: bytes) -> bytes:
    if len(owner_key) < 32:
        raise ConfigError("the owner's sealing key must be at least 32 bytes")
    return HKDF(
        algorithm=hashes.SHA256(), length=32, salt=_MAGIC, info=b"hfl-lab/trust-state"
    ).derive(owner_key)


def seal_state(path: Path, state: dict[str, Any], owner_key: bytes) -> None:
    """Write ``state`` encrypted and authenticated; atomic (temp file + rename)."""
    nonce = os.urandom(12)
    body = AESGCM(_key(owner_key)).encrypt(nonce, json.dumps(state).encode(), _MAGIC)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(_MAGIC + nonce + body)
        f.flush()
        os.fsync(f.fileno())
    tmp.replace(path)


def unseal_state(path: Path, owner_key: bytes) -> dict[str, Any]:
    data = path.read_bytes()
    if not data.startswith(_MAGIC) or len(data) < len(_MAGIC) + 12 + 16:
        raise AttestationError(f"{path} is not a sealed trust-service state file", check="state")
    try:
        plain = AESGCM(_key(owner_key)).decrypt(data[8:20], data[20:], _MAGIC)
    except InvalidTag:
        raise AttestationError(
            f"cannot unseal {path}: wrong owner key or the file was modified",
            check="state",
            fix="start the service with the owner key it was sealed under",
        ) from None
    state: dict[str, Any] = json.loads(plain)
    return state
