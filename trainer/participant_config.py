"""The participant configuration document (/etc/hfl-lab/config.yaml): where things are + the lab.

One YAML document, written by the backend (``hfl_lab.backends.local`` or the Kubernetes
renderer) and read by every participant, with two sections:

- ``deployment``: addresses, evidence source, vault location, data folder: how this run is wired;
- ``lab``: the run's :class:`hfl_lab.config.LabConfig` (model, aggregation, steps, ...).

The whole document is what a participant's MR_CONFIG_ID measures (see
``hfl_lab.tee.sim.measure``), so every participant of a run must read the same file. It holds
no secret: private keys, the volume passphrase and the admin credential never appear here.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from hfl_lab._exceptions import ConfigError
from hfl_lab.config import LabConfig

__all__ = ["EVIDENCE_SOURCES", "Deployment", "ParticipantConfig"]

EVIDENCE_SOURCES = ("simulated", "configfs-tsm", "coco-agent", "auto")


@dataclass(frozen=True)
class Deployment:
    """How one run is wired: addresses, evidence source, vault and data locations."""

    trust_address: str
    ps_address: str
    workers: int
    evidence: str = "simulated"
    namespace: str = "hfl-lab"
    overlay: str = "local"
    vault_path: str = ""
    vault_data_path: str = "auto"
    #: 0: the owner provisioned the volume (local); N: ps0 creates an N MB volume at
    #: ``vault_path`` when there is none, with the passphrase the trust service generated in its
    #: TD and released to ps0 (a cluster, where the owner cannot reach the trust service)
    vault_size_mb: int = 0
    checkpoint_dir: str = ""
    policy_path: str = ""
    #: the owner's policy-signing public key (Ed25519, hex): measured with this document, so a
    #: TD only takes a policy the owner signed (``policy_path`` + ``.sig``); required with
    #: hardware evidence
    policy_key: str = ""
    data_dir: str = ""
    data_source: str = ""
    ready_file: str = ""
    connect_timeout_s: float = 120.0
    #: the workload image ps0 and the workers pull before they run (local backend, issue 19):
    #: its reference pinned by digest, the signature policy and its SHA-256 (the file is the
    #: host's; this document is measured), the lookaside config, the registry's CA folder, and
    #: where each participant unpacks it (``<image_dir>/<role>``); empty: no pull
    image_reference: str = ""
    image_policy: str = ""
    image_policy_sha256: str = ""
    image_registries_d: str = ""
    image_cert_dir: str = ""
    image_dir: str = ""

    def __post_init__(self) -> None:
        for name in ("trust_address", "ps_address"):
            value = getattr(self, name)
            host, sep, port = str(value).rpartition(":")
            if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
                raise ConfigError(
                    f"deployment.{name} must be host:port, got {value!r}.",
                    fix=f"write e.g. {name}: 127.0.0.1:50051 in the config file.",
                )
        if self.evidence not in EVIDENCE_SOURCES:
            raise ConfigError(
                f"deployment.evidence must be one of {', '.join(EVIDENCE_SOURCES)}, "
                f"got {self.evidence!r}.",
                fix="use 'simulated' without TDX hardware, 'configfs-tsm' inside a TD.",
            )
        if not isinstance(self.workers, int) or self.workers < 1:
            raise ConfigError(
                f"deployment.workers must be a positive integer, got {self.workers!r}.",
                fix="set it to the number of worker participants.",
            )
        if self.connect_timeout_s <= 0:
            raise ConfigError(
                "deployment.connect_timeout_s must be positive.", fix="use e.g. 120."
            )

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any]) -> Deployment:
        known = {f.name for f in dataclasses.fields(cls)}
        # Kubernetes renders a few more keys (e.g. data_source); unknown ones are kept out.
        values = {k: v for k, v in raw.items() if k in known}
        missing = [n for n in ("trust_address", "ps_address", "workers") if n not in values]
        if missing:
            raise ConfigError(
                f"the config file's deployment section lacks {', '.join(missing)}.",
                fix="let the backend write the config file (LocalBackend or the k8s renderer).",
            )
        return cls(**values)


@dataclass(frozen=True)
class ParticipantConfig:
    """The parsed configuration document, and the raw mapping its measurement covers."""

    deployment: Deployment
    lab: LabConfig
    document: Mapping[str, Any]
    path: Path | None = None

    @classmethod
    def from_document(
        cls, document: Mapping[str, Any], path: Path | None = None
    ) -> ParticipantConfig:
        where = f" in {path}" if path else ""
        if not isinstance(document, Mapping):
            raise ConfigError(
                f"the participant config{where} is not a mapping.",
                fix="it needs a 'deployment' and a 'lab' section.",
            )
        deployment = document.get("deployment")
        if not isinstance(deployment, Mapping):
            raise ConfigError(
                f"the participant config{where} has no 'deployment' section.",
                fix="let the backend write the config file (LocalBackend or the k8s renderer).",
            )
        lab = document.get("lab") or {}
        if not isinstance(lab, Mapping):
            raise ConfigError(f"the 'lab' section{where} is not a mapping.")
        parsed = Deployment.from_dict(deployment)
        config = LabConfig.from_dict(lab)
        if config.workers != parsed.workers:
            raise ConfigError(
                f"lab.workers ({config.workers}) and deployment.workers ({parsed.workers}) "
                f"disagree{where}.",
                fix="regenerate the config file from one LabConfig.",
            )
        return cls(parsed, config, document, path)

    @classmethod
    def load(cls, path: str | Path) -> ParticipantConfig:
        file = Path(path)
        try:
            text = file.read_text(encoding="utf-8")
        except OSError as e:
            raise ConfigError(
                f"cannot read the participant config {file}: {e.strerror or e}.",
                fix="pass --config with the file the backend wrote "
                "(/etc/hfl-lab/config.yaml in a pod, <run_dir>/config.yaml locally).",
            ) from None
        try:
            document = yaml.safe_load(text)
        except yaml.YAMLError as e:
            raise ConfigError(
                f"{file} is not valid YAML: {e}.", fix="regenerate it with the backend."
            ) from None
        return cls.from_document(document, file)

    def measured(self) -> dict[str, Any]:
        """What a participant's MR_CONFIG_ID measures (with its role): the whole document."""
        return dict(self.document)

    @staticmethod
    def write(path: Path, deployment: Deployment, lab: LabConfig) -> dict[str, Any]:
        """Write the document a run's participants read; returns it."""
        document = {"deployment": dataclasses.asdict(deployment), "lab": lab.to_dict()}
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(yaml.safe_dump(document, sort_keys=True), encoding="utf-8")
        return document
