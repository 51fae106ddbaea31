"""Checkpoints and their provenance log laid out in a volume's file system, with MACs.

Layout (the same on every data path)::

    checkpoints/step-<step>.bin    the payload, opaque bytes (serialized weights)
    checkpoints/step-<step>.json   step, metadata, payload hash, provenance link, MAC; written
                                   last, so it is what makes a checkpoint exist
    provenance/<index>.json        signed, hash-chained records
    files/<name>                   small files (configuration, evaluation results)
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from typing import Any

from hfl_lab._exceptions import VaultError
from hfl_lab.vault.checkpoints import Checkpoint, CheckpointInfo
from hfl_lab.vault.files import VolumeFiles, Write, read_hashed
from hfl_lab.vault.integrity import canonical_json, mac, mac_matches
from hfl_lab.vault.provenance import (
    CheckpointClaim,
    ProvenanceEntry,
    ProvenanceReport,
    Signers,
    record_hash,
    sign_record,
    verify_chain,
)

log = logging.getLogger(__name__)

CHECKPOINTS = "checkpoints"
PROVENANCE = "provenance"
FILES = "files"
META_FORMAT = "hfl-lab-checkpoint/1"
_META_NAME = re.compile(r"^step-(\d{12})\.json$")
_FILE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+-]{0,127}$")


def checkpoint_name(step: int) -> str:
    return f"step-{step:012d}"


def file_path(name: str) -> str:
    if not _FILE_NAME.match(name):
        raise VaultError(
            f"invalid file name {name!r} for the vault.",
            fix="use letters, digits, '.', '_', '+' and '-' (at most 128).",
        )
    return f"{FILES}/{name}"


class CheckpointArchive:
    """Writes, lists, loads and verifies checkpoints through a ``VolumeFiles``."""

    def __init__(
        self,
        files: VolumeFiles,
        *,
        mac_key: bytes | None,
        genesis: str,
        data_path: str,
        keep_last: int | None = None,
    ) -> None:
        if keep_last is not None and keep_last < 1:
            raise VaultError("keep_last must be at least 1.", fix="pass keep_last=None or ≥ 1.")
        self.files = files
        self._mac_key = mac_key
        self._genesis = genesis
        self.data_path = data_path
        self.keep_last = keep_last

    # -- writing -------------------------------------------------------------------------------

    def write(
        self,
        step: int,
        payload: bytes | bytearray | memoryview,
        metadata: Mapping[str, Any] | None = None,
        provenance: ProvenanceEntry | None = None,
    ) -> CheckpointInfo:
        if not isinstance(step, int) or isinstance(step, bool) or step < 0:
            raise VaultError(
                f"checkpoint step must be a non-negative int, got {step!r}.",
                fix="pass the training step as an int.",
            )
        metadata = dict(metadata or {})
        canonical_json(metadata)  # fail early on metadata that is not plain JSON
        name = checkpoint_name(step)
        existing = self.files.list_dir(CHECKPOINTS)
        if f"{name}.json" in existing:
            raise VaultError(
                f"the vault already holds a checkpoint for step {step}.",
                fix="write each step once; use a higher step number.",
            )
        chain = self._chain_head() if provenance is not None else None
        made: dict[str, Any] = {}
        with ThreadPoolExecutor(1, thread_name_prefix="hfl-checkpoint-hash") as pool:
            # The payload is hashed while the volume stores it (hashlib releases the GIL); the
            # provenance record and the metadata, which name the hash, are made afterwards.
            hashing = pool.submit(lambda: hashlib.sha256(payload).hexdigest())

            def record() -> bytes:
                assert provenance is not None and chain is not None
                made["record"] = sign_record(
                    provenance,
                    index=chain[0],
                    prev=chain[1],
                    step=step,
                    checkpoint=name,
                    weights_sha256=hashing.result(),
                    weights_size=len(payload),
                    metrics=provenance.metrics
                    if provenance.metrics is not None
                    else metadata.get("metrics", {}),
                )
                return canonical_json(made["record"])

            def meta() -> bytes:
                link = None
                if chain is not None:
                    if "record" not in made:
                        record()
                    link = {"index": chain[0], "record_sha256": record_hash(made["record"])}
                made["meta"] = {
                    "format": META_FORMAT,
                    "step": step,
                    "name": name,
                    "metadata": metadata,
                    "payload_size": len(payload),
                    "payload_sha256": hashing.result(),
                    "provenance": link,
                    "written_by": provenance.ps_id if provenance is not None else None,
                    "written_at": datetime.now(UTC).isoformat(timespec="milliseconds"),
                    "data_path": self.data_path,
                }
                made["meta"]["mac"] = (
                    mac(self._mac_key, made["meta"]) if self._mac_key is not None else None
                )
                return canonical_json(made["meta"])

            writes: list[Write] = [(f"{CHECKPOINTS}/{name}.bin", payload)]
            if chain is not None:
                writes.append((f"{PROVENANCE}/{chain[0]:012d}.json", record))
            writes.append((f"{CHECKPOINTS}/{name}.json", meta))  # last: it makes the checkpoint
            self.files.commit(writes, self._expired(existing, step))
        log.info(
            "checkpoint step %d written (%d bytes, %s data path)",
            step,
            len(payload),
            self.data_path,
        )
        return self._info(made["meta"], None)

    def _chain_head(self) -> tuple[int, str]:
        """Index and ``prev`` hash of the next provenance record."""
        records = sorted(self.files.list_dir(PROVENANCE))
        if not records:
            return 0, self._genesis
        last = json.loads(self.files.read(f"{PROVENANCE}/{records[-1]}"))
        return len(records), record_hash(last)

    def _expired(self, existing: Mapping[str, int], new_step: int) -> list[str]:
        if self.keep_last is None:
            return []
        steps = sorted(
            [int(m.group(1)) for n in existing if (m := _META_NAME.match(n))] + [new_step]
        )
        old = steps[: max(0, len(steps) - self.keep_last)]
        return [
            f"{CHECKPOINTS}/{checkpoint_name(s)}{ext}" for s in old for ext in (".json", ".bin")
        ]

    def write_file(self, name: str, data: bytes) -> None:
        self.files.commit([(file_path(name), data)])

    def read_file(self, name: str) -> bytes:
        return self.files.read(file_path(name))

    # -- reading -------------------------------------------------------------------------------

    def infos(self) -> list[CheckpointInfo]:
        """Every checkpoint whose metadata file exists, oldest first, MAC checked."""
        found = []
        for entry in sorted(self.files.list_dir(CHECKPOINTS)):
            match = _META_NAME.match(entry)
            if not match:
                continue
            step = int(match.group(1))
            try:
                meta = json.loads(self.files.read(f"{CHECKPOINTS}/{entry}"))
                problem = self._meta_problem(meta, step)
            except (ValueError, UnicodeDecodeError):
                meta, problem = {"step": step}, "its metadata file is not valid JSON"
            found.append(self._info(meta, problem))
        return found

    def _meta_problem(self, meta: dict[str, Any], step: int) -> str | None:
        if meta.get("format") != META_FORMAT:
            return "its metadata file has an unknown format"
        if self._mac_key is not None and not mac_matches(self._mac_key, meta):
            return "its metadata MAC does not verify (the metadata was changed or damaged)"
        if meta.get("step") != step or meta.get("name") != checkpoint_name(step):
            return "its metadata belongs to another step"
        return None

    @staticmethod
    def _info(meta: dict[str, Any], problem: str | None) -> CheckpointInfo:
        link = meta.get("provenance") or {}
        return CheckpointInfo(
            step=int(meta.get("step", -1)),
            name=str(meta.get("name", "")),
            size=int(meta.get("payload_size", 0)),
            payload_sha256=str(meta.get("payload_sha256", "")),
            metadata=meta.get("metadata", {}),
            written_at=str(meta.get("written_at", "")),
            written_by=meta.get("written_by"),
            provenance_index=link.get("index"),
            provenance_sha256=link.get("record_sha256"),
            problem=problem,
        )

    def load(self, info: CheckpointInfo) -> Checkpoint:
        """The checkpoint's payload, verified against its MAC-protected hash."""
        if info.problem:
            raise self._corrupt(info.step, info.problem)
        payload, digest = read_hashed(self.files, f"{CHECKPOINTS}/{info.name}.bin")
        if len(payload) != info.size or digest != info.payload_sha256:
            raise self._corrupt(info.step, "its payload does not match the hash in its metadata")
        return Checkpoint(
            step=info.step,
            payload=payload,
            metadata=info.metadata,
            payload_sha256=info.payload_sha256,
            written_at=info.written_at,
            written_by=info.written_by,
            provenance_index=info.provenance_index,
        )

    @staticmethod
    def _corrupt(step: int, problem: str) -> VaultError:
        return VaultError(
            f"checkpoint step {step} is corrupt or was tampered with: {problem}.",
            fix="load an older checkpoint (latest_checkpoint(skip_corrupt=True)) or restore the "
            "volume from a good copy.",
        )

    def latest(self, *, skip_corrupt: bool = False) -> Checkpoint | None:
        """The newest checkpoint; a corrupt one raises, or is skipped with a warning."""
        for info in reversed(self.infos()):
            try:
                return self.load(info)
            except VaultError as error:
                if not skip_corrupt:
                    raise
                log.warning("skipping checkpoint step %d: %s", info.step, error.message)
        return None

    def verify_provenance(self, trusted_keys: Signers) -> ProvenanceReport:
        """Verify the whole log offline, re-hashing the weights of every checkpoint present."""
        names = sorted(self.files.list_dir(PROVENANCE))
        records = [(name, self.files.read(f"{PROVENANCE}/{name}")) for name in names]
        claims, bad = [], []
        for info in self.infos():
            if info.problem:
                bad.append(f"checkpoint step {info.step}: {info.problem}")
                continue
            _, digest = read_hashed(self.files, f"{CHECKPOINTS}/{info.name}.bin")
            claims.append(
                CheckpointClaim(
                    info.step,
                    info.name,
                    digest,
                    info.provenance_index,
                    info.provenance_sha256,
                )
            )
        report = verify_chain(records, trusted_keys, self._genesis, claims)
        report.problems[:0] = bad
        return report

    def provenance_head(self) -> tuple[int, str, int] | None:
        """(index, hash, step) of the newest provenance record in the volume; None without one.
        Not verified: compare it with a head recorded elsewhere (``hfl_lab.vault.rollback``)."""
        names = sorted(self.files.list_dir(PROVENANCE))
        if not names:
            return None
        index = len(names) - 1
        record = self._record(index)
        if record is None:
            raise VaultError(
                f"the newest provenance record {index} in the volume is unreadable.",
                fix="restore the volume from a good copy.",
            )
        step = record.get("step")
        return index, record_hash(record), step if isinstance(step, int) else -1

    def record_sha256(self, index: int) -> str | None:
        """The hash of provenance record ``index``; None when it is missing or unreadable."""
        record = self._record(index)
        return record_hash(record) if record is not None else None

    def _record(self, index: int) -> dict[str, Any] | None:
        name = f"{index:012d}.json"
        if name not in self.files.list_dir(PROVENANCE):
            return None
        try:
            record = json.loads(self.files.read(f"{PROVENANCE}/{name}"))
        except (ValueError, UnicodeDecodeError):
            return None
        return record if isinstance(record, dict) else None

    def recover(self) -> None:
        """Remove what an interrupted write left on a non-atomic data path: payloads without
        metadata and provenance records past the newest committed checkpoint."""
        existing = self.files.list_dir(CHECKPOINTS)
        orphans = [
            f"{CHECKPOINTS}/{name}"
            for name in existing
            if name.endswith(".bin") and name.removesuffix(".bin") + ".json" not in existing
        ]
        linked = [i.provenance_index for i in self.infos() if i.provenance_index is not None]
        newest = max(linked, default=-1)
        records = sorted(self.files.list_dir(PROVENANCE))
        uncommitted = [f"{PROVENANCE}/{name}" for name in records[newest + 1 :]]
        if orphans or uncommitted:
            log.warning(
                "removing %d leftovers of an interrupted checkpoint write",
                len(orphans) + len(uncommitted),
            )
            self.files.commit([], orphans + uncommitted)
