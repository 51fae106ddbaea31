"""The host's dashboard of a workshop run (issue 23 item 1): the participants table grows a row
per participant that appeared, a refusal names the differing measurement short (expected vs
got) on the board, in the text lines and in the matrix, headless output stays readable text,
and the join links render copyable."""

from __future__ import annotations

import io
import json
from pathlib import Path
from types import SimpleNamespace

import pytest

from hfl_lab import ConfigError
from hfl_lab.config.join_link import JoinLink
from hfl_lab.dashboard.state import RunState, check_difference
from hfl_lab.dashboard.text import matrix_text
from hfl_lab.events import LabEvent
from hfl_lab.lab.stand_ins import EDITED_FILE, LocalJoiners, edited_workload
from hfl_lab.lab.workshop import SlotBoard
from hfl_lab.lab.workshop_view import JoinLinks, WorkshopDashboard, host_workshop
from hfl_lab.tee.sim.measure import source_files

EXPECTED, GOT = "f1bccc69" + "ab" * 44, "8d7e4a54" + "cd" * 44
MR_TD_REFUSAL = {
    "verifier": "trust", "subject": "worker1", "accepted": False, "simulated": True,
    "reason": "mr_td: mr_td does not match the policy's reference value for role worker1",
    "checks": [{"name": "tee_type", "passed": True, "expected": "TDX", "actual": "TDX"},
               {"name": "mr_td", "passed": False, "expected": EXPECTED, "actual": GOT,
                "reason": "mr_td does not match"}],
}


def _accepted(verifier: str, subject: str) -> LabEvent:
    return LabEvent("attestation", verifier, {"verifier": verifier, "subject": subject,
                                              "accepted": True, "simulated": True})


def _hosted_run_events() -> list[LabEvent]:
    """What a host sees: ps0 up, worker0 joins and trains, worker1 (edited code) is refused,
    a stranger is refused, worker0 leaves, the run ends."""
    return [
        LabEvent("lifecycle", "trust", {"state": "ready", "detail": "serving"}),
        _accepted("trust", "ps0"), _accepted("ps0", "trust"),
        LabEvent("lifecycle", "ps0", {"state": "ready", "detail": "serving"}),
        _accepted("trust", "worker0"),
        LabEvent("attestation", "trust", MR_TD_REFUSAL),
        LabEvent("attestation", "trust", {**MR_TD_REFUSAL, "subject": "worker9"}),
        _accepted("ps0", "worker0"),
        LabEvent("log", "ps0", {"level": "info", "peer": "worker0",
                                "message": "worker0 registered at step 0"}),
        *(LabEvent("progress", "ps0", {"done": s, "total": 10, "unit": "steps",
                                       "label": "training", "contributors": ["worker0"]})
          for s in range(1, 11)),
        LabEvent("evaluation", "ps0", {"step": 5, "loss": 2.4, "accuracy": 0.12}),
        LabEvent("evaluation", "ps0", {"step": 10, "loss": 2.1, "accuracy": 0.2}),
        LabEvent("lifecycle", "ps0", {"state": "done", "version": 10}),
    ]


def test_a_refusal_names_the_differing_measurement_short() -> None:
    state = RunState()

    state.apply(LabEvent("attestation", "trust", MR_TD_REFUSAL))
    record = state.attestations[0]

    assert record.difference == "mr_td: expected f1bccc69…, got 8d7e4a54…"
    assert check_difference([{"name": "debug", "passed": False, "reason": "DEBUG set"}]) == ""
    assert check_difference([{"name": "tcb", "passed": True, "expected": "a", "actual": "a"}]) \
        == ""
    text = matrix_text(state.to_metrics()["attestation_matrix"])
    assert "refused trust → worker1" in text and "expected f1bccc69…, got 8d7e4a54…" in text


def test_the_board_lists_who_appeared_and_follows_them_to_the_end() -> None:
    board = SlotBoard.for_slots(3)

    lines = [line for e in _hosted_run_events() if (line := board.update(e))]
    table = board.table()

    assert "worker1: refused (mr_td: expected f1bccc69…, got 8d7e4a54…)" in lines
    assert "worker0: training (first update in step 1)" in lines
    assert lines[-1] == "the run is done: worker0 trained until the end"
    # a row per participant that appeared (worker2 never did), and the stranger's refusal
    assert [row[0] for row in table.rows] == ["worker0", "worker1", "worker9"]
    assert table.rows[0][1:4] == ("done", 10, "pass")
    assert table.rows[1][1] == "refused" and table.rows[1][3] == "FAIL"
    assert table.title == "participants: 2 of 3 slots taken"
    assert board.rows()[2] == {"slot": "worker2", "state": "waiting", "step": None,
                               "detail": ""}


def test_a_slot_that_leaves_and_rejoins_is_followed() -> None:
    board = SlotBoard.for_slots(1)
    board.update(_accepted("trust", "worker0"))

    left = board.update(LabEvent("log", "ps0", {"peer": "worker0",
                                                "message": "worker0 left at step 7"}))
    back = board.update(_accepted("trust", "worker0"))

    assert left == "worker0: left (left at step 7)"
    assert back == "worker0: attested (evidence accepted)"


def test_an_empty_board_says_to_hand_out_the_links() -> None:
    table = SlotBoard.for_slots(2).table()

    assert table.rows == [] and "hand out the join links" in table.note


