"""Notebook 07 headless (issue 23): with nobody in the room, joiners on this machine stand in for
attendees; the honest one trains until the run ends, the one with edited worker code is refused
with MR_TD named, expected vs got; the links, the participants and the final matrix are in the
executed notebook as text; the run folder holds the record."""

from __future__ import annotations

import json
from pathlib import Path

import nbformat
import pytest

REPO = Path(__file__).resolve().parents[1]
NOTEBOOK = REPO / "notebooks" / "07_workshop.ipynb"
STEPS = 40


def _outputs_text(path: Path) -> str:
    nb = nbformat.read(path, as_version=4)
    parts = []
    for cell in nb.cells:
        for output in cell.get("outputs", []):
            if output.get("output_type") == "error":
                pytest.fail(f"{output.get('ename')}: {output.get('evalue')}")
            parts.append(output.get("text", "") or output.get("data", {}).get("text/plain", ""))
    return "\n".join(parts)


@pytest.mark.slow
def test_the_workshop_notebook_finishes_headless_with_stand_in_joiners(
    tmp_path: Path, cifar_dir: Path
) -> None:
    import papermill

    from hfl_lab.lab.jupyter import ensure_kernel

    ensure_kernel()
    run_dir = tmp_path / "workshop"
    executed = tmp_path / "07.ipynb"

    papermill.execute_notebook(
        str(NOTEBOOK), str(executed),
        parameters={"run_dir": str(run_dir), "address": "127.0.0.23", "steps": STEPS,
                    "eval_every": 10, "learning_rate": 0.02, "data_path": str(cifar_dir)},
        kernel_name="hfl-lab", cwd=str(NOTEBOOK.parent), progress_bar=False,
    )

    text = _outputs_text(executed)
    record = json.loads((run_dir / "workshop.json").read_text())
    slots = {s["slot"]: s for s in record["participants"]}
    # what the room sees: the links, the stand-ins labelled as such, the refusal named
    assert text.count("hfl-join:") >= 2
    assert "joiners on this machine stand in for attendees" in text
    assert "● worker0: training" in text
    assert "● worker1: refused (mr_td: expected " in text
    assert "refused trust → worker1" in text  # the final matrix, as text
    # the run: ended, the honest stand-in trained to the end, the edited one was refused
    assert record["final_step"] == STEPS
    assert slots["worker0"]["state"] == "done" and slots["worker0"]["step"] == STEPS
    assert slots["worker1"]["state"] == "refused"
    assert slots["worker1"]["detail"].startswith("mr_td: expected ")
    joiners = {j["slot"]: j for j in record["joiners"]}
    assert joiners["worker1"]["modified"] and joiners["worker1"]["steps"] == 0
    assert "mr_td" in joiners["worker1"]["outcome"]
    assert joiners["worker0"]["exit_code"] == 0 and joiners["worker0"]["steps"] >= STEPS // 2
    assert record["global_loss"] and record["global_loss"][-1][0] == STEPS  # the final one
    # the honest stand-in's own screen: its batch loss fell
    losses = [json.loads(line)["data"]["loss"]
              for line in (run_dir / "joiners" / "worker0" / "logs" / "worker0.log").open()
              if line.startswith('{"kind": "metrics"')]
    head, tail = losses[: len(losses) // 2], losses[len(losses) // 2:]
    assert sum(tail) / len(tail) < sum(head) / len(head), "the loss did not fall"
    for png in ("loss.png", "attestation_matrix.png"):
        assert (run_dir / png).stat().st_size > 5_000
    assert not list((REPO / "notebooks").glob("*.ipynb.*")), "papermill wrote beside the source"
