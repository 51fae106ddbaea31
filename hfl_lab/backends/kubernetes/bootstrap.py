"""The pods' bootstrap: Kubernetes Secrets made in memory, read from a tmpfs Secret volume.

A local participant gets its bootstrap (the simulated platform's keys; for the trust service
also the owner's admin credential) as one JSON line on stdin. A pod has no launcher on stdin, so
the backend creates, through the API and from memory only (never a local file, never the run
folder, never a log line), one Secret per kind of participant:

- ``hfl-bootstrap-trust``: the admin credential, plus the platform's keys under runc;
- ``hfl-bootstrap-td`` (runc only): the platform's keys, for ps0 and the workers. Real TDs
  (kata overlays) need none, and those overlays mount no such volume.

Each is mounted as a Secret volume (tmpfs in the pod: the kubelet never writes it to the node's
disk) at /etc/hfl-lab/bootstrap/bootstrap.json, and ``$HFL_LAB_BOOTSTRAP_FILE`` points the
participant at it (``trainer.participant.read_bootstrap``). The Secrets are immutable, and
teardown deletes them with the run.

Trade-off, said plainly: a Secret is stored by the API server in etcd (in plain text unless the
cluster enables encryption at rest), is readable by whoever may ``get secrets`` in the namespace,
and under runc the node sees the volume too. That is acceptable for the simulated platform's keys,
which are lab-local and never secure anyway. For the admin credential on a real TDX cluster it
means the cluster's administrators are trusted with it; the stronger path is a sealed secret
that the TD's confidential data hub fetches from the KBS after attestation (see k8s/README.md).
"""

from __future__ import annotations

import base64
import json
from typing import Any

from hfl_lab.tee.sim.platform import SimulatedPlatform

TRUST_SECRET = "hfl-bootstrap-trust"  # noqa: S105 - a Secret's name
TD_SECRET = "hfl-bootstrap-td"  # noqa: S105 - a Secret's name
KEY = "bootstrap.json"
LABELS = {"app.kubernetes.io/part-of": "hfl-lab", "app.kubernetes.io/component": "bootstrap"}


def _secret(name: str, namespace: str, payload: dict[str, str]) -> dict[str, Any]:
    data = base64.b64encode(json.dumps(payload).encode()).decode()
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {"name": name, "namespace": namespace, "labels": dict(LABELS)},
        "type": "Opaque",
        "immutable": True,
        "data": {KEY: data},
    }


def bootstrap_secrets(
    namespace: str, admin_token: bytes, platform: SimulatedPlatform | None
) -> list[dict[str, Any]]:
    """The run's bootstrap Secrets (in memory; apply them, never write them anywhere)."""
    trust = {"admin_token": admin_token.hex()}
    if platform is None:
        return [_secret(TRUST_SECRET, namespace, trust)]
    secret = platform.export_secret().hex()
    trust["platform"] = secret
    return [
        _secret(TRUST_SECRET, namespace, trust),
        _secret(TD_SECRET, namespace, {"platform": secret}),
    ]


def reference(secret: dict[str, Any]) -> dict[str, Any]:
    """A Secret without its data: what the backend keeps to delete it later."""
    return {k: v for k, v in secret.items() if k in ("apiVersion", "kind", "metadata")}


def secret_references(namespace: str, simulated: bool) -> list[dict[str, Any]]:
    """The run's Secrets by name only (teardown of a run this process did not start)."""
    names = [TRUST_SECRET, TD_SECRET] if simulated else [TRUST_SECRET]
    return [
        {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": n, "namespace": namespace}}
        for n in names
    ]
