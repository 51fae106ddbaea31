"""The join link (issue 23 item 1): round trip, and refusal of malformed, expired, tampered links
and of a trust service whose measurements differ from the link's."""

from __future__ import annotations

import base64
import dataclasses
import json

import pytest

from hfl_lab import AttestationError, ConfigError
from hfl_lab.config.join_link import JOIN_LINK_PREFIX, JoinLink, enrollment_key

NOW = 1_800_000_000.0
EXPECT = {"mr_td": "ab" * 48, "mr_config_id": "cd" * 48}


def _issue(key: bytes, slot: str = "worker1", ttl_s: float = 600.0) -> JoinLink:
    return JoinLink.issue(key, trust_address="10.23.0.1:50051", ps_address="10.23.0.1:50052",
                          trust_measurements=EXPECT, policy_sha256="ef" * 32, slot=slot,
                          lab_root_sha256="12" * 32, ttl_s=ttl_s, now=NOW)


def _edit(text: str, **changes: object) -> str:
    body = text[len(JOIN_LINK_PREFIX):]
    payload = json.loads(base64.urlsafe_b64decode(body + "=" * (-len(body) % 4)))
    payload.update(changes)
    raw = json.dumps(payload, separators=(",", ":")).encode()
    return JOIN_LINK_PREFIX + base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def test_a_link_round_trips_as_one_compact_line_and_the_host_accepts_it() -> None:
    key = enrollment_key()
    link = _issue(key)

    text = link.encode()
    parsed = JoinLink.parse(f"  {text}\n", now=NOW + 1)

    assert text.startswith(JOIN_LINK_PREFIX) and "\n" not in text and " " not in text
    assert len(text) < 800  # two 48-byte measurements and two digests, in hex
    assert parsed == link
    assert parsed.trust_address == "10.23.0.1:50051" and parsed.slot == "worker1"
    parsed.check_enrollment(key, now=NOW + 1)


def test_each_link_has_its_own_enrollment_code() -> None:
    key = enrollment_key()

    a, b = _issue(key, "worker0"), _issue(key, "worker0")

    assert a.code != b.code and a.mac != b.mac


@pytest.mark.parametrize(
    ("text", "words"),
    [
        ("https://example.org/join", "starts with 'hfl-join:'"),
        ("hfl-join:", "base64url"),
        ("hfl-join:abc def", "base64url"),
        ("hfl-join:" + "A" * 5000, "base64url"),
        ("hfl-join:eyJ2IjoxLCJ0cnVzdCI6", "damaged"),  # cut short
        ("hfl-join:" + base64.urlsafe_b64encode(b"[1,2]").decode().rstrip("="), "JSON object"),
    ],
)
def test_a_malformed_link_is_refused_with_the_fix(text: str, words: str) -> None:
    with pytest.raises(ConfigError, match=words) as info:
        JoinLink.parse(text, now=NOW)

    assert "fresh link" in str(info.value)


@pytest.mark.parametrize(
    ("changes", "words"),
    [
        ({"v": 2}, "format version 2"),
        ({"slot": "ps0"}, "slot must be worker<N>"),
        ({"trust": "10.23.0.1"}, "trust address must be host:port"),
        ({"expect": {"mr_td": "ab" * 48}}, "exactly mr_td, mr_config_id"),
        ({"expect": {"mr_td": "AB" * 48, "mr_config_id": "cd" * 48}}, "lowercase hex"),
        ({"policy": "ef"}, "policy digest"),
        ({"root": "12"}, "lab root digest"),
        ({"exp": "soon"}, "wrong type"),
        ({"extra": 1}, "unknown extra"),
        ({"code": ""}, "enrollment code"),
    ],
)
def test_a_link_with_a_bad_field_is_refused_naming_the_field(changes, words) -> None:
    text = _edit(_issue(enrollment_key()).encode(), **changes)

    with pytest.raises(ConfigError, match=words):
        JoinLink.parse(text, now=NOW)


def test_an_expired_link_is_refused_by_the_joiner_and_by_the_host() -> None:
    key = enrollment_key()
    link = _issue(key, ttl_s=60)

    with pytest.raises(ConfigError, match="expired 40 s ago"):
        JoinLink.parse(link.encode(), now=NOW + 100)
    with pytest.raises(ConfigError, match="expired"):
        link.check_enrollment(key, now=NOW + 100)


@pytest.mark.parametrize("changes", [{"slot": "worker7"}, {"exp": int(NOW) + 10**6},
                                     {"ps": "10.23.0.9:50052"}, {"code": "AAAA"}])
def test_a_tampered_link_parses_but_the_host_refuses_its_enrollment(changes) -> None:
    key = enrollment_key()
    text = _edit(_issue(key).encode(), **changes)

    link = JoinLink.parse(text, now=NOW)

    with pytest.raises(ConfigError, match="altered or was not issued by this host"):
        link.check_enrollment(key, now=NOW)


def test_a_link_from_another_host_is_refused() -> None:
    link = _issue(enrollment_key())

    with pytest.raises(ConfigError, match="not issued by this host"):
        link.check_enrollment(enrollment_key(), now=NOW)


def test_the_joiner_refuses_a_trust_service_naming_the_differing_measurement() -> None:
    link = _issue(enrollment_key())

    link.check_trust_service(dict(EXPECT))
    with pytest.raises(AttestationError, match="mr_config_id is eeeeeeeeeeeeeeee") as info:
        link.check_trust_service({"mr_td": "ab" * 48, "mr_config_id": "ee" * 48})
    assert "do not join" in str(info.value)
    assert info.value.check == "mr_config_id" and info.value.expected == "cd" * 48
    with pytest.raises(AttestationError, match=r"mr_td is \(missing\)"):
        link.check_trust_service({"mr_config_id": "cd" * 48})


def test_a_link_needs_a_positive_lifetime() -> None:
    with pytest.raises(ConfigError, match="lifetime must be positive"):
        _issue(enrollment_key(), ttl_s=0)


def test_the_joiners_policy_for_the_host_comes_from_the_link_alone() -> None:
    from hfl_lab.lab.joining import link_policy  # the lab layer (gRPC, the verifier)

    simulated = link_policy(_issue(enrollment_key()))
    hardware = link_policy(dataclasses.replace(_issue(enrollment_key()), lab_root_sha256=""))

    assert simulated.allow_simulated and simulated.pccs_url is None
    assert not hardware.allow_simulated
    assert hardware.pccs_url == "https://api.trustedservices.intel.com", "Intel's collateral"
    for policy in (simulated, hardware):
        assert policy.roles["trust"]["mr_config_id"] == (EXPECT["mr_config_id"],)
        assert policy.mr_td == (EXPECT["mr_td"],)
