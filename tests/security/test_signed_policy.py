"""R8, issue 18 item 2 (the policy half): a policy swapped on its way to a TD is refused.

The run's policy reaches the pods through a ConfigMap, which whoever administers the cluster can
edit: a laxer policy (another MR_TD, simulated evidence, no roles) would decide who gets a
certificate or the volume key. Measuring the policy's digest into each TD is circular (the
policy pins the TDs' measurements), so the owner signs the policy instead, with a key derived
from the run's admin credential, and the public half of that key is in the participant config
every TD measures. A participant takes only a policy the owner signed; a TDX run without the
owner's key takes none.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from hfl_lab import ConfigError, owner
from hfl_lab.backends.kubernetes.render import render_run
from hfl_lab.backends.kubernetes.settings import KubernetesSettings
from hfl_lab.config import LabConfig
from hfl_lab.tee import AttestationPolicy, measure_workload
from tests.reliability_report import record
from trainer.participant import load_run_policy
from trainer.participant_config import Deployment, ParticipantConfig

TOKEN = b"\x05" * 32
KEY = owner.policy_signing_key(TOKEN)
STRICT = AttestationPolicy.from_dict({"tee_type": "TDX", "report_data_binding": "key+nonce",
                                      "roles": {"ps0": {"mr_config_id": "ab" * 48}}})


def _config(tmp_path: Path, *, key: str = owner.policy_key(TOKEN),
            evidence: str = "configfs-tsm") -> ParticipantConfig:
    deployment = Deployment(trust_address="trust:50060", ps_address="ps0:50051", workers=2,
                            evidence=evidence, overlay="kata-qemu-tdx",
                            policy_path=str(tmp_path / "policy.yaml"), policy_key=key)
    path = tmp_path / "config.yaml"
    ParticipantConfig.write(path, deployment, LabConfig(workers=2, run_dir=str(tmp_path / "r")))
    return ParticipantConfig.load(path)


def test_the_owners_signed_policy_is_taken(tmp_path: Path) -> None:
    STRICT.save_signed(tmp_path / "policy.yaml", KEY)
    assert load_run_policy(_config(tmp_path), tmp_path / "policy.yaml") == STRICT


SWAPS = {
    "laxer policy in the ConfigMap": lambda p: p.write_text(
        p.read_text().replace("allow_simulated: false", "allow_simulated: true")),
    "one reference value changed": lambda p: p.write_text(p.read_text().replace("abab", "cdab")),
    "signature removed": lambda p: p.with_name("policy.yaml.sig").unlink(),
    "signed by someone else": lambda p: AttestationPolicy.from_dict(
        {"tee_type": "TDX", "allow_simulated": True}).save_signed(
        p, owner.policy_signing_key(b"\x09" * 32)),
}


@pytest.mark.parametrize("swap", sorted(SWAPS))
def test_a_swapped_policy_is_refused(tmp_path: Path, swap: str) -> None:
    path = tmp_path / "policy.yaml"
    STRICT.save_signed(path, KEY)
    SWAPS[swap](path)

    with pytest.raises(ConfigError) as refused:
        load_run_policy(_config(tmp_path), path)

    message = str(refused.value)
    held = "policy" in message and ("not signed by the owner" in message
                                    or "signature" in message)
    record("R8", f"policy swapped on its way to a TD: {swap}", held=int(held))
    assert held, message


def test_a_tdx_run_without_the_owners_key_takes_no_policy(tmp_path: Path) -> None:
    STRICT.save(tmp_path / "policy.yaml")
    with pytest.raises(ConfigError, match="names no owner policy key"):
        load_run_policy(_config(tmp_path, key=""), tmp_path / "policy.yaml")


def test_the_owners_key_is_measured(tmp_path: Path) -> None:
    one = _config(tmp_path / "a", key=owner.policy_key(TOKEN), evidence="simulated")
    other = _config(tmp_path / "b", key=owner.policy_key(b"\x06" * 32), evidence="simulated")
    m1 = measure_workload(role="ps0", config=one.measured())
    m2 = measure_workload(role="ps0", config=other.measured())
    assert m1.mr_config_id != m2.mr_config_id


def test_the_rendered_run_carries_the_key_and_the_signatures(tmp_path: Path) -> None:
    run = render_run(KubernetesSettings(overlay="kata-qemu-tdx", workers=2,
                                        lab_config={"vault": True},
                                        run_dir=tmp_path / "k8s"), signing_key=KEY)
    assert run.document["deployment"]["policy_key"] == owner.policy_key(TOKEN)
    policy_map = next(o for o in run.objects if o["kind"] == "ConfigMap"
                      and o["metadata"]["name"] == "hfl-policy")["data"]
    assert {"policy.yaml", "policy.yaml.sig", "volume_policy.yaml",
            "volume_policy.yaml.sig"} <= set(policy_map)
    # what a pod reads from the ConfigMap verifies against the key in its measured config
    pod = tmp_path / "pod"
    pod.mkdir()
    for name, text in policy_map.items():
        (pod / name).write_text(text)
    config = _config(tmp_path, key=run.document["deployment"]["policy_key"])
    assert load_run_policy(config, pod / "policy.yaml") == run.policy
