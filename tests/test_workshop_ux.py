"""What an attendee sees (issue 22): text marks that render without an emoji font, values cut
with an ellipsis and whole on hover, one reason for a fully skipped CoCo plan, plain refusal
reasons, the session's current run, and a message pane that says what it cut."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pytest

from hfl_lab import AttestationError, ConfigError
from hfl_lab.config import LabConfig
from hfl_lab.lab.coco import plan_coco_stack
from hfl_lab.lab.session import NOTEBOOK_RUN_DIR, record_current_run, session_run
from hfl_lab.lab.training import ensure_trained
from hfl_lab.tee import Evidence, Verdict
from hfl_lab.tee.verdict import value_html
from tests.td_support import lab_policy, provider, verifier_for


def test_verdict_tables_mark_checks_with_text_and_show_whole_values_on_hover() -> None:
    verdict = Verdict(subject="worker0", simulated=True)
    verdict.add("mr_td", True, "ab" * 48, "ab" * 48)
    verdict.add("mr_config_id", False, "cd" * 48, "ef" * 48, "does not match")

    page = verdict._repr_html_()

    assert "✓ pass" in page and "✗ FAIL" in page
    assert "✅" not in page and "❌" not in page  # empty boxes without an emoji font
    assert f"title='{'ef' * 48}'" in page and "…" in page  # cut, whole on hover
    assert "TCB None" not in page and "TCB none: simulated" in page
    assert value_html("short") == "<code title='short'>short</code>"


def test_a_challenge_issued_this_second_is_not_negative_seconds_old() -> None:
    binding = b"\x5a" * 64
    evidence = provider("worker0").get_evidence(binding)
    now = int(time.time())  # the verifier's clock reads whole seconds
    verdict = verifier_for(lab_policy("worker0")).verify(
        evidence, binding=binding, issued_at=now + 0.4, now=now, role="worker0")

    fresh = next(c for c in verdict.checks if c.name == "freshness")
    assert fresh.passed and fresh.actual == "issued this second", fresh


def test_a_client_without_evidence_is_told_so_in_words() -> None:
    with pytest.raises(AttestationError) as empty:
        Evidence.from_json("")
    assert "no evidence came with the request" in str(empty.value)
    with pytest.raises(AttestationError) as garbage:
        Evidence.from_json("not json")
    assert "not an evidence document" in str(garbage.value)
    assert "Expecting value: line" not in str(garbage.value)


def test_a_plan_with_every_step_skipped_says_why_once(tmp_path: Path) -> None:
    plan = plan_coco_stack(LabConfig(run_dir=str(tmp_path)))
    text = plan.table().to_text()
    reason = plan.steps[0].detail

    assert text.count(reason) == 1
    assert plan.summary().startswith(f"All {len(plan.steps)} steps skipped")
    assert "backend='kubernetes'" in plan.summary()
    assert "0 step(s) still to do" not in plan.summary()


def test_notebooks_05_and_06_open_the_run_notebook_04_trained(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
) -> None:
    notebooks = tmp_path / "notebooks"
    notebooks.mkdir()
    monkeypatch.chdir(notebooks)  # where a kernel runs: the notebook's folder
    trained = tmp_path / "runs" / "lab-2"
    trained.mkdir(parents=True)
    record_current_run(LabConfig(run_dir=str(trained)))

    default = session_run(LabConfig(run_dir=NOTEBOOK_RUN_DIR))
    chosen = session_run(LabConfig(run_dir=str(tmp_path / "runs" / "other")))

    assert Path(default.run_dir) == trained.resolve()
    assert "the session's current run" in capsys.readouterr().out
    assert Path(chosen.run_dir) == tmp_path / "runs" / "other"  # set by hand: as given
    stored = json.loads((tmp_path / "runs" / "current_run.json").read_text())
    assert stored == {"run_dir": str(trained.resolve())}


def test_a_run_folder_without_training_is_named_with_the_runs_there_are(
    tmp_path: Path,
) -> None:
    done = tmp_path / "lab"
    done.mkdir()
    (done / "training.json").write_text("{}")

    with pytest.raises(ConfigError) as missing:
        ensure_trained(LabConfig(run_dir=str(tmp_path / "lab-typo")))

    assert str(done) in missing.value.message and "train_if_missing=True" in str(missing.value)
    assert not (tmp_path / "lab-typo").exists()  # nothing was trained


def test_the_message_pane_says_how_many_messages_it_cut(monkeypatch: pytest.MonkeyPatch) -> None:
    from hfl_lab.dashboard import frontend

    shown: list[Any] = []
    monkeypatch.setattr(frontend, "display", lambda obj, **kw: shown.append(obj))
    pane = frontend.WidgetProgress(60, keep_lines=8)
    for i in range(11):
        pane.write(f"worker{i} attested")

    assert "3 earlier message(s)" in pane.log.value and "events.jsonl" in pane.log.value
    assert "worker10 attested" in pane.log.value and "worker2 attested" not in pane.log.value
