"""The whole lab against a real cluster (HFL_LAB_KUBECONFIG): preflight, start, ready, train.

Covers what the API double cannot: real server-side apply and schema admission, scheduling
under the chosen overlay (HFL_LAB_K8S_OVERLAY, default runc), the bootstrap Secrets mounted
into real pods, a short training with every participant attested, the sealed model (the
trust service generates the volume's passphrase, ps0 creates the LUKS volume, real exec copies
both out and the owner opens them), and teardown. On kata-qemu-tdx overlays the vault needs a
policy pinning ps0 (HFL_LAB_POLICY, a file); without one the run keeps plain checkpoints.
Image: HFL_LAB_IMAGE (built from this checkout and pushed beforehand, see notebook 03); data:
the PVC ``cifar10`` or HFL_LAB_DATA_SOURCE.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

KUBECONFIG = os.environ.get("HFL_LAB_KUBECONFIG")
if not KUBECONFIG:
    pytest.skip(
        "HFL_LAB_KUBECONFIG is not set: no cluster to run the lab against", allow_module_level=True
    )

from hfl_lab.backends.kubernetes.backend import KubernetesBackend  # noqa: E402
from hfl_lab.backends.kubernetes.settings import DEFAULT_IMAGE, KubernetesSettings  # noqa: E402

pytestmark = [pytest.mark.cluster, pytest.mark.slow]


@pytest.fixture()
def backend(tmp_path):
    overlay = os.environ.get("HFL_LAB_K8S_OVERLAY", "runc")
    policy = os.environ.get("HFL_LAB_POLICY")
    vault = overlay == "runc" or policy is not None
    settings = KubernetesSettings(
        namespace=f"hfl-lab-test-{int(time.time()) % 100000}",
        workers=int(os.environ.get("HFL_LAB_WORKERS", "2")),
        overlay=overlay,
        policy_yaml=Path(policy).read_text() if policy else None,
        image=os.environ.get("HFL_LAB_IMAGE", DEFAULT_IMAGE),
        kubeconfig=KUBECONFIG,
        run_dir=tmp_path / "k8s",
        registry_insecure=os.environ.get("HFL_LAB_REGISTRY_INSECURE") == "1",
        data_source=os.environ.get("HFL_LAB_DATA_SOURCE", "pvc:cifar10"),
        lab_config={"steps": 10, "depth": 8, "batch_size": 16, "eval_every": 0,
                    "checkpoint_every": 5, "vault": vault},
    )
    b = KubernetesBackend(settings)
    yield b
    b.teardown()


def test_whole_lab_on_the_cluster(backend, tmp_path):
    failed = [str(c) for c in backend.preflight() if not c.ok]
    assert not failed, failed
    backend.start()
    backend.wait_ready(timeout_s=float(os.environ.get("HFL_LAB_READY_TIMEOUT", "900")))
    deadline = time.monotonic() + float(os.environ.get("HFL_LAB_TRAIN_TIMEOUT", "3600"))
    metrics = 0
    done = None
    accepted = set()
    for event in backend.events(idle_timeout_s=600):
        metrics += event.kind == "metrics"
        if event.kind == "attestation" and event.data.get("verifier") == "trust":
            assert event.data["accepted"], event.data
            accepted.add(event.data["subject"])
        if event.kind == "lifecycle" and event.source == "ps0" and event.data["state"] == "done":
            done = event
            break
        if time.monotonic() > deadline:
            break
    assert done is not None and metrics > 0
    assert {"ps0", *(f"worker{i}" for i in range(backend.settings.workers))} <= accepted
    if backend.rendered is not None and backend.rendered.volume_policy is not None:
        from hfl_lab.vault import AttestedSigners, retrieve_as_owner

        backend.collect_sealed_model()
        model = retrieve_as_owner(None, backend.owner_credential(), backend.vault_path,
                                  AttestedSigners.from_folder(backend.trust_dir))
        assert model.checkpoint.step == 10 and model.provenance.ok
