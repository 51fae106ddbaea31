"""What an attendee sees (issue 22): text marks that render without an emoji font, values cut
with an ellipsis and whole on hover, one reason for a fully skipped CoCo plan, plain refusal
reasons, the session's current run, and a message pane that says what it cut."""

from __future__ import annotations

import io
import json
import queue
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from hfl_lab import AttestationError, ConfigError
from hfl_lab.config import LabConfig
from hfl_lab.dashboard import Dashboard
from hfl_lab.dashboard.figures import StepTimeFigure, robust_top
from hfl_lab.dashboard.state import RunState
from hfl_lab.events import LabEvent, startup_event
from hfl_lab.lab.attacks import AttackOutcome, AttackReport
from hfl_lab.lab.board import AttestationBoard
from hfl_lab.lab.coco import plan_coco_stack
from hfl_lab.lab.session import NOTEBOOK_RUN_DIR, record_current_run, session_run
from hfl_lab.lab.training import ensure_trained
from hfl_lab.lab.watch import RunWatch
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


# -- notebook 04's first seconds (issue 22, item 4) -----------------------------------------------


def _lifecycle(role: str, state: str, detail: str = "") -> LabEvent:
    return LabEvent("lifecycle", role, {"state": state, "detail": detail})


def _attested(verifier: str, subject: str, accepted: bool = True) -> LabEvent:
    return LabEvent("attestation", verifier, {"verifier": verifier, "subject": subject,
                                              "accepted": accepted, "simulated": True})


def test_the_progress_label_follows_the_start_up_until_the_first_step(tmp_path: Path) -> None:
    dashboard = Dashboard(tmp_path, total_steps=60, interactive=False, stream=io.StringIO())
    seen: list[str] = []
    start_up = [
        _lifecycle("trust", "starting", "launched"), _lifecycle("trust", "provisioning"),
        _lifecycle("trust", "ready"), startup_event("the owner creates the model's LUKS volume"),
        _lifecycle("ps0", "starting", "launched"), _lifecycle("worker0", "starting", "launched"),
        _lifecycle("ps0", "starting", "pulling the workload image"),
        _attested("key-broker", "ps0"),
        _lifecycle("ps0", "starting"),  # its workload's own first word: it attests next
        _attested("trust", "ps0"), _lifecycle("ps0", "ready"),
        _lifecycle("worker0", "starting"), _attested("trust", "worker0", accepted=False),
    ]

    for event in start_up:
        dashboard.feed(event)
        seen.append(dashboard._status())
    dashboard.feed(LabEvent("metrics", "worker0", {"step": 1, "loss": 2.3, "compute_s": 0.1}))
    training = dashboard._status()
    dashboard.close()

    assert seen[0] == "start-up: trust service starting"
    assert seen[1] == "start-up: trust service attesting to the owner"
    assert seen[2] == "start-up: trust service up"
    assert seen[3] == "start-up: trust service up · the owner creates the model's LUKS volume"
    assert seen[4] == "start-up: trust service up · ps0 starting"  # the owner's step is over
    assert seen[7] == ("start-up: trust service up · ps0 image key released · "
                       "worker0 starting")
    assert seen[8].startswith("start-up: trust service up · ps0 attesting")
    assert seen[10] == "start-up: trust service up · ps0 ready · worker0 starting"
    assert seen[-1] == "start-up: trust service up · ps0 ready · worker0 refused"
    assert training.startswith("loss 2.300") and "start-up" not in training


class _SlowStartingBackend:
    """A backend whose start() emits its events and returns only once the dashboard has shown
    them (it fails the test if they are shown only after start-up, as before issue 22)."""

    name = "fake"

    def __init__(self, dashboard: Dashboard) -> None:
        self.dashboard = dashboard
        self.queue: queue.Queue[LabEvent | None] = queue.Queue()
        self.shown_during_start = threading.Event()

    def start(self) -> None:
        for event in (_lifecycle("trust", "ready"), _attested("trust", "ps0"),
                      _attested("trust", "worker0")):
            self.queue.put(event)
        deadline = time.monotonic() + 60  # generous: only a watch that never streams misses it
        while time.monotonic() < deadline:
            with self.dashboard._lock:
                if len(self.dashboard.state.attestations) == 2:
                    self.shown_during_start.set()
                    return
            time.sleep(0.01)

    def wait_ready(self, timeout_s: float, progress: Any = None) -> None:
        progress(1, 1, "participants ready")
        self.queue.put(LabEvent("lifecycle", "ps0", {"state": "done", "version": 3}))
        self.queue.put(None)

    def events(self, idle_timeout_s: float | None = None) -> Iterator[LabEvent]:
        while (event := self.queue.get(timeout=idle_timeout_s)) is not None:
            yield event