def test_the_headless_dashboard_is_readable_text_and_writes_the_run_record(
    tmp_path: Path,
) -> None:
    board = SlotBoard.for_slots(2)
    out = io.StringIO()

    with WorkshopDashboard(tmp_path, board, total_steps=10, interactive=False,
                           stream=out) as dashboard:
        events = _hosted_run_events()
        dashboard.feed_all(events[:4])  # the services are up, nobody has joined
        waiting = dashboard._status()
        dashboard.feed_all(events[4:])
    text = out.getvalue()

    assert waiting == "waiting for joiners (0 of 2 slots taken)"

    assert "● worker0: attested (evidence accepted)" in text
    assert "● worker1: refused (mr_td: expected f1bccc69…, got 8d7e4a54…)" in text
    assert "✗ attestation trust → worker1: FAIL" in text
    assert "evaluation at step 10: test loss 2.1000" in text
    # the closing table: one row per participant, no widget markup
    assert "participants: 2 of 2 slots taken" in text and "<" not in text.split("participants:")[-1]
    participants = json.loads((tmp_path / "participants.json").read_text())
    assert [s["state"] for s in participants["slots"]] == ["done", "refused"]
    assert participants["refusals"] == ["worker9: mr_td: expected f1bccc69…, got 8d7e4a54…"]
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["evaluation"]["loss"] == [2.4, 2.1]  # the global model's live loss
    for png in ("loss.png", "attestation_matrix.png"):
        assert (tmp_path / png).stat().st_size > 5_000


def _link(slot: str) -> JoinLink:
    return JoinLink.issue(b"k" * 32, trust_address="192.168.1.20:7000",
                          ps_address="192.168.1.20:7001",
                          trust_measurements={"mr_td": "ab" * 48, "mr_config_id": "cd" * 48},
                          policy_sha256="ef" * 32, slot=slot, lab_root_sha256="01" * 32)


def test_join_links_show_whole_and_copyable_one_per_slot() -> None:
    links = JoinLinks([_link("worker0"), _link("worker1")])

    text, page = repr(links), links._repr_html_()

    for link in links.links:
        assert link.encode() in text  # whole, on its slot's line
        assert f"<code style='user-select:all;word-break:break-all'>{link.encode()}</code>" \
            in page
    assert [line.split()[0] for line in text.splitlines() if "hfl-join:" in line] == [
        "worker0", "worker1"]
    assert "hfl-lab join" in text


def test_the_edited_workload_differs_from_the_genuine_one_in_one_file(tmp_path: Path) -> None:
    repo = Path(__file__).resolve().parents[1]

    root = edited_workload(tmp_path / "edited", repo)

    genuine = {f.relative_to(repo): f.read_bytes() for f in source_files(repo)}
    copied = {f.relative_to(root): f.read_bytes() for f in source_files(root)}
    assert set(copied) == set(genuine)
    assert [str(name) for name in copied if copied[name] != genuine[name]] == [EDITED_FILE]
    assert copied[Path(EDITED_FILE)].startswith(genuine[Path(EDITED_FILE)])


def test_more_stand_ins_than_slots_are_refused_before_any_starts(tmp_path: Path) -> None:
    run = SimpleNamespace(links={"worker0": _link("worker0")})  # what the count check reads

    with pytest.raises(ConfigError, match="at most 1"):
        LocalJoiners.start(run, 3, folder=tmp_path)  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="count >= 0"):
        LocalJoiners.start(run, -2, folder=tmp_path)  # type: ignore[arg-type]
    assert not list(tmp_path.iterdir())


def test_with_a_front_end_the_participants_table_is_a_widget_that_grows(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    from hfl_lab.dashboard import frontend

    shown: list[object] = []
    monkeypatch.setattr(frontend, "display", lambda obj, **kw: shown.append(obj))
    board = SlotBoard.for_slots(2)
    dashboard = WorkshopDashboard(tmp_path, board, total_steps=10, interactive=True)
    table = dashboard._table
    before = table.value

    for event in _hosted_run_events()[:6]:  # up to worker1's refusal
        dashboard.feed(event)
    dashboard.close()

    assert table in shown and "hand out the join links" in before
    assert "worker1" in table.value and "expected f1bccc69…, got 8d7e4a54…" in table.value
    assert "#ffebe9" in table.value  # the refused row stands out


def test_a_run_folder_that_held_a_hosted_run_is_refused_before_anything_starts(
    tmp_path: Path, cifar_dir: Path,
) -> None:
    from tests.local_support import quick_config

    config = quick_config(tmp_path, cifar_dir)
    ended = Path(config.run_dir)
    (ended / "checkpoints").mkdir(parents=True)
    (ended / "checkpoints" / "step-000000000040").mkdir()

    with pytest.raises(ConfigError, match="already holds a hosted run") as held:
        host_workshop(config, address="127.0.0.23", slots=2)
    with pytest.raises(ConfigError, match="quorum must be 0"):
        host_workshop(quick_config(tmp_path / "new", cifar_dir), address="127.0.0.23",
                      slots=2, quorum=-1)

    assert "new folder" in str(held.value)
    assert sorted(p.name for p in ended.iterdir()) == ["checkpoints"]  # nothing was started
    assert not (tmp_path / "new" / "run").exists()
