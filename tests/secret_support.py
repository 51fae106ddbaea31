"""What the tests that search files for leaked secrets share: the private key encodings."""

from __future__ import annotations

import re

__all__ = ["PRIVATE_KEY_PATTERNS"]

#: any private key encoding at all: PEM ``PRIVATE KEY`` blocks, DER PKCS#8 and SEC1 EC private
#: keys, armored OpenPGP secret keys. DER prefixes: PKCS#8 PrivateKeyInfo for EC (version 0,
#: id-ecPublicKey) and SEC1 ECPrivateKey (version 1, OCTET STRING of 32 or 48 bytes: P-256,
#: P-384)
PRIVATE_KEY_PATTERNS = [
    re.compile(rb"-----BEGIN [A-Z ]*PRIVATE KEY-----"),
    re.compile(rb"\x02\x01\x00\x30\x13\x06\x07\x2a\x86\x48\xce\x3d\x02\x01"),
    re.compile(rb"\x30(?:\x77|\x81.)\x02\x01\x01\x04[\x20\x30]", re.DOTALL),
    re.compile(rb"-----BEGIN PGP PRIVATE KEY BLOCK-----"),
]
