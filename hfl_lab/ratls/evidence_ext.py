"""X.509 extensions that carry TDX evidence: interoperable TCG DICE and Gramine's legacy one.

Interoperable RA-TLS (CCC attestation SIG, implemented by Gramine ``ra_tls_attest.c``):

    extension 2.23.133.5.4.9 (tcg-dice-conceptual-message-wrapper, non-critical) =
      CBOR tag 60000 ( [ bstr quote, bstr claims-buffer ] )
    claims-buffer = serialized CBOR map {
      "pubkey-hash": bstr( serialized [ hash-alg-id, bstr SHA(SPKI DER) ] ),  ; required
      "nonce":       bstr,                                                    ; optional
      ...custom claims (ignored by other verifiers)
    }

``hash-alg-id`` is from IANA's Named Information Hash Algorithm registry (sha-256 = 1,
sha-384 = 7, sha-512 = 8), as the spec and Gramine use it. The lab adds one custom claim,
``"hfl-lab"``: a map with what a peer needs to verify offline (provider, simulated,
produced_at, report_data_encoding, collateral as JSON text, role).

Gramine legacy: the extension value is the raw quote. Gramine writes its OID with the DER
tag and length bytes inside the OID content (``06 09 2A 86 48 86 F8 4D 8A 39 06``), which
X.509 parsers read as 0.6.9.42.840.113741.1337.6; the intended 1.2.840.113741.1337.6 is read too.
"""

from __future__ import annotations

import hashlib
import io
from dataclasses import dataclass
from typing import Any

import cbor2
from cryptography import x509

from hfl_lab._exceptions import AttestationError
from hfl_lab.tee.evidence import Evidence

DICE_EVIDENCE_OID = x509.ObjectIdentifier("2.23.133.5.4.9")
TEE_QUOTE_CBOR_TAG = 60000
#: what Gramine really writes (its OID constant includes the DER tag/length bytes)
GRAMINE_LEGACY_QUOTE_OID = x509.ObjectIdentifier("0.6.9.42.840.113741.1337.6")
#: the OID Gramine meant; some re-implementations write this one
INTEL_RATLS_QUOTE_OID = x509.ObjectIdentifier("1.2.840.113741.1337.6")
LEGACY_QUOTE_OIDS = (GRAMINE_LEGACY_QUOTE_OID, INTEL_RATLS_QUOTE_OID)

PUBKEY_HASH = "pubkey-hash"
NONCE = "nonce"
LAB_CLAIM = "hfl-lab"
#: IANA Named Information hash algorithm ids → (hashlib name, digest size)
HASH_ALGORITHMS: dict[int, tuple[str, int]] = {
    1: ("sha256", 32),
    7: ("sha384", 48),
    8: ("sha512", 64),
}
SHA256_ID = 1

FIX = "present a certificate made by an RA-TLS stack (hfl_lab.ratls, Gramine)"


def _malformed(what: str) -> AttestationError:
    return AttestationError(
        f"the certificate's RA-TLS evidence extension is malformed: {what}",
        check="certificate",
        fix=FIX,
    )


def _cbor_loads(data: bytes, what: str) -> Any:
    """Exactly one CBOR item, nothing after it; every decoder failure becomes one error."""
    stream = io.BytesIO(data)
    try:
        item = cbor2.CBORDecoder(stream).decode()
    except (
        ValueError,
        TypeError,
        LookupError,
        OverflowError,
        MemoryError,
        RecursionError,
        EOFError,
        cbor2.CBORError,
    ) as e:
        raise _malformed(f"{what} is not valid CBOR ({type(e).__name__})") from None
    if stream.tell() != len(data):
        raise _malformed(f"{what} has {len(data) - stream.tell()} bytes after its CBOR item")
    return item


@dataclass(frozen=True)
class DiceEvidence:
    """The decoded interoperable evidence: the quote, the exact claims buffer and its claims."""

    quote: bytes
    claims_buffer: bytes
    claims: dict[str, Any]
    hash_alg_id: int
    pubkey_hash: bytes

    @property
    def nonce(self) -> bytes | None:
        value = self.claims.get(NONCE)
        return value if isinstance(value, bytes) and value else None

    @property
    def lab_claims(self) -> dict[str, Any] | None:
        value = self.claims.get(LAB_CLAIM)
        return value if isinstance(value, dict) else None

    def hash_spki(self, spki: bytes) -> bytes:
        """Hash ``spki`` with the algorithm the pubkey-hash claim names."""
        return hashlib.new(HASH_ALGORITHMS[self.hash_alg_id][0], spki).digest()


# -- encoding -----------------------------------------------------------------------------


def lab_claims(evidence: Evidence, role: str) -> dict[str, Any]:
    """The ``"hfl-lab"`` claim: what a peer needs to rebuild ``Evidence`` and verify offline."""
    claims: dict[str, Any] = {
        "provider": evidence.provider,
        "simulated": evidence.simulated,
        "produced_at": float(evidence.produced_at),
        "report_data_encoding": evidence.report_data_encoding,
        "role": role,
    }
    if evidence.collateral_json is not None:
        claims["collateral"] = evidence.collateral_json
    return claims