def test_attestations_reach_the_dashboard_while_the_run_starts(tmp_path: Path) -> None:
    config = LabConfig(run_dir=str(tmp_path), steps=3, timeout_s=120)
    stream = io.StringIO()
    dashboard = Dashboard(tmp_path, total_steps=3, interactive=False, stream=stream)
    backend = _SlowStartingBackend(dashboard)
    watch = RunWatch(backend, dashboard, config)  # type: ignore[arg-type]

    watch.start(ready_timeout_s=60)
    done = watch.until_done()
    dashboard.close()

    assert backend.shown_during_start.is_set(), "the verdicts were shown only after start-up"
    assert done["version"] == 3
    assert stream.getvalue().count("✓ attestation trust →") == 2
    assert dashboard.state.progress["start-up"]["source"] == "lab"


def test_slow_steps_do_not_squash_the_step_time_plot() -> None:
    state = RunState(total_steps=40)
    for step in range(40):
        slow = {0: 0.9, 39: 3.5}.get(step)  # the first step compiles; the last checkpoints
        for role in ("worker0", "worker1"):
            compute = slow or 0.05 + 0.01 * (step % 3)
            state.apply(LabEvent("metrics", role, {"step": step, "compute_s": compute,
                                                   "push_s": 0.01, "wait_s": 0.0,
                                                   "pull_s": 0.0}))
    figure = StepTimeFigure()

    figure.draw(state)

    bars, series = figure.figure.axes
    assert series.get_ylim()[1] < 200, "the axis is clipped to the usual steps (~60-80 ms)"
    written = [t.get_text() for t in series.texts]
    assert "3.5 s" in written and "910 ms" in written  # the slow steps keep their values
    assert "slow step(s)" in series.get_title() and "left out" in bars.get_title()
    assert robust_top([50.0, 60.0, 55.0, 58.0]) is None  # nothing to clip
    assert state.step_time_means(20)["worker0"]["total_s"] > 0.2  # metrics.json: all steps


# -- notebook 06's ending (issue 22, item 8) ------------------------------------------------------


def test_the_final_matrix_names_attackers_by_their_attack(
    tmp_path: Path, capsys: pytest.CaptureFixture[str],
) -> None:
    board = AttestationBoard(tmp_path, interactive=False)
    for event in (_attested("lab", "trust"), _attested("trust", "ps0"),
                  _attested("trust", "worker0", accepted=False),
                  _attested("trust", "worker1", accepted=False),
                  _attested("lab", "trust (MITM)", accepted=False),
                  _attested("key-broker", "client without attestation", accepted=False)):
        board.feed(event)
    report = AttackReport([
        AttackOutcome(name, "", True, "trust service", "refused",
                      Verdict(subject=subject, verifier="trust"))
        for name, subject in (("modified worker code", "worker0"), ("DEBUG TD", "worker1"),
                              ("MITM server", "trust (MITM)"),
                              ("client without attestation", "client without attestation"))
    ])
    board.close()
    capsys.readouterr()

    labels = report.subject_labels()
    board.show_matrix(labels)
    shown = capsys.readouterr().out

    assert labels == {"worker0": "modified worker code (as worker0)",
                      "worker1": "DEBUG TD (as worker1)",
                      "trust (MITM)": "MITM server (as trust)"}
    header = next(line for line in shown.splitlines() if line.startswith("verifier"))
    assert "modified worker code (as worker0)" in header and "DEBUG TD (as worker1)" in header
    assert "worker0 " not in header.replace("(as worker0)", "")  # no column named worker0
    assert "ps0" in header  # the genuine control keeps its name
    assert (tmp_path / "attestation_matrix.png").stat().st_size > 5_000
    assert board.state.matrix[("trust", "worker0")].subject == "worker0"  # the record is kept
