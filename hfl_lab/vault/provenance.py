"""Model provenance: a hash-chained log of checkpoint records, each signed by the PS's attested key.

Every record names its checkpoint's step, metrics and weight hash, and the evidence digests of
the parameter server and of the workers that contributed. ``prev`` chains it to the record before
(the first one to a genesis value bound to the volume UUID), so removing, reordering or editing
a record, or swapping in weights from another run, breaks verification on the trusted node.
"""

from __future__ import annotations

import base64
import hashlib
import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Protocol, runtime_checkable

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from hfl_lab._exceptions import VaultError
from hfl_lab.vault.integrity import canonical_json

RECORD_FORMAT = "hfl-lab-provenance/1"
_GENESIS_DOMAIN = b"hfl-lab/provenance/genesis/v1\0"

TrustedKey = ec.EllipticCurvePublicKey | x509.Certificate | bytes | str


@runtime_checkable
class SignerResolver(Protocol):
    """Decides which signers of a chain to trust from the records themselves (e.g. by verifying
    the attestation evidence in each signer's certificate, see ``AttestedSigners``)."""

    def resolve(
        self, records: Sequence[tuple[str, bytes]]
    ) -> tuple[dict[str, ec.EllipticCurvePublicKey], dict[str, str]]:
        """(trusted keys by fingerprint, why each refused fingerprint was refused)"""
        ...

    def summaries(self) -> list[dict[str, Any]]:
        """One line of evidence per trusted signer, for the report."""
        ...


#: what the trusted node trusts: a list of PS keys/certificates, or a resolver
Signers = Iterable[TrustedKey] | SignerResolver


@dataclass(frozen=True)
class ProvenanceEntry:
    """What the parameter server vouches for with a checkpoint; it signs with ``signer``."""

    signer: ec.EllipticCurvePrivateKey
    signer_pem: bytes  # the attested certificate (or public key) PEM of ``signer``
    ps_evidence_digest: str
    worker_evidence_digests: Mapping[str, str] = field(default_factory=dict)
    metrics: Mapping[str, float] | None = None  # default: metadata["metrics"]
    ps_id: str = "ps0"


@dataclass(frozen=True)
class CheckpointClaim:
    """A checkpoint found in the volume, with the hash of the weights actually stored."""

    step: int
    name: str
    weights_sha256: str
    record_index: int | None
    record_sha256: str | None


@dataclass
class ProvenanceReport:
    """Outcome of verifying the provenance log offline; ``ok`` only when nothing is wrong."""

    records: int = 0
    problems: list[str] = field(default_factory=list)
    verified_steps: list[int] = field(default_factory=list)
    unsigned_steps: list[int] = field(default_factory=list)
    #: unsigned checkpoints newer than every signed one: never the model, each one a problem
    unsigned_newer_steps: list[int] = field(default_factory=list)
    signers: list[str] = field(default_factory=list)
    head_step: int | None = None
    #: the attestation of each trusted signer (role, simulated, measurements), when a
    #: ``SignerResolver`` decided which signers to trust
    signer_evidence: list[dict[str, Any]] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems and self.records > 0

    @property
    def newest_signed_step(self) -> int | None:
        """The newest checkpoint a verified, signed record covers: the model to hand out."""
        return max(self.verified_steps, default=None)

    @property
    def chain_problems(self) -> list[str]:
        """The problems other than unsigned newer checkpoints: the chain or a signed
        checkpoint is broken, so nothing in the volume can be trusted."""
        unsigned = {unsigned_problem(step) for step in self.unsigned_newer_steps}
        return [problem for problem in self.problems if problem not in unsigned]

    def summary(self) -> str:
        if self.ok:
            return (
                f"provenance intact: {self.records} signed records, head at step "
                f"{self.head_step}, signed by {', '.join(self.signers)}."
            )
        broken = self.chain_problems
        if broken:
            return f"provenance broken: {broken[0]}" + (
                f" (and {len(broken) - 1} more problems)" if len(broken) > 1 else ""
            )
        newest = self.newest_signed_step
        if self.unsigned_newer_steps and newest is not None:
            return (
                f"provenance intact up to step {newest} ({self.records} signed records, signed "
                f"by {', '.join(self.signers)}), but {_unsigned_text(self.unsigned_newer_steps)}"
                f": it is not the model, step {newest} is."
            )
        if self.unsigned_newer_steps:
            return f"no signed checkpoint: {_unsigned_text(self.unsigned_newer_steps)}."
        return "no provenance records: nothing vouches for these checkpoints."

    def raise_if_broken(self) -> None:
        if not self.ok:
            raise VaultError(
                self.summary(),
                fix="do not trust this model; fetch the volume again from the PS's storage.",
            )

    def raise_unless_signed_model(self) -> None:
        """Raise unless the chain verifies and a signed checkpoint exists; unsigned checkpoints
        newer than it are allowed (they are named, and never handed out)."""
        if self.chain_problems or self.newest_signed_step is None:
            raise VaultError(
                self.summary(),
                fix="do not trust this model; fetch the volume again from the PS's storage "
                "(the copy the parameter server wrote, with its signed provenance records).",
            )


