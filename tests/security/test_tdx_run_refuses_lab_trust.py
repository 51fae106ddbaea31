"""R8, issue 18 item 2 (part): on a TDX run nobody can make a participant trust the lab's root.

Whoever can write the cluster's Secrets or ConfigMaps could add a ``platform`` field (the
simulated platform's keys and root) to the bootstrap Secret, or ``allow_simulated: true`` to the
policy, and so have genuine-looking simulated evidence accepted by the trust service and the
mesh, even under kata. A participant of a run with hardware evidence (``configfs-tsm``,
``coco-agent``, or a ``kata-*`` overlay) refuses both outright, before it makes a key, and the
trust service inside it never starts.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from hfl_lab import ConfigError, owner
from hfl_lab.config import LabConfig
from hfl_lab.tee import AttestationPolicy, SimulatedPlatform
from tests.reliability_report import record
from trainer.participant import Bootstrap, Emitter, Participant
from trainer.participant_config import Deployment, ParticipantConfig


def _config(tmp_path: Path, *, evidence: str, overlay: str, policy: AttestationPolicy) -> (
        ParticipantConfig):
    policy_file = tmp_path / "policy.yaml"
    policy.save_signed(policy_file, OWNER_KEY)  # as the owner signs it: only the content matters
    deployment = Deployment(trust_address="trust.hfl-lab.svc:50060",
                            ps_address="ps0.hfl-lab.svc:50051", workers=2, evidence=evidence,
                            overlay=overlay, policy_path=str(policy_file),
                            policy_key=owner.policy_key(TOKEN))
    path = tmp_path / "config.yaml"
    ParticipantConfig.write(path, deployment, LabConfig(workers=2, run_dir=str(tmp_path / "run")))
    return ParticipantConfig.load(path)


TOKEN = b"\x07" * 32
OWNER_KEY = owner.policy_signing_key(TOKEN)
HARDWARE = [("configfs-tsm", "kata-qemu-tdx"), ("coco-agent", "kata-qemu-tdx-encrypted-signed"),
            ("auto", "kata-qemu-tdx")]
STRICT = AttestationPolicy.from_dict({"tee_type": "TDX", "report_data_binding": "key+nonce"})


@pytest.mark.parametrize(("evidence", "overlay"), HARDWARE)
@pytest.mark.parametrize("role", ["trust", "ps0", "worker1"])
def test_a_lab_root_in_the_bootstrap_of_a_tdx_run_is_refused(tmp_path: Path, evidence: str,
                                                              overlay: str, role: str) -> None:
    config = _config(tmp_path, evidence=evidence, overlay=overlay, policy=STRICT)
    injected = Bootstrap(platform=SimulatedPlatform.generate())

    with pytest.raises(ConfigError) as caught:
        Participant(role, config, ["python", "-m", "trainer"], injected, Emitter(role))

    message = str(caught.value)
    held = "lab platform" in message and "TDX" in message
    record("R8", f"lab root injected into a TDX {role}'s bootstrap ({evidence}, {overlay})",
           held=int(held))
    assert held, message
    assert "bootstrap" in message  # names where it came from and what to remove


@pytest.mark.parametrize(("evidence", "overlay"), HARDWARE)
def test_allow_simulated_in_the_policy_of_a_tdx_run_is_refused(tmp_path: Path, evidence: str,
                                                               overlay: str) -> None:
    lenient = STRICT.replace(allow_simulated=True)
    config = _config(tmp_path, evidence=evidence, overlay=overlay, policy=lenient)

    with pytest.raises(ConfigError) as caught:
        Participant("trust", config, ["python", "-m", "trainer"], Bootstrap(), Emitter("trust"))

    message = str(caught.value)
    held = "allow_simulated" in message
    record("R8", f"allow_simulated in a TDX run's policy ({evidence}, {overlay})", held=int(held))
    assert held, message


def test_simulated_runs_still_take_the_lab_root(tmp_path: Path) -> None:
    lenient = STRICT.replace(allow_simulated=True)
    config = _config(tmp_path, evidence="simulated", overlay="runc", policy=lenient)
    platform = SimulatedPlatform.generate()

    me = Participant("worker0", config, ["python", "-m", "trainer"], Bootstrap(platform=platform),
                     Emitter("worker0"))

    assert me.provider is not None and me.verifier.lab_root_der == platform.root_der
