"""The notebooks' steps without a kernel: CoCo check, plan and apply; the run summary."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from hfl_lab import BackendError
from hfl_lab._exceptions import ApiError
from hfl_lab.backends.kubernetes.cluster_api import ClusterApi
from hfl_lab.config import LabConfig
from hfl_lab.lab.coco import coco_stack, plan_coco_stack
from hfl_lab.lab.sequence import LabRun, NotebookRun
from hfl_lab.lab.summary import write_summary
from tests.vault_support import FAST_KDF


class FakeCluster(ClusterApi):
    """Answers GETs from a dict of path → object; anything else is a 404."""

    def __init__(self, objects: dict[str, Any]) -> None:  # no API client: only get() is used
        self.objects = objects

    def get(self, path: str, query: Any = None) -> Any:
        if path in self.objects:
            return self.objects[path]
        raise ApiError(404, "Not Found", f"{path} not found")


def k8s_config(tmp_path: Path) -> LabConfig:
    return LabConfig(backend="kubernetes", run_dir=str(tmp_path), image="registry.lab:5000/hfl:1",
                     data_path="/data")


def test_local_backend_shows_the_plan_and_skips_every_step_with_the_reason(tmp_path: Path) -> None:
    plan = coco_stack(LabConfig(run_dir=str(tmp_path)), apply=True)

    assert [s.status for s in plan.steps] == ["skipped"] * 9
    assert all("backend=local" in s.detail and s.commands for s in plan.steps)
    assert (tmp_path / "coco_plan.json").is_file()
    assert "SKIPPED" in repr(plan) and "kata_config.sh" in repr(plan)


def test_kubernetes_steps_are_checked_against_the_cluster(tmp_path: Path) -> None:
    cluster = FakeCluster({
        "/apis/apps/v1/namespaces/kube-flannel/daemonsets/kube-flannel-ds": {},
        "/apis/networking.k8s.io/v1/ingressclasses/nginx": {},
        "/api/v1/namespaces/kube-system/configmaps/coredns": {
            "data": {"Corefile": ".:53 {\n  # hfl-lab hosts begin\n}"}},
    })

    plan = plan_coco_stack(k8s_config(tmp_path), api=cluster)

    status = {s.step.name: s.status for s in plan.steps}
    assert status["CoCo operator"] == "needed"
    assert status["flannel and ingress"] == "done" and status["CoreDNS hosts"] == "done"
    done = [s for s in plan.steps if s.status == "done"]
    assert all(not s.commands for s in done), "nothing is planned for a step that is done"
    operator = next(s for s in plan.steps if s.step.name == "CoCo operator")
    assert operator.commands[0][:3] == ["kubectl", "apply", "-k"]


def test_apply_runs_only_needed_cluster_steps_and_names_a_failing_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PATH", str(tmp_path / "empty-bin"))  # no kubectl here
    cluster = FakeCluster({})

    with pytest.raises(BackendError, match=r"CoCo step 1 \(CoCo operator\) needs kubectl"):
        coco_stack(k8s_config(tmp_path), apply=True, api=cluster)

    assert '"status": "failed"' in (tmp_path / "coco_plan.json").read_text()


def test_summary_of_a_failed_run_names_the_notebook_and_cell(tmp_path: Path) -> None:
    run = LabRun(tmp_path, LabConfig(run_dir=str(tmp_path)))
    run.notebooks = [
        NotebookRun("00_preflight", tmp_path / "notebooks" / "00_preflight.ipynb", "ok", 1.0),
        NotebookRun("01_coco_stack", tmp_path / "notebooks" / "01_coco_stack.ipynb", "failed",
                    2.0, 3, "BackendError: no cluster. Fix: set kubeconfig."),
    ]

    md, page = write_summary(run)

    text = md.read_text()
    assert "notebook 01_coco_stack failed in cell 3: BackendError: no cluster" in text
    assert "[00_preflight](notebooks/00_preflight.ipynb)" in text
    assert "SIMULATED" in text
    assert "<a href='notebooks/01_coco_stack.ipynb'>" in page.read_text()


@pytest.mark.slow
def test_a_sealed_model_is_retrieved_by_the_authorized_owner_and_evaluated(
    tmp_path: Path,
) -> None:
    import json

    from hfl_lab.lab.retrieval import retrieve_and_evaluate
    from hfl_lab.lab.training import TrainingOutcome
    from hfl_lab.lab.trust import LabTrustService
    from hfl_lab.vault import open_vault_for_ps, provision_vault
    from trainer.checkpoint import TrainingState, encode_state
    from trainer.model import build_resnet

    run = tmp_path / "run"
    config = LabConfig(run_dir=str(run), depth=8, steps=1, vault_size_mb=8)
    from hfl_lab import owner

    salt, state, salt_file = owner.new_salt(), tmp_path / "trust.sealed", tmp_path / "owner.json"
    salt_file.write_text(json.dumps({"salt": salt.hex()}))  # public; the secret is the session's
    owner_key = owner.sealing_key(owner.admin_token(salt))
    volume = run / "vault" / "model.luks"
    volume.parent.mkdir(parents=True)
    weights = build_resnet(8, seed=0).get_weights()
    trust = LabTrustService.start(config, state_path=state, owner_key=owner_key)
    with trust, trust.client() as client:
        provision_vault(client, trust.admin_token, volume, size_mb=8,
                        release_policy=trust.volume_release_policy(), kdf_iterations=FAST_KDF)
        with open_vault_for_ps(client, "ps0", trust.provider("ps0"), volume) as vault:
            vault.write_checkpoint(1, encode_state(TrainingState(1, weights)), {})
    TrainingOutcome(run, 1, 1.0, {"final_step": 1, "evaluation": {}}, config=config.to_dict(),
                    vault={"vault_path": str(volume), "trust_state_path": str(state),
                           "owner_salt_path": str(salt_file)}).save()

    report = retrieve_and_evaluate(config)  # another "kernel": the trust service is gone

    assert report.sealed and report.opened and report.step == 1
    assert report.location == run / "trusted-node" / "model.luks"
    assert "not verified" in report.provenance
    assert 0.0 <= report.accuracy <= 1.0 and report.num_samples > 0
    assert (run / "confusion_matrix.png").stat().st_size > 1000
