"""Key release crypto, challenges and sealed state of the trust service."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric import ec

from hfl_lab import AttestationError
from hfl_lab.trust.nonces import NonceStore
from hfl_lab.trust.sealed import seal_state, unseal_state
from hfl_lab.trust.wrap import WrappedSecret, unwrap_secret, wrap_secret

CTX = b"hfl-tdx-coco-app/volume-passphrase"


@pytest.mark.parametrize("curve", [ec.SECP256R1(), ec.SECP384R1()])
def test_wrapped_secret_opens_only_with_the_recipients_key(curve: ec.EllipticCurve) -> None:
    td_key = ec.generate_private_key(curve)
    other = ec.generate_private_key(curve)
    secret = os.urandom(48)

    wrapped = wrap_secret(secret, td_key.public_key(), CTX)

    assert unwrap_secret(wrapped, td_key, CTX) == secret
    assert secret not in wrapped.ciphertext and secret.hex() not in repr(wrapped)
    with pytest.raises(AttestationError, match="cannot be unwrapped"):
        unwrap_secret(wrapped, other, CTX)
    with pytest.raises(AttestationError, match="cannot be unwrapped"):
        unwrap_secret(wrapped, td_key, b"another-app/secret")


def test_tampered_wrapping_is_refused() -> None:
    td_key = ec.generate_private_key(ec.SECP256R1())
    wrapped = wrap_secret(b"s" * 32, td_key.public_key(), CTX)
    flipped = bytearray(wrapped.ciphertext)
    flipped[0] ^= 1

    with pytest.raises(AttestationError):
        unwrap_secret(WrappedSecret(wrapped.ephemeral_public, wrapped.nonce, bytes(flipped)),
                      td_key, CTX)


def test_nonce_is_single_use_and_short_lived() -> None:
    now = [1000.0]
    store = NonceStore(ttl_s=30, clock=lambda: now[0])
    fresh, issued = store.issue()
    late, _ = store.issue()

    assert store.consume(fresh) == issued
    with pytest.raises(AttestationError, match="already used"):
        store.consume(fresh)
    now[0] += 31
    with pytest.raises(AttestationError, match="expired"):
        store.consume(late)
    with pytest.raises(AttestationError, match="unknown"):
        store.consume(os.urandom(32))


def test_sealed_state_round_trips_and_holds_no_plaintext(tmp_path: Path) -> None:
    owner = os.urandom(32)
    secret = os.urandom(32).hex()
    path = tmp_path / "trust-state.sealed"

    seal_state(path, {"secrets": {"app": secret}}, owner)

    assert unseal_state(path, owner) == {"secrets": {"app": secret}}
    assert secret.encode() not in path.read_bytes()
    with pytest.raises(AttestationError, match="wrong owner key"):
        unseal_state(path, os.urandom(32))
