"""Notebook 02: the lab's trust service in a (simulated) TD, its verified attestation, the policy,
and the LUKS model volume whose key only the trust service releases.

The service is the real one (:mod:`hfl_lab.trust.service` over gRPC/TLS with its RA-TLS
certificate); here it runs in the notebook's process so that notebooks 02 and 06 can talk to it
directly. Verdict tables come from :mod:`hfl_lab.attestation`, so the CLI and the lab agree.
"""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc

from hfl_lab._exceptions import AttestationError
from hfl_lab._resources import ClosingContext
from hfl_lab.attestation import render_verdict, verify_endpoint
from hfl_lab.config import LabConfig
from hfl_lab.events import LabEvent
from hfl_lab.lab.notebook import Table, TableReport
from hfl_lab.ratls.certificate import RaTlsIdentity
from hfl_lab.tee.policy import AttestationPolicy
from hfl_lab.tee.providers.simulated import SimulatedTdProvider
from hfl_lab.tee.sim.measure import TdMeasurements, measure_workload
from hfl_lab.tee.sim.platform import SimulatedPlatform
from hfl_lab.tee.verdict import Verdict
from hfl_lab.trust.broker import DEFAULT_APP_ID
from hfl_lab.trust.client import TrustClient
from hfl_lab.trust.service import TrustService, event_for, serve
from hfl_lab.vault.keyrelease import (
    OWNER_ROLE,
    VOLUME_SECRET_NAME,
    open_vault_for_ps,
    provision_vault,
    volume_release_policy,
)

__all__ = [
    "OWNER_ROLE",
    "LabTrustService",
    "VerdictView",
    "VolumeReport",
    "create_model_volume",
    "lab_roles",
]

TRUST_ROLE = "trust"


def lab_roles(config: LabConfig) -> list[str]:
    """Every TD role of a run: the trust service, ps0 and the workers."""
    return [TRUST_ROLE, "ps0", *(f"worker{i}" for i in range(config.workers))]


class VerdictView:
    """A verdict as the CLI prints it (``hfl-lab attest``), and as an HTML table in a notebook."""

    def __init__(self, verdict: Verdict, title: str = "") -> None:
        self.verdict = verdict
        self.title = title

    def __repr__(self) -> str:
        head = f"{self.title}\n" if self.title else ""
        return head + render_verdict(self.verdict)

    def _repr_html_(self) -> str:
        import html

        head = f"<h4>{html.escape(self.title)}</h4>" if self.title else ""
        return head + self.verdict._repr_html_()


@dataclass
class LabTrustService(ClosingContext):
    """The trust service running in a simulated TD of this process, and what the owner holds."""

    config: LabConfig
    platform: SimulatedPlatform
    measurements: dict[str, TdMeasurements]
    policy: AttestationPolicy
    admin_token: bytes
    address: str
    service: TrustService
    server: grpc.Server
    events: list[LabEvent] = field(default_factory=list)
    listeners: list[Callable[[LabEvent], None]] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def __repr__(self) -> str:  # never show the admin token
        return f"LabTrustService(address={self.address}, roles={sorted(self.policy.roles)})"

    # -- lifecycle -------------------------------------------------------------------------

    @classmethod
    def start(
        cls,
        config: LabConfig,
        *,
        platform: SimulatedPlatform | None = None,
        state_path: Path | None = None,
        owner_key: bytes | None = None,
    ) -> LabTrustService:
        """Measure every role, start the service with its RA-TLS certificate on loopback.

        With ``state_path`` and ``owner_key`` the service seals its policy and secrets there
        (what lets the owner's trusted node retrieve the model after the service stopped).
        """

        platform = platform or SimulatedPlatform.generate()
        run = {"run_dir": str(Path(config.run_dir).resolve()), "workers": config.workers}
        measurements = {
            role: measure_workload(role=role, config=run)
            for role in [*lab_roles(config), OWNER_ROLE]
        }
        policy = lab_policy(measurements, allow_simulated=config.allow_simulated)
        admin = os.urandom(32)
        holder: list[LabTrustService] = []

        def on_event(event: LabEvent) -> None:
            if holder:
                holder[0]._publish(event)

        service = TrustService(
            policy=policy,
            admin_token=admin,
            lab_root_der=platform.root_der,
            on_event=on_event,
            cert_lifetime_s=config.cert_lifetime_s,
            state_path=state_path,
            owner_key=owner_key,
        )
        identity = RaTlsIdentity()
        identity.make_certificate(
            SimulatedTdProvider(platform, measurements[TRUST_ROLE]),
            subject_cn=TRUST_ROLE,
            role=TRUST_ROLE,
        )
        server, port = serve(service, identity.certificate_pem, identity.private_key_pem())
        running = cls(
            config, platform, measurements, policy, admin, f"127.0.0.1:{port}", service, server
        )
        holder.append(running)
        return running

    def stop(self) -> None:
        self.server.stop(0)

    close = stop

    # -- events ----------------------------------------------------------------------------

    def _publish(self, event: LabEvent) -> None:
        with self._lock:
            self.events.append(event)
            listeners = list(self.listeners)
        for listener in listeners:
            listener(event)

    def subscribe(self, listener: Callable[[LabEvent], None]) -> None:
        """Call ``listener`` with every later event (attestation verdicts, audit decisions)."""
        with self._lock:
            self.listeners.append(listener)

    def publish(self, event: LabEvent) -> None:
        """Add an event of the lab itself (e.g. a client-side verdict) to this run's stream."""
        self._publish(event)

    # -- participants and the owner ----------------------------------------------------------

    @property
    def lab_root_der(self) -> bytes:
        return self.platform.root_der

    def provider(
        self, role: str, measurements: TdMeasurements | None = None, *, debug: bool = False
    ) -> SimulatedTdProvider:
        """Evidence of a simulated TD running ``role`` (its own measurements unless given)."""
        return SimulatedTdProvider(
            self.platform, measurements or self.measurements[role], debug=debug
        )

    def verify(self) -> Verdict:
        """The trust service's own attestation, checked the way ``hfl-lab attest endpoint`` does."""
        verdict = verify_endpoint(
            self.address,
            self.policy.replace(report_data_binding="key"),
            lab_root=self.lab_root_der,
            role=TRUST_ROLE,
        )
        verdict.verifier = "lab"
        verdict.subject = TRUST_ROLE

        self._publish(event_for(verdict))
        return verdict

    def client(self) -> TrustClient:
        """A client that talks to the service only after its attestation satisfied the policy."""
        return TrustClient.connect(
            self.address, self.policy, lab_root_der=self.lab_root_der, role=TRUST_ROLE
        )

    def install_policy(self) -> Table:
        """Install the lab's policy through the owner-only admin API; the table shows it."""
        with self.client() as client:
            client.install_policy(self.policy, self.admin_token)
        return policy_table(self.policy)

    def volume_release_policy(self) -> AttestationPolicy:
        """Who may receive the volume key: ps0's TD and the owner's trusted node, nobody else."""
        return volume_release_policy(
            self.measurements["ps0"], self.measurements[OWNER_ROLE], base=self.policy
        )

    def release_volume_key(self, role: str = "ps0") -> bytes:
        """Attested key release to ``role``'s simulated TD; ``PolicyViolation`` if refused."""
        with self.client() as client:
            return client.release_secret(
                DEFAULT_APP_ID, VOLUME_SECRET_NAME, role, self.provider(role)
            )


