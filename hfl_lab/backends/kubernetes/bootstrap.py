"""The pods' bootstrap on runc: Kubernetes Secrets made in memory, read from a tmpfs volume.

A local participant gets its bootstrap (the simulated platform's keys) as one JSON line on stdin.
A pod has no launcher on stdin, so on the runc overlays (simulated TDs) the backend creates,
through the API and from memory only (never a local file, never the run folder, never a log
line), one Secret per kind of participant, both holding only the simulated platform's keys:

- ``hfl-bootstrap-trust`` for the trust service;
- ``hfl-bootstrap-td`` for ps0 and the workers.

Each is mounted as a Secret volume (tmpfs in the pod: the kubelet never writes it to the node's
disk) at /etc/hfl-lab/bootstrap/bootstrap.json, and ``$HFL_LAB_BOOTSTRAP_FILE`` points the
participant at it (``trainer.participant.read_bootstrap``). The Secrets are immutable, and
teardown deletes them with the run.

Real TDs (the kata overlays) get no Secret at all, and those overlays mount none: their evidence
comes from the TDX module, and the owner's admin credential, which no Secret ever carries, reaches
the trust service only over its attested channel after the owner verified it
(:mod:`hfl_lab.backends.kubernetes.provision`). A Secret is readable by whoever may ``get
secrets`` in the namespace and sits in etcd; that is acceptable for the simulated platform's
keys, which are lab-local and never secure anyway, and for nothing else.
"""

from __future__ import annotations

import base64
from typing import Any

from hfl_lab.tee.sim.platform import SimulatedPlatform
from hfl_lab.trust.enrollment import bootstrap_document

TRUST_SECRET = "hfl-bootstrap-trust"  # noqa: S105 - a Secret's name
TD_SECRET = "hfl-bootstrap-td"  # noqa: S105 - a Secret's name
KEY = "bootstrap.json"
LABELS = {"app.kubernetes.io/part-of": "hfl-lab", "app.kubernetes.io/component": "bootstrap"}


def _secret(name: str, namespace: str, document: str) -> dict[str, Any]:
    data = base64.b64encode(document.encode()).decode()
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {"name": name, "namespace": namespace, "labels": dict(LABELS)},
        "type": "Opaque",
        "immutable": True,
        "data": {KEY: data},
    }


def bootstrap_secrets(namespace: str, platform: SimulatedPlatform | None) -> list[dict[str, Any]]:
    """The run's bootstrap Secrets (in memory; apply them, never write them anywhere): the
    simulated platform's keys on runc, nothing on the TDX overlays."""
    if platform is None:
        return []
    document = bootstrap_document(platform)
    return [_secret(TRUST_SECRET, namespace, document), _secret(TD_SECRET, namespace, document)]


def reference(secret: dict[str, Any]) -> dict[str, Any]:
    """A Secret without its data: what the backend keeps to delete it later."""
    return {k: v for k, v in secret.items() if k in ("apiVersion", "kind", "metadata")}


def secret_references(namespace: str) -> list[dict[str, Any]]:
    """The Secrets a run may have made, by name only (teardown of a run this process did not
    start; a name that is not there is skipped). ``hfl-bootstrap-trust`` is also what older
    versions of the lab made on the TDX overlays."""
    return [
        {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": n, "namespace": namespace}}
        for n in (TRUST_SECRET, TD_SECRET)
    ]
