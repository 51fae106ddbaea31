"""Helpers shared by the vault tests: small fast volumes and a PS signing key."""

from __future__ import annotations

import datetime as dt
import hashlib
import os
import shutil
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from hfl_lab._x509 import common_name, self_signed
from hfl_lab.tee import AttestationPolicy, measure_workload
from hfl_lab.vault import ModelVault, ProvenanceEntry, new_passphrase, volume_release_policy
from tests.trust_support import MEASURED

# PBKDF2 at the LUKS minimum keeps each open at milliseconds; the passphrase is random anyway.
FAST_KDF = 1000
SIZE_MB = 12

# The owner's trusted node: the only party besides ps0 that the volume passphrase goes to.
OWNER = measure_workload(role="owner")

needs_cryptsetup = pytest.mark.skipif(
    shutil.which("cryptsetup") is None and not Path("/usr/sbin/cryptsetup").exists(),
    reason="cryptsetup is not installed (apt-get install cryptsetup-bin)",
)


def make_vault(path: Path, passphrase: bytes | None = None, **options: object) -> ModelVault:
    return ModelVault.create(
        path,
        passphrase or new_passphrase(),
        SIZE_MB,
        path_kind="userspace",
        kdf_iterations=FAST_KDF,
        **options,  # type: ignore[arg-type]
    )


def ps_identity(name: str = "ps0") -> tuple[ec.EllipticCurvePrivateKey, bytes]:
    """A P-384 key and a self-signed certificate PEM standing in for the PS's attested key."""
    key = ec.generate_private_key(ec.SECP384R1())
    cert = self_signed(key, common_name(name), valid_since=dt.timedelta(0),
                       algorithm=hashes.SHA384())
    return key, cert.public_bytes(serialization.Encoding.PEM)


def entry(key: ec.EllipticCurvePrivateKey, pem: bytes, loss: float) -> ProvenanceEntry:
    return ProvenanceEntry(
        signer=key,
        signer_pem=pem,
        ps_evidence_digest=hashlib.sha384(b"ps0 quote").hexdigest(),
        worker_evidence_digests={
            "worker0": hashlib.sha384(b"w0 quote").hexdigest(),
            "worker1": hashlib.sha384(b"w1 quote").hexdigest(),
        },
        metrics={"loss": loss},
    )


def weights(step: int, size: int = 300_000) -> bytes:
    """Distinct pseudo-random 'serialized weights' per step (random bytes do not compress)."""
    return os.urandom(size - 8) + step.to_bytes(8, "little")


def release_policy() -> AttestationPolicy:
    """The volume key's release policy: ps0 and the owner, simulated TDs allowed."""
    return volume_release_policy(
        MEASURED["ps0"], OWNER, base=AttestationPolicy.from_dict({"allow_simulated": True})
    )
