"""`hfl-lab attest endpoint` against the lab's own trust service, started by the test."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from hfl_lab.cli import main
from tests.td_support import PLATFORM, lab_policy
from tests.trust_support import start


def test_endpoint_verdicts_against_a_running_trust_service(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    trust = start(tmp_path)
    root = tmp_path / "lab-root.der"
    root.write_bytes(PLATFORM.root_der)
    policy = tmp_path / "lab-policy.yaml"
    lab_policy(report_data_binding="key").save(policy)
    try:
        lab = main(["attest", "endpoint", trust.address, "--policy", str(policy),
                    "--lab-root", str(root), "--json"])
        lab_out = json.loads(capsys.readouterr().out)
        baseline = main(["attest", "endpoint", trust.address, "--json"])
        base_out = json.loads(capsys.readouterr().out)
    finally:
        trust.server.stop(0)

    assert lab == 0 and lab_out["accepted"] and lab_out["simulated"]
    assert baseline == 1 and not base_out["accepted"]
    failed = {c["name"] for c in base_out["checks"] if not c["passed"]}
    assert "simulated" in failed
