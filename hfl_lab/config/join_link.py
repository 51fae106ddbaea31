"""The join link: one copy-pasteable line that invites one participant into a hosted run.

``hfl-lab host`` prints one link per expected worker slot; ``hfl-lab join <link>`` reads it.
A link is ``hfl-join:`` followed by the base64url (unpadded) encoding of a compact JSON object:

    v        format version (1)
    trust    the trust service's address, host:port (what the joiner attests to)
    ps       ps0's address, host:port
    expect   the trust service's expected measurements, ``{"mr_td": hex, "mr_config_id": hex}``:
             the joiner verifies the host's trust service against these before it sends anything
    policy   SHA-256 (hex) of the run's signed attestation policy
    slot     the participant name the joiner takes (``worker3``)
    exp      expiry, Unix seconds
    root     SHA-256 (hex) of the simulated lab platform's root certificate; empty for real TDX
    code     the enrollment code: a random nonce (base64url)
    mac      HMAC-SHA256 of everything above, keyed with the host's enrollment key (base64url)

The enrollment code only limits who may *try* to join, attestation stays the gate: a joiner
whose evidence does not match the policy is refused whatever link it holds. The MAC lets the
host (who alone holds the key, in memory) refuse a link that was edited, e.g. a slot or expiry
changed; a joiner cannot check the MAC, it checks the shape, the expiry and, once connected, the
trust service's measurements. The link carries no secret that attestation relies on.

It lives with the parameter schema, the lowest layer, because both the owner's side (the host)
and the workload (a joining worker) read it.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import re
import secrets
import time
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from hfl_lab._exceptions import AttestationError, ConfigError

__all__ = ["JOIN_LINK_PREFIX", "JoinLink", "enrollment_key"]

JOIN_LINK_PREFIX = "hfl-join:"
VERSION = 1
#: links are short-lived: a workshop hands them out minutes before the run
DEFAULT_TTL_S = 3600.0
MAX_LINK_CHARS = 4096
_FIELDS = ("v", "trust", "ps", "expect", "policy", "slot", "exp", "root", "code", "mac")
_MEASUREMENTS = {"mr_td": 48, "mr_config_id": 48}
_SLOT = re.compile(r"^worker[0-9]{1,4}$")
_HEX = re.compile(r"^[0-9a-f]*$")
_B64 = re.compile(r"^[A-Za-z0-9_-]+$")
_FIX_NEW_LINK = ("ask the host for a fresh link (`hfl-lab host` prints one per slot) and paste "
                 "it whole.")


def enrollment_key() -> bytes:
    """A fresh host enrollment key (memory only; a host restart issues new links)."""
    return secrets.token_bytes(32)


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def _address(name: str, value: object) -> str:
    text = str(value) if isinstance(value, str) else ""
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigError(
            f"the join link's {name} address must be host:port, got {value!r}.",
            fix=_FIX_NEW_LINK,
        )
    return text


@dataclass(frozen=True)
class JoinLink:
    """One invitation: where the run is, whom to trust, which slot, until when, and the code."""

    trust_address: str
    ps_address: str
    #: the trust service's expected measurements (hex): ``mr_td`` and ``mr_config_id``
    trust_measurements: Mapping[str, str]
    policy_sha256: str
    slot: str
    expires_at: float
    #: SHA-256 (hex) of the simulated lab platform's root certificate that signs the trust
    #: service's evidence; empty: real TDX evidence, verified against Intel's root
    lab_root_sha256: str = ""
    code: str = ""
    mac: str = field(default="", repr=False)

    def __post_init__(self) -> None:
        _address("trust", self.trust_address)
        _address("ps", self.ps_address)
        if not _SLOT.match(self.slot):
            raise ConfigError(f"the join link's slot must be worker<N>, got {self.slot!r}.",
                              fix=_FIX_NEW_LINK)
        if set(self.trust_measurements) != set(_MEASUREMENTS):
            raise ConfigError(
                "the join link's expected trust-service measurements must be exactly "
                f"{', '.join(_MEASUREMENTS)}; got {', '.join(sorted(self.trust_measurements))}.",
                fix=_FIX_NEW_LINK)
        for name, size in _MEASUREMENTS.items():
            value = self.trust_measurements[name]
            if not isinstance(value, str) or len(value) != 2 * size or not _HEX.match(value):
                raise ConfigError(
                    f"the join link's expected {name} must be {2 * size} lowercase hex digits.",
                    fix=_FIX_NEW_LINK)
        if self.lab_root_sha256 and (len(self.lab_root_sha256) != 64
                                     or not _HEX.match(self.lab_root_sha256)):
            raise ConfigError("the join link's lab root digest must be 64 lowercase hex digits "
                              "(or empty for real TDX).", fix=_FIX_NEW_LINK)
        if len(self.policy_sha256) != 64 or not _HEX.match(self.policy_sha256):
            raise ConfigError("the join link's policy digest must be 64 lowercase hex digits.",
                              fix=_FIX_NEW_LINK)

    # ------------------------------------------------------------------ the host's side

    @classmethod
    def issue(cls, key: bytes, *, trust_address: str, ps_address: str,
              trust_measurements: Mapping[str, str], policy_sha256: str, slot: str,
              lab_root_sha256: str = "", ttl_s: float = DEFAULT_TTL_S,
              now: float | None = None) -> JoinLink:
        """A new link for ``slot``, with a fresh enrollment code, MAC'd with the host's key."""
        if ttl_s <= 0:
            raise ConfigError(f"a join link's lifetime must be positive, got {ttl_s} s.",
                              fix="pass ttl_s > 0 (e.g. 3600 for an hour).")
        start = time.time() if now is None else now
        link = cls(trust_address=trust_address, ps_address=ps_address,
                   trust_measurements=dict(trust_measurements), policy_sha256=policy_sha256,
                   slot=slot, expires_at=float(int(start + ttl_s)),
                   lab_root_sha256=lab_root_sha256,
                   code=_b64(secrets.token_bytes(12)))
        return replace(link, mac=link._mac(key))

    def check_enrollment(self, key: bytes, *, now: float | None = None) -> None:
        """The host's check of a presented link: its MAC (not edited) and its expiry."""
        if not self.mac or not hmac.compare_digest(self.mac, self._mac(key)):
            raise ConfigError(
                f"the join link for {self.slot} was altered or was not issued by this host "
                "(its enrollment code does not verify).",
                fix=_FIX_NEW_LINK)
        self._check_expiry(time.time() if now is None else now)

    def _mac(self, key: bytes) -> str:
        payload = self._payload()
        payload.pop("mac")
        body = json.dumps(payload, sort_keys=True, separators=(",", ":")).encode()
        return _b64(hmac.new(key, body, hashlib.sha256).digest())

    # ------------------------------------------------------------------ text form

    def _payload(self) -> dict[str, Any]:
        return {"v": VERSION, "trust": self.trust_address, "ps": self.ps_address,
                "expect": dict(self.trust_measurements), "policy": self.policy_sha256,
                "slot": self.slot, "exp": int(self.expires_at), "root": self.lab_root_sha256,
                "code": self.code,
                "mac": self.mac}

    def encode(self) -> str:
        """The link as one line: ``hfl-join:<base64url JSON>``."""
        body = json.dumps(self._payload(), separators=(",", ":")).encode()
        return JOIN_LINK_PREFIX + _b64(body)

    def __str__(self) -> str:
        return self.encode()

    @classmethod
    def parse(cls, text: str, *, now: float | None = None) -> JoinLink:
        """Read a pasted link; refuse a malformed or expired one with the fix."""
        text = text.strip()
        if not text.startswith(JOIN_LINK_PREFIX):
            raise ConfigError(
                f"a join link starts with {JOIN_LINK_PREFIX!r}; got {text[:20]!r}...",
                fix=_FIX_NEW_LINK)
        body = text[len(JOIN_LINK_PREFIX):]
        if len(text) > MAX_LINK_CHARS or not body or not _B64.match(body):
            raise ConfigError(
                "the join link is not one base64url word after 'hfl-join:' (was it cut, "
                "wrapped or quoted when pasted?).",
                fix=_FIX_NEW_LINK)
        try:
            payload = json.loads(_unb64(body))
        except (binascii.Error, ValueError):
            raise ConfigError("the join link is damaged: its body is not the host's JSON "
                              "(was it cut short when copied?).", fix=_FIX_NEW_LINK) from None
        if not isinstance(payload, dict):
            raise ConfigError("the join link is damaged: its body is not a JSON object.",
                              fix=_FIX_NEW_LINK)
        if payload.get("v") != VERSION:
            raise ConfigError(
                f"the join link has format version {payload.get('v')!r}; this hfl-lab reads "
                f"version {VERSION}.",
                fix="use the same hfl-lab version as the host (pip install -U hfl-lab).")
        missing = [f for f in _FIELDS if f not in payload]
        extra = sorted(set(payload) - set(_FIELDS))
        if missing or extra:
            raise ConfigError(
                "the join link is damaged: "
                + (f"missing {', '.join(missing)}" if missing else "")
                + ("; " if missing and extra else "")
                + (f"unknown {', '.join(extra)}" if extra else "") + ".",
                fix=_FIX_NEW_LINK)
        exp, expect = payload["exp"], payload["expect"]
        texts = ("trust", "ps", "policy", "slot", "root", "code", "mac")
        if (not isinstance(exp, int) or isinstance(exp, bool) or not isinstance(expect, dict)
                or any(not isinstance(payload[f], str) for f in texts)):
            raise ConfigError("the join link is damaged: a field has the wrong type.",
                              fix=_FIX_NEW_LINK)
        if not _B64.match(payload["code"]) or not _B64.match(payload["mac"]):
            raise ConfigError("the join link has no valid enrollment code.", fix=_FIX_NEW_LINK)
        link = cls(trust_address=payload["trust"], ps_address=payload["ps"],
                   trust_measurements=expect, policy_sha256=payload["policy"],
                   slot=payload["slot"], expires_at=float(exp),
                   lab_root_sha256=payload["root"], code=payload["code"],
                   mac=payload["mac"])
        link._check_expiry(time.time() if now is None else now)
        return link

    def _check_expiry(self, now: float) -> None:
        if now >= self.expires_at:
            ago = now - self.expires_at
            raise ConfigError(
                f"the join link for {self.slot} expired {ago:.0f} s ago "
                f"(links are short-lived on purpose).",
                fix=_FIX_NEW_LINK)

    def check_trust_service(self, measured: Mapping[str, str]) -> None:
        """The joiner's check of the host's trust service, before it sends anything: its
        attested measurements must be the ones the link names; the differing one is named."""
        for name in _MEASUREMENTS:
            want, got = self.trust_measurements[name], str(measured.get(name, ""))
            if not hmac.compare_digest(want, got):
                raise AttestationError(
                    f"the host's trust service at {self.trust_address} is not the one the "
                    f"join link names: {name} is {got[:16] or '(missing)'}..., the link "
                    f"expects {want[:16]}....",
                    check=name, expected=want, actual=got or None,
                    fix="do not join: ask the host whether its trust service was changed, and "
                    "get a link printed by the running host.")
