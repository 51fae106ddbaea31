"""The X-join harness (bench/xjoin.py) end to end, small: a hosted run (real trust service and
ps0 processes), 4 simulated joiners that each verify the host against their own join link,
enroll, attest and register, train together, then 1 leaves and the other 3 go on at the new
quorum. No timing is asserted (the figures are bench/'s); what is checked is that the path the
figure rests on happened: every joiner attested by the trust service and registered with ps0,
ps0's live quorum rose to 4 and fell to 3, and the run reached its last step without the
leaver. Every TD here is SIMULATED (lab-local attestation keys)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from bench.xjoin import Plan, run_xjoin
from tests.local_support import quick_config

pytestmark = pytest.mark.slow

PLAN = Plan(joiners=4, leavers=1, alone=1, depth=8, warmup_steps=1, timed_steps=3, after_steps=3,
            windows=2, host="127.0.0.44", timeout_s=240.0)


def test_four_joiners_attest_train_and_the_run_goes_on_when_one_leaves(
    tmp_path: Path, cifar_dir: Path
) -> None:
    lab = quick_config(tmp_path, cifar_dir, depth=PLAN.depth, aggregation="sync",
                       checkpoint_every=0, vault=False)

    result = run_xjoin(lab, PLAN, tmp_path / "xjoin")

    assert result.problems() == [], result.report()
    assert result.warnings == [], result.warnings
    assert result.attested == {f"worker{i}" for i in range(PLAN.joiners)}
    assert len(result.solo) == 1 and result.solo[0].registered
    assert len(result.burst) == 3
    for joiner in result.joiners.values():
        times = joiner.times
        assert times.started <= times.verified <= times.enrolled <= times.attested \
            <= times.registered, joiner.slot
        assert joiner.summary is not None
    # the leaver pushed every step up to the leave; the others every step to the end
    pushed = {slot: [step for _, step in j.steps] for slot, j in result.joiners.items()}
    assert pushed["worker3"] == list(range(PLAN.leave_step))
    for slot in ("worker0", "worker1", "worker2"):
        assert pushed[slot] == list(range(PLAN.last_step)), slot
    # ps0's live quorum: every joiner counted before the gate opened, the leaver stopped
    # counting when it left (the others leave too once they reach their last step)
    quorum = [int(m.group(1)) for _, line in result.quorum_log
              if (m := re.match(r"quorum K=(\d+)", line))]
    full = max(i for i, k in enumerate(quorum) if k == 4)
    assert quorum[full + 1] == 3, result.quorum_log
    assert result.left_at > 0 and result.resumed_at > result.left_at