def unsigned_problem(step: int) -> str:
    """The problem an unsigned checkpoint newer than every signed one is reported as."""
    return f"checkpoint step {step} is newer than every signed one, but {_UNSIGNED_WHY}"


_UNSIGNED_WHY = (
    "has no provenance record: only the volume-key MAC vouches for it, so it was written by a "
    "holder of the volume key (a storage admin who obtained it) or by a PS code path that "
    "skipped signing"
)


def _unsigned_text(steps: Sequence[int]) -> str:
    if len(steps) == 1:
        return f"checkpoint step {steps[0]} {_UNSIGNED_WHY}"
    listed = ", ".join(f"step {step}" for step in steps)
    return (f"checkpoints {listed} have no provenance record: only the volume-key MAC vouches "
            "for them")


def genesis_hash(volume_uuid: str) -> str:
    """The ``prev`` of the first record: binds the chain to one volume."""
    return hashlib.sha256(_GENESIS_DOMAIN + volume_uuid.encode()).hexdigest()


def record_hash(record: Mapping[str, Any]) -> str:
    return hashlib.sha256(canonical_json(record)).hexdigest()


def public_key_of(key: TrustedKey) -> ec.EllipticCurvePublicKey:
    """The EC public key in a key object, certificate, or PEM of either."""
    if isinstance(key, ec.EllipticCurvePublicKey):
        return key
    found: object
    if isinstance(key, x509.Certificate):
        found = key.public_key()
    else:
        pem = key.encode() if isinstance(key, str) else key
        try:
            found = (
                x509.load_pem_x509_certificate(pem).public_key()
                if b"CERTIFICATE" in pem
                else serialization.load_pem_public_key(pem)
            )
        except ValueError as error:
            raise VaultError(
                f"cannot read the PS key or certificate PEM ({error}).",
                fix="pass the PS's attested certificate or public key as PEM.",
            ) from error
    if not isinstance(found, ec.EllipticCurvePublicKey):
        raise VaultError(
            "the PS key is not an elliptic-curve key.", fix="use the PS's attested EC key."
        )
    return found


def fingerprint(key: ec.EllipticCurvePublicKey) -> str:
    """SHA-256 of the SubjectPublicKeyInfo, hex."""
    der = key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return hashlib.sha256(der).hexdigest()


def _hash_for(key: ec.EllipticCurvePublicKey | ec.EllipticCurvePrivateKey) -> hashes.HashAlgorithm:
    return hashes.SHA384() if key.curve.key_size >= 384 else hashes.SHA256()


def sign_record(
    entry: ProvenanceEntry,
    *,
    index: int,
    prev: str,
    step: int,
    checkpoint: str,
    weights_sha256: str,
    weights_size: int,
    metrics: Mapping[str, Any],
) -> dict[str, Any]:
    """Build and sign the record for one checkpoint."""
    signer_public = public_key_of(entry.signer_pem)
    if fingerprint(signer_public) != fingerprint(entry.signer.public_key()):
        raise VaultError(
            "the provenance signer key does not match the given certificate/key PEM.",
            fix="pass the PEM of the same attested key that signs.",
        )
    record: dict[str, Any] = {
        "format": RECORD_FORMAT,
        "index": index,
        "prev": prev,
        "step": step,
        "checkpoint": checkpoint,
        "weights_sha256": weights_sha256,
        "weights_size": weights_size,
        "metrics": dict(metrics),
        "ps": {
            "id": entry.ps_id,
            "evidence_digest": entry.ps_evidence_digest,
            "signer_pem": entry.signer_pem.decode(),
            "signer_sha256": fingerprint(signer_public),
        },
        "workers": [
            {"id": worker, "evidence_digest": digest}
            for worker, digest in sorted(entry.worker_evidence_digests.items())
        ],
        "time": datetime.now(UTC).isoformat(timespec="seconds"),
    }
    signature = entry.signer.sign(canonical_json(record), ec.ECDSA(_hash_for(entry.signer)))
    record["signature"] = base64.b64encode(signature).decode()
    return record


