"""The lab owner's credential for a session: held in memory, shared with the lab's own kernels.

The owner administers the trust service (installs the policy, registers the volume passphrase)
and, on the trusted node, opens the trust service's sealed state to obtain the volume passphrase
after the service has stopped. Both credentials derive from one random **owner secret**:

- ``admin_token(salt)``: the trust service's admin credential for one run (``salt`` is public,
  stored in the run folder, so each run has its own token);
- ``sealing_key(admin_token)``: the key the trust service seals its state with (the state holds
  the volume passphrase), so whoever holds the admin token can also unseal the state;
- ``policy_signing_key(admin_token)``: the Ed25519 key the owner signs a run's attestation
  policies with; its public half (``policy_key``) is in the participant config every TD
  measures, so a policy swapped on the way (a ConfigMap, a file) is refused.

The owner secret is never written to a file and never logged. It lives in the process
environment variable ``HFL_LAB_OWNER_SECRET``: ``hfl-lab run`` and ``hfl-lab lab`` create it once,
and every notebook kernel they start inherits it, so notebook 05 (a fresh kernel) can open what
notebook 04 sealed, the way ``ssh-agent`` serves one login session. Participant TDs never get it:
backends remove it from their environment. A kernel started some other way (plain
``jupyter lab``) makes its own secret, which the sealed state of another kernel does not open;
:func:`unsealing_failed` words that case (``retrieve_as_owner`` raises it).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from hfl_lab._exceptions import ConfigError, VaultError

__all__ = [
    "OWNER_SECRET_ENV",
    "admin_token",
    "ensure_owner_secret",
    "new_salt",
    "owner_secret",
    "policy_key",
    "policy_signature_valid",
    "policy_signing_key",
    "read_run_salt",
    "run_salt",
    "sealing_key",
    "unsealing_failed",
]

#: the environment variable carrying the session's owner secret (hex) to the lab's kernels
OWNER_SECRET_ENV = "HFL_LAB_OWNER_SECRET"  # noqa: S105 - a variable name
_SECRET_BYTES = 32


def ensure_owner_secret() -> None:
    """Create this session's owner secret unless the environment already carries one.

    Call it before starting kernels (papermill, JupyterLab) so they all share it.
    """
    owner_secret()


def owner_secret() -> bytes:
    """The session's owner secret: from ``HFL_LAB_OWNER_SECRET``, or a new one put there."""
    raw = os.environ.get(OWNER_SECRET_ENV, "")
    if not raw:
        secret = os.urandom(_SECRET_BYTES)
        os.environ[OWNER_SECRET_ENV] = secret.hex()
        return secret
    try:
        secret = bytes.fromhex(raw)
    except ValueError:
        secret = b""
    if len(secret) < _SECRET_BYTES:
        raise ConfigError(
            f"{OWNER_SECRET_ENV} is not {_SECRET_BYTES} random bytes in hex.",
            fix=f"unset {OWNER_SECRET_ENV}; hfl-lab creates one for its session.",
        )
    return secret


def new_salt() -> bytes:
    """A run's public salt: what makes its admin token its own."""
    return os.urandom(16)


def read_run_salt(path: Path) -> bytes:
    """The public salt a run keeps in ``trust/owner.json``; ``VaultError`` when unreadable."""
    try:
        return bytes.fromhex(json.loads(Path(path).read_text())["salt"])
    except (OSError, ValueError, KeyError, TypeError):
        raise VaultError(
            f"cannot read the run's owner salt {path}.",
            fix="keep the run folder's trust/ directory with the volume.",
        ) from None


def run_salt(path: Path) -> bytes:
    """The run's public salt from ``path``, or a new one written there (a resumed run keeps its
    admin credential)."""
    try:
        return read_run_salt(path)
    except VaultError:
        salt = new_salt()
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps({"salt": salt.hex()}) + "\n")
        return salt


def _derive(key: bytes, info: bytes) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=info).derive(key)


def admin_token(salt: bytes) -> bytes:
    """The admin credential of the run with this ``salt``, for this session's owner."""
    return _derive(owner_secret(), b"hfl-lab/owner/admin-token/" + salt)


def sealing_key(token: bytes) -> bytes:
    """The key the trust service seals its state with, derived from the run's admin token."""
    return _derive(token, b"hfl-lab/owner/trust-state-sealing")


def policy_signing_key(token: bytes) -> Ed25519PrivateKey:
    """The key the owner signs the run's policies with, derived from the run's admin token."""
    return Ed25519PrivateKey.from_private_bytes(_derive(token, b"hfl-lab/owner/policy-signing"))


def policy_key(token: bytes) -> str:
    """The public half of :func:`policy_signing_key`, hex (what the config carries)."""
    return policy_signing_key(token).public_key().public_bytes(
        serialization.Encoding.Raw, serialization.PublicFormat.Raw).hex()


def policy_signature_valid(key_hex: str, data: bytes, signature: bytes) -> bool:
    """Whether ``signature`` is the owner's (``key_hex``) over ``data``."""
    try:
        Ed25519PublicKey.from_public_bytes(bytes.fromhex(key_hex)).verify(signature, data)
    except (InvalidSignature, ValueError):
        return False
    return True


def unsealing_failed(state_path: object) -> VaultError:
    """The error for a sealed state that this session's owner secret does not open."""
    return VaultError(
        f"this session's owner credential does not open the trust service's sealed state "
        f"{state_path} (wrong owner key): it was sealed in another lab session (another "
        "hfl-lab run or JupyterLab started some other way), or the file was modified.",
        fix="run notebooks 04 and 05 in one session: `hfl-lab run`, or JupyterLab started with "
        "`hfl-lab lab`; or re-run notebook 04 in this session.",
    )
