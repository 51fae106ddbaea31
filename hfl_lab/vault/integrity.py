"""Checkpoint MACs: LUKS hides data but does not detect tampering, so metadata carries an HMAC.

The MAC key is derived with HKDF from the volume key (domain-separated, bound to the volume
UUID), so only a holder of the volume secret can make a valid checkpoint.
"""

from __future__ import annotations

import hashlib
import hmac
import json
from collections.abc import Mapping
from typing import Any

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from hfl_lab._exceptions import VaultError

_MAC_INFO = b"hfl-lab/vault/checkpoint-mac/v1"


def canonical_json(value: Mapping[str, Any]) -> bytes:
    """One byte string per value: sorted keys, no spaces, UTF-8; what MACs and signatures cover."""
    try:
        return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()
    except (TypeError, ValueError) as error:
        raise VaultError(
            f"checkpoint metadata is not plain JSON ({error}).",
            fix="pass metadata made of dicts, lists, str, int, float, bool and None only.",
        ) from error


def derive_mac_key(volume_key: bytes, volume_uuid: str) -> bytes:
    """HKDF-SHA256(volume key, salt = volume UUID, info = purpose) → 32-byte MAC key."""
    return HKDF(
        algorithm=hashes.SHA256(), length=32, salt=volume_uuid.encode(), info=_MAC_INFO
    ).derive(volume_key)


def mac(key: bytes, record: Mapping[str, Any]) -> str:
    """HMAC-SHA256 of the canonical JSON of ``record`` without its ``mac`` field."""
    body = {name: value for name, value in record.items() if name != "mac"}
    return hmac.new(key, canonical_json(body), hashlib.sha256).hexdigest()


def mac_matches(key: bytes, record: Mapping[str, Any]) -> bool:
    claimed = record.get("mac")
    return isinstance(claimed, str) and hmac.compare_digest(claimed, mac(key, record))
