"""Who the trust service's owner is, and whether the owner has provisioned it yet.

A trust service started in its TD knows only the *public* half of the owner's identity: the
policy key (``deployment.policy_key``) in its measured configuration. The owner's admin
credential arrives afterwards, over the attested channel (``Provision``), once the owner has
verified the service's RA-TLS evidence and pinned its certificate: never through a Secret, a
ConfigMap, an environment variable or the pod spec, which the host and the cluster admin
control. The gate accepts only the credential whose derived policy key is the measured one, so
neither a cluster admin nor another participant can provision a service as its owner, and it
keeps only the credential's hash. Until it is provisioned the service serves nothing else.

A service made in-process with its credential (tests, benchmarks, the lab's embedded service)
is provisioned from the start.
"""

from __future__ import annotations

import hashlib
import hmac
import threading

from hfl_lab import owner
from hfl_lab._exceptions import ConfigError

#: the gRPC metadata that carries the owner's credential on admin calls
ADMIN_HEADER = "authorization"
#: an admin credential is 32 random bytes; no valid request carries more than this
MAX_TOKEN_BYTES = 256
MIN_TOKEN_BYTES = 16


def admin_metadata(token: bytes) -> tuple[tuple[str, str], ...]:
    return ((ADMIN_HEADER, f"Bearer {token.hex()}"),)


def token_of(metadata: dict[str, str | bytes]) -> bytes:
    """The credential an admin call presents (empty when none or malformed)."""
    presented = metadata.get(ADMIN_HEADER, "")
    text = presented.decode(errors="replace") if isinstance(presented, bytes) else presented
    try:
        return bytes.fromhex(text.removeprefix("Bearer ").strip()[: 2 * MAX_TOKEN_BYTES])
    except ValueError:
        return b""


class OwnerGate:
    """The owner's credential as the service knows it: a hash, once provisioned."""

    def __init__(self, admin_token: bytes | None, policy_key: str = "") -> None:
        if admin_token is None and not policy_key:
            raise ConfigError(
                "a trust service that awaits its owner's credential must know the owner's "
                "policy key, or anyone could provision it.",
                fix="start it with the run's participant config, whose deployment.policy_key "
                "the owner's backend writes (and MR_CONFIG_ID measures).",
            )
        self.policy_key = policy_key
        self._hash: bytes | None = None
        self.provisioned = threading.Event()
        if admin_token is not None:
            if len(admin_token) < MIN_TOKEN_BYTES:
                raise ConfigError("the admin credential must be at least 16 random bytes")
            refused = self.refusal(admin_token)
            if refused:
                raise ConfigError(refused)
            self.accept(admin_token)

    def refusal(self, token: bytes) -> str:
        """Why ``token`` is not the owner's credential ("" when it is)."""
        if not MIN_TOKEN_BYTES <= len(token) <= MAX_TOKEN_BYTES:
            return (f"an admin credential is {MIN_TOKEN_BYTES} to {MAX_TOKEN_BYTES} bytes, "
                    f"not {len(token)}")
        if self._hash is not None:
            if not hmac.compare_digest(hashlib.sha256(token).digest(), self._hash):
                return "not the credential this service was provisioned with"
            return ""
        if self.policy_key and not hmac.compare_digest(owner.policy_key(token),
                                                       self.policy_key):
            return ("not the owner's credential: the policy key it derives is not the one in "
                    "this service's measured configuration")
        return ""

    def accept(self, token: bytes) -> None:
        self._hash = hashlib.sha256(token).digest()
        self.provisioned.set()

    def is_owner(self, token: bytes) -> bool:
        """Whether an admin call's credential is the provisioned one."""
        if self._hash is None or not token:
            return False
        return hmac.compare_digest(hashlib.sha256(token).digest(), self._hash)