def verify_chain(
    records: Sequence[tuple[str, bytes]],
    trusted_keys: Signers,
    genesis: str,
    checkpoints: Sequence[CheckpointClaim],
) -> ProvenanceReport:
    """Check signatures, links and weight hashes; every break becomes one readable problem."""
    refused: dict[str, str] = {}
    if isinstance(trusted_keys, SignerResolver):
        trusted, refused = trusted_keys.resolve(records)
    else:
        trusted = {fingerprint(public_key_of(key)): public_key_of(key) for key in trusted_keys}
    report = ProvenanceReport(records=len(records))
    hashes_by_index: dict[int, str] = {}
    prev, signers = genesis, set()
    for position, (name, raw) in enumerate(records):
        label = f"record {position} ({name})"
        try:
            record = json.loads(raw)
            problem = _check_record(record, position, prev, trusted, refused)
        except (ValueError, KeyError, TypeError) as error:
            problem = f"{label} is not a valid provenance record ({error})"
            record = {}
        if problem is None and name != f"{position:012d}.json":
            problem = f"{label} is stored under the wrong name (expected {position:012d}.json)"
        if problem:
            report.problems.append(
                problem if problem.startswith("record") else f"{label}: {problem}"
            )
            prev = record_hash(record) if record else prev
            continue
        prev = hashes_by_index[position] = record_hash(record)
        signers.add(f"{record['ps']['id']} (key {record['ps']['signer_sha256'][:16]})")
        report.head_step = int(record["step"])
    report.signers = sorted(signers)
    if isinstance(trusted_keys, SignerResolver):
        report.signer_evidence = trusted_keys.summaries()
    _check_checkpoints(records, hashes_by_index, checkpoints, report)
    return report


def _check_record(
    record: dict[str, Any],
    position: int,
    prev: str,
    trusted: dict[str, ec.EllipticCurvePublicKey],
    refused: Mapping[str, str],
) -> str | None:
    if record.get("format") != RECORD_FORMAT:
        return f"unknown format {record.get('format')!r}"
    if record["index"] != position:
        return (
            f"has index {record['index']} at position {position}: records were removed or reordered"
        )
    if record["prev"] != prev:
        return (
            "does not chain to the record before it (prev hash differs): "
            "a record was removed, reordered or edited"
        )
    key = public_key_of(record["ps"]["signer_pem"])
    key_id = fingerprint(key)
    if key_id not in trusted:
        if key_id in refused:
            return (
                f"is signed by key {key_id[:16]}…, whose certificate's attestation was refused: "
                f"{refused[key_id]}"
            )
        return f"is signed by key {key_id[:16]}…, which is not a trusted PS key"
    body = {name: value for name, value in record.items() if name != "signature"}
    try:
        key.verify(
            base64.b64decode(record["signature"]), canonical_json(body), ec.ECDSA(_hash_for(key))
        )
    except InvalidSignature:
        return f"has a signature that does not verify with PS key {key_id[:16]}…: it was edited"
    return None


def _check_checkpoints(
    records: Sequence[tuple[str, bytes]],
    hashes_by_index: dict[int, str],
    checkpoints: Sequence[CheckpointClaim],
    report: ProvenanceReport,
) -> None:
    covered: set[int] = set()
    for claim in sorted(checkpoints, key=lambda c: c.step):
        if claim.record_index is None:
            report.unsigned_steps.append(claim.step)
            continue
        index = claim.record_index
        if index not in hashes_by_index:
            report.problems.append(
                f"checkpoint step {claim.step} refers to provenance record "
                f"{index}, which is missing or invalid"
            )
            continue
        record = json.loads(records[index][1])
        if claim.record_sha256 != hashes_by_index[index]:
            report.problems.append(
                f"checkpoint step {claim.step} refers to a different version "
                f"of provenance record {index}"
            )
        elif record["weights_sha256"] != claim.weights_sha256:
            report.problems.append(
                f"checkpoint step {claim.step} holds weights whose hash differs "
                f"from the signed record {index}: the weights were swapped"
            )
        elif record["step"] != claim.step or record["checkpoint"] != claim.name:
            report.problems.append(
                f"checkpoint step {claim.step} does not match the step/name "
                f"in signed record {index}"
            )
        else:
            covered.add(index)
            report.verified_steps.append(claim.step)
    newest = max(report.verified_steps, default=None)
    report.unsigned_newer_steps = [
        step for step in report.unsigned_steps if newest is None or step > newest
    ]
    report.problems.extend(unsigned_problem(step) for step in report.unsigned_newer_steps)
    head = len(records) - 1
    if records and head in hashes_by_index and head not in covered:
        report.problems.append(
            f"the newest provenance record {head} (step {report.head_step}) has no matching "
            "checkpoint in the volume: the newest checkpoint was removed or replaced"
        )
