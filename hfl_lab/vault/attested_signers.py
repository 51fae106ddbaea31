"""Which provenance signers to trust: those whose certificate carries evidence the owner accepts.

ps0 signs each provenance record with the key of its current mesh certificate. That certificate
embeds ps0's TD evidence (a TDX quote binding the key), and ps0 renews it with a fresh key every
``reattest_every_s``, so a run's records carry several signer certificates. The owner's trusted
node needs no list of keys: it re-verifies, offline, the evidence inside each signer certificate
against the owner's policy for the PS role (the volume's release policy: ps0's MR_TD and
MR_CONFIG_ID), at the time the record says it was signed. A signer is trusted when that verdict
is accepted and the evidence binds the certificate's key; a record signed by anyone else breaks
the chain with the verdict's reason.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric import ec

from hfl_lab._exceptions import HflLabError, VaultError
from hfl_lab.ratls.certificate import verify_certificate
from hfl_lab.tee.collateral import Collateral
from hfl_lab.tee.policy import AttestationPolicy
from hfl_lab.tee.verdict import Verdict
from hfl_lab.tee.verifier import Verifier
from hfl_lab.vault.provenance import fingerprint, public_key_of

__all__ = ["AttestedSigners"]


class AttestedSigners:
    """A ``SignerResolver``: trust the signers whose certificate's evidence ``verifier`` accepts
    for ``role``."""

    def __init__(self, verifier: Verifier, role: str = "ps0") -> None:
        self.verifier = verifier
        self.role = role
        self.verdicts: dict[str, Verdict] = {}

    def __repr__(self) -> str:
        return f"AttestedSigners(role={self.role!r})"

    @staticmethod
    def write_platform(folder: str | Path, root_der: bytes, collateral_json: str) -> Path:
        """Write ``platform.json`` (the simulated platform's public root and collateral), what
        :meth:`from_folder` reads to verify simulated signers offline."""
        path = Path(folder) / "platform.json"
        path.write_text(json.dumps({"root_der": root_der.hex(),
                                    "collateral_json": collateral_json}) + "\n")
        return path

    @classmethod
    def from_folder(cls, folder: str | Path, role: str = "ps0") -> AttestedSigners:
        """From a run's ``trust/`` folder: ``volume_policy.yaml`` (whom the owner trusts for
        ``role``) and ``platform.json`` (the simulated platform's public root and collateral;
        absent for hardware TDs, whose quotes chain to Intel's root)."""
        folder = Path(folder)
        try:
            policy = AttestationPolicy.load(folder / "volume_policy.yaml")
            platform = folder / "platform.json"
            public = json.loads(platform.read_text()) if platform.exists() else {}
            root = bytes.fromhex(public["root_der"]) if public else None
            collateral = (
                Collateral(public["collateral_json"], "lab platform") if public else None
            )
        except (OSError, ValueError, KeyError, TypeError, HflLabError) as error:
            raise VaultError(
                f"cannot read what verifies the PS's provenance signatures in {folder} "
                f"({type(error).__name__}: {error}).",
                fix="keep the run folder's trust/ directory (volume_policy.yaml, platform.json) "
                "together with the volume.",
            ) from None
        verifier = Verifier(policy, lab_root_der=root, lab_collateral=collateral, name="owner")
        return cls(verifier, role)

    def resolve(
        self, records: Sequence[tuple[str, bytes]]
    ) -> tuple[dict[str, ec.EllipticCurvePublicKey], dict[str, str]]:
        trusted: dict[str, ec.EllipticCurvePublicKey] = {}
        refused: dict[str, str] = {}
        for _, raw in records:
            try:
                record = json.loads(raw)
                pem = record["ps"]["signer_pem"]
                key = public_key_of(pem)
                signed_at = int(datetime.fromisoformat(record["time"]).timestamp())
            except (ValueError, KeyError, TypeError, HflLabError):
                continue  # verify_chain reports the unreadable record itself
            key_id = fingerprint(key)
            if key_id in trusted or key_id in refused:
                continue
            try:
                verdict = verify_certificate(pem, self.verifier, role=self.role, now=signed_at)
            except HflLabError as error:
                refused[key_id] = f"the signer certificate carries no usable evidence ({error})"
                continue
            self.verdicts[key_id] = verdict
            if verdict.accepted:
                trusted[key_id] = key
            else:
                refused[key_id] = verdict.reason
        return trusted, refused

    def summaries(self) -> list[dict[str, Any]]:
        return [
            {
                "signer_sha256": key_id,
                "role": self.role,
                "accepted": verdict.accepted,
                "simulated": verdict.simulated,
                "tcb_status": verdict.tcb_status,
                "mr_td": verdict.measurements.get("mr_td", ""),
                "mr_config_id": verdict.measurements.get("mr_config_id", ""),
                "quote_digest": verdict.quote_digest,
            }
            for key_id, verdict in self.verdicts.items()
            if verdict.accepted
        ]