def encode_claims(
    pubkey_hash: bytes, *, nonce: bytes | None = None, lab: dict[str, Any] | None = None
) -> bytes:
    """The serialized claims map (SHA-256 ``pubkey_hash``), deterministic CBOR."""
    claims: dict[str, Any] = {PUBKEY_HASH: cbor2.dumps([SHA256_ID, pubkey_hash], canonical=True)}
    if nonce:
        claims[NONCE] = nonce
    if lab is not None:
        claims[LAB_CLAIM] = lab
    return cbor2.dumps(claims, canonical=True)


def encode_dice_extension(quote: bytes, claims_buffer: bytes) -> bytes:
    """The value of extension 2.23.133.5.4.9: tag 60000 ( [quote, claims-buffer] )."""
    return cbor2.dumps(cbor2.CBORTag(TEE_QUOTE_CBOR_TAG, [quote, claims_buffer]))


def encode_legacy_extension(quote: bytes) -> bytes:
    """Gramine's legacy extension value: the raw quote (for tests and interop fixtures)."""
    return bytes(quote)


# -- decoding -----------------------------------------------------------------------------


def decode_dice_extension(value: bytes) -> DiceEvidence:
    """Decode and shape-check extension 2.23.133.5.4.9; raises ``AttestationError``."""
    item = _cbor_loads(value, "the extension value")
    if not isinstance(item, cbor2.CBORTag) or item.tag != TEE_QUOTE_CBOR_TAG:
        got = f"tag {item.tag}" if isinstance(item, cbor2.CBORTag) else type(item).__name__
        raise _malformed(f"expected CBOR tag {TEE_QUOTE_CBOR_TAG} (TEE quote), found {got}")
    array = item.value
    if not isinstance(array, list | tuple) or len(array) != 2:
        raise _malformed("tag 60000 must wrap an array of two byte strings [quote, claims]")
    quote, claims_buffer = array
    if not isinstance(quote, bytes) or not quote:
        raise _malformed("the quote (array item 0) is not a non-empty byte string")
    if not isinstance(claims_buffer, bytes) or not claims_buffer:
        raise _malformed("the claims (array item 1) are not a non-empty byte string")
    claims = _cbor_loads(claims_buffer, "the claims buffer")
    if not isinstance(claims, dict) or not all(isinstance(k, str) for k in claims):
        raise _malformed("the claims buffer is not a CBOR map with text keys")
    alg, digest = _pubkey_hash(claims)
    nonce = claims.get(NONCE)
    if nonce is not None and not isinstance(nonce, bytes):
        raise _malformed("the nonce claim is not a byte string")
    lab = claims.get(LAB_CLAIM)
    if lab is not None:
        _check_lab_claims(lab)
    return DiceEvidence(bytes(quote), bytes(claims_buffer), claims, alg, digest)


def _pubkey_hash(claims: dict[str, Any]) -> tuple[int, bytes]:
    raw = claims.get(PUBKEY_HASH)
    if raw is None:
        raise _malformed("the required pubkey-hash claim is missing")
    if not isinstance(raw, bytes):
        raise _malformed("the pubkey-hash claim is not a byte string (serialized hash-entry)")
    entry = _cbor_loads(raw, "the pubkey-hash claim")
    if not isinstance(entry, list | tuple) or len(entry) != 2:
        raise _malformed("the pubkey-hash claim is not a [hash-alg-id, hash-value] array")
    alg, digest = entry
    if not isinstance(alg, int) or isinstance(alg, bool) or alg not in HASH_ALGORITHMS:
        raise _malformed(
            f"pubkey-hash uses hash algorithm id {alg!r}; supported: 1 (sha-256), "
            "7 (sha-384), 8 (sha-512)"
        )
    if not isinstance(digest, bytes) or len(digest) != HASH_ALGORITHMS[alg][1]:
        raise _malformed(f"the pubkey-hash value is not a {HASH_ALGORITHMS[alg][1]}-byte string")
    return alg, digest


_LAB_TYPES: dict[str, tuple[type, ...]] = {
    "provider": (str,),
    "simulated": (bool,),
    "produced_at": (int, float),
    "report_data_encoding": (str,),
    "collateral": (str,),
    "role": (str,),
}


def _check_lab_claims(lab: Any) -> None:
    if not isinstance(lab, dict):
        raise _malformed("the hfl-lab claim is not a map")
    for name, types in _LAB_TYPES.items():
        if name in lab and not isinstance(lab[name], types):
            raise _malformed(f"hfl-lab claim field '{name}' has the wrong type")


def decode_legacy_extension(value: bytes) -> bytes:
    """Gramine's legacy extension: the raw quote bytes."""
    if not value:
        raise _malformed("the legacy quote extension is empty")
    return bytes(value)