def lab_policy(
    measurements: dict[str, TdMeasurements], *, allow_simulated: bool
) -> AttestationPolicy:
    """The run's policy: the lab's code (MR_TD) and, per role, its configuration (MR_CONFIG_ID)."""
    image = measurements["ps0"].mr_td.hex()
    roles = {r: {"mr_config_id": m.mr_config_id.hex()} for r, m in measurements.items()}
    return AttestationPolicy.from_dict(
        {
            "mr_td": image,
            "allow_simulated": allow_simulated,
            "report_data_binding": "key+nonce",
            "roles": roles,
        }
    )


def policy_table(policy: AttestationPolicy) -> Table:
    table = Table(("field", "reference value"), title="attestation policy (installed)")
    for name, value in policy.to_dict().items():
        if name == "roles":
            for role, fields in value.items():
                for key, refs in fields.items():
                    table.add(f"roles.{role}.{key}", _short(refs))
        else:
            table.add(name, _short(value))
    return table


def _short(value: Any) -> str:
    if isinstance(value, list):
        return ", ".join(_short(v) for v in value) or "[]"
    text = str(value)
    return text if len(text) <= 40 else f"{text[:20]}…{text[-8:]}"


@dataclass(frozen=True, repr=False)  # shown as its table (TableReport)
class VolumeReport(TableReport):
    """The model volume as created: where, how big, which LUKS, and who may get its key."""

    path: Path
    size_mb: int
    volume_uuid: str
    data_path: str
    released_to: str
    opened_with_released_key: bool

    def table(self) -> Table:
        table = Table(("property", "value"), title="LUKS model volume")
        table.add("file", self.path)
        table.add("size", f"{self.size_mb} MB")
        table.add("volume UUID", self.volume_uuid)
        table.add("data path", self.data_path)
        table.add("key released to", self.released_to)
        table.add("opened with the released key", self.opened_with_released_key)
        return table

    def to_dict(self) -> dict[str, Any]:
        return {
            "path": str(self.path),
            "size_mb": self.size_mb,
            "volume_uuid": self.volume_uuid,
            "data_path": self.data_path,
            "released_to": self.released_to,
            "opened_with_released_key": self.opened_with_released_key,
        }


def create_model_volume(trust: LabTrustService, folder: str | Path | None = None) -> VolumeReport:
    """Provision the LUKS volume (its passphrase goes to the key broker only), then open it as
    ps0 does: with the key the trust service releases to ps0's attested TD.
    """
    where = Path(folder) if folder is not None else Path(trust.config.run_dir) / "trust"
    where.mkdir(parents=True, exist_ok=True)
    path = where / "model.luks"
    if path.exists():
        path.unlink()  # a re-run starts afresh: the old passphrase died with the old service
    size = trust.config.vault_size_mb
    with trust.client() as client:
        info = provision_vault(
            client, trust.admin_token, path, size_mb=size,
            release_policy=trust.volume_release_policy(),
            kdf_iterations=trust.config.vault_kdf_iterations,
        )
        with open_vault_for_ps(client, "ps0", trust.provider("ps0"), path) as vault:
            opened = vault.volume_uuid == info.uuid
    report = VolumeReport(
        path, size, info.uuid, info.data_path_kind,
        f"ps0 and the owner (attested), as {DEFAULT_APP_ID}/{VOLUME_SECRET_NAME}", opened,
    )
    (where / "volume.json").write_text(json.dumps(report.to_dict(), indent=2) + "\n")
    if not opened:
        raise AttestationError(
            "the key the trust service released does not open the volume.",
            check="volume",
            fix="re-run notebook 02 from the top (the volume and the registered key disagree).",
        )
    return report
