"""The notebooks: thin, committed without outputs, and every one runs under papermill.

One headless run of the whole lab (``hfl-lab run`` with small parameters, as pyhf runs its
notebooks in tests) is shared by the tests below, which assert on what it wrote.
"""

from __future__ import annotations

import ast
import json
import struct
import subprocess
from pathlib import Path
from typing import Any

import nbformat
import pytest

from hfl_lab.image import missing_tools
from hfl_lab.lab.sequence import NOTEBOOKS, WORKSHOP_NOTEBOOKS
from tests.local_support import SMALL_LAB_RUN

REPO = Path(__file__).resolve().parents[1]
NOTEBOOK_DIR = REPO / "notebooks"
SMALL = SMALL_LAB_RUN
#: every notebook of the folder: the lab's sequence and the workshop's own (07, run on its own)
ALL_NOTEBOOKS = NOTEBOOKS + WORKSHOP_NOTEBOOKS


def _notebook(name: str) -> Any:
    return nbformat.read(NOTEBOOK_DIR / f"{name}.ipynb", as_version=4)


def _png_size(path: Path) -> tuple[int, int]:
    """(width, height) of a PNG, after checking its signature; the file must not be empty."""
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", f"{path} is not a PNG"
    width, height = struct.unpack(">II", data[16:24])
    return width, height


def _error_outputs(path: Path) -> list[str]:
    nb = nbformat.read(path, as_version=4)
    return [
        f"{o.get('ename')}: {o.get('evalue')}"
        for cell in nb.cells
        for o in cell.get("outputs", [])
        if o.get("output_type") == "error"
    ]


# ---------------------------------------------------------------------- the files as committed


def _tracked_notebooks() -> dict[str, str]:
    """Notebook texts as git holds them (index), plus any notebook file in the folder."""
    texts = {p.name: p.read_text(encoding="utf-8") for p in NOTEBOOK_DIR.glob("*.ipynb")}
    try:
        listed = subprocess.run(
            ["git", "ls-files", "notebooks/*.ipynb"], cwd=REPO, capture_output=True, text=True,
            check=True,
        ).stdout.split()
    except (OSError, subprocess.CalledProcessError):
        return texts
    for rel in listed:
        shown = subprocess.run(
            ["git", "show", f":{rel}"], cwd=REPO, capture_output=True, text=True, check=True
        )
        texts[f"git:{rel}"] = shown.stdout
    return texts


def test_every_lab_notebook_exists() -> None:
    assert sorted(p.stem for p in NOTEBOOK_DIR.glob("*.ipynb")) == sorted(ALL_NOTEBOOKS)


@pytest.mark.parametrize("name", sorted(_tracked_notebooks()))
def test_notebooks_are_committed_without_outputs(name: str) -> None:
    text = _tracked_notebooks()[name]
    nb = nbformat.reads(text, as_version=4)

    # as committed, before nbformat would add missing ids (a hard error in its later versions)
    without_id = [i for i, c in enumerate(json.loads(text)["cells"]) if not c.get("id")]
    assert not without_id, (f"{name}: cells {without_id} have no id; give them one "
                            "(nbformat.validator.normalize, or save the notebook in JupyterLab)")
    with_outputs = [i for i, c in enumerate(nb.cells) if c.cell_type == "code" and c.outputs]
    counted = [i for i, c in enumerate(nb.cells) if c.get("execution_count") is not None]

    assert not with_outputs, f"{name}: cells {with_outputs} have outputs; clear them"
    assert not counted, f"{name}: cells {counted} have execution counts; clear them"


PLAIN_KERAS = "plain-keras"


@pytest.mark.parametrize("name", ALL_NOTEBOOKS)
def test_notebooks_are_thin(name: str) -> None:
    nb = _notebook(name)
    code = [c for c in nb.cells if c.cell_type == "code"]
    tagged = [i for i, c in enumerate(nb.cells) if "parameters" in c.metadata.get("tags", [])]

    assert nb.cells[0].cell_type == "markdown"
    assert "What you will learn" in nb.cells[0].source
    assert "What happens" in nb.cells[0].source
    assert len(tagged) == 1, "exactly one cell tagged 'parameters'"
    following = nb.cells[tagged[0] + 1].source
    assert following.startswith("config = validate_notebook_parameters(globals()")
    assert nb.metadata.kernelspec.name == "hfl-lab"
    # One exception: notebook 05's cell tagged 'plain-keras' shows the owner loading the model
    # with nothing but Keras and numpy, as they will outside the lab.
    plain = [c for c in code if PLAIN_KERAS in c.metadata.get("tags", [])]
    assert len(plain) == (1 if name == "05_model_retrieval" else 0)
    for cell in code:
        tree = ast.parse(cell.source)
        for node in ast.walk(tree):
            if isinstance(node, ast.Import) and cell in plain:
                assert {a.name for a in node.names} <= {"keras", "numpy"}, ast.unparse(node)
            elif isinstance(node, ast.Import):
                pytest.fail(f"{name}: `import {node.names[0].name}`; import from hfl_lab only")
            if isinstance(node, ast.ImportFrom):
                assert node.module == "hfl_lab", f"{name}: imports from {node.module}"
        if "parameters" not in cell.metadata.get("tags", []):
            assert len(cell.source.splitlines()) <= 12, f"{name}: a code cell is not thin"


@pytest.mark.parametrize("name", ALL_NOTEBOOKS)
def test_parameters_cells_hold_annotated_literals(name: str) -> None:
    cell = next(c for c in _notebook(name).cells if "parameters" in c.metadata.get("tags", []))
    tree = ast.parse(cell.source)

    assert tree.body, "the parameters cell sets parameters"
    for statement in tree.body:
        assert isinstance(statement, ast.AnnAssign), ast.unparse(statement)
        value = statement.value
        if isinstance(value, ast.UnaryOp) and isinstance(value.op, ast.USub):
            value = value.operand  # a negative number (07's local_joiners = -1) is a literal
        assert isinstance(value, ast.Constant), ast.unparse(statement)


# ---------------------------------------------------------------------- one headless run


@pytest.mark.slow
def test_run_folder_holds_executed_notebooks_and_a_linked_summary(lab_run: Path) -> None:
    record = json.loads((lab_run / "run.json").read_text())
    summary = (lab_run / "summary.md").read_text()

    assert record["ok"] and [n["status"] for n in record["notebooks"]] == ["ok"] * len(NOTEBOOKS)
    for name in NOTEBOOKS:
        executed = lab_run / "notebooks" / f"{name}.ipynb"
        assert executed.is_file()
        assert _error_outputs(executed) == []
        assert f"notebooks/{name}.ipynb" in summary
    for target in ("loss.png", "metrics.json", "attacks/attestation_matrix.png"):
        assert f"({target})" in summary
    links = [part.split(")")[0] for part in summary.split("](")[1:]]
    assert links and all((lab_run / link).exists() for link in links), links
    assert "<img src='loss.png'" in (lab_run / "summary.html").read_text()


@pytest.mark.slow
def test_preflight_and_coco_plan_on_the_local_backend(lab_run: Path) -> None:
    preflight = json.loads((lab_run / "preflight.json").read_text())
    plan = json.loads((lab_run / "coco_plan.json").read_text())

    assert preflight["ok"] and preflight["backend"] == "local"
    assert "simulated" in preflight["evidence"]
    assert [s["number"] for s in plan["steps"]] == list(range(1, 10))
    for step in plan["steps"]:
        assert step["status"] == "skipped"
        assert "backend=local" in step["detail"]
        assert step["commands"], f"step {step['name']} shows no plan"


@pytest.mark.slow
def test_trust_service_verified_and_volume_opened_with_the_released_key(lab_run: Path) -> None:
    volume = json.loads((lab_run / "trust" / "volume.json").read_text())
    nb = nbformat.read(lab_run / "notebooks" / "02_trust_and_volume.ipynb", as_version=4)
    text = "\n".join(
        o.get("data", {}).get("text/plain", "") for c in nb.cells for o in c.get("outputs", [])
    )

    assert volume["opened_with_released_key"] is True
    assert (lab_run / "trust" / "model.luks").read_bytes()[:6] == b"LUKS\xba\xbe"
    assert "verdict: ACCEPTED (SIMULATED TD" in text  # the table of `hfl-lab attest endpoint`


@pytest.mark.slow
def test_image_reference_values_accept_the_reference_td(lab_run: Path) -> None:
    image = json.loads((lab_run / "image" / "image.json").read_text())
    policy = (lab_run / "image" / "reference_policy.yaml").read_text()

    assert image["reference_accepted"] is True
    assert image["measurements"]["ps0"]["mr_td"] in policy


@pytest.mark.slow
def test_training_wrote_falling_loss_and_plots(lab_run: Path) -> None:
    metrics = json.loads((lab_run / "metrics.json").read_text())
    training = json.loads((lab_run / "training.json").read_text())

    assert metrics["finished"] and metrics["steps_done"] == SMALL["steps"]
    assert training["result"]["final_step"] == SMALL["steps"]
    for role, series in metrics["workers"].items():
        losses = [v for v in series["loss"] if v is not None]
        head, tail = losses[: len(losses) // 2], losses[len(losses) // 2 :]
        assert sum(tail) / len(tail) < sum(head) / len(head), f"{role}: loss did not fall"
    assert metrics["counts"]["attestations"] > 0 and metrics["counts"]["attestations_refused"] == 0
    for png in ("loss.png", "step_time.png", "attestation_matrix.png"):
        width, height = _png_size(lab_run / png)
        assert width > 100 and height > 100


@pytest.mark.slow
def test_retrieved_model_evaluates_like_the_parameter_server_said(lab_run: Path) -> None:
    retrieval = json.loads((lab_run / "retrieval.json").read_text())
    training = json.loads((lab_run / "training.json").read_text())
    sealed = (lab_run / "vault" / "model.luks").is_file()

    assert retrieval["step"] == SMALL["steps"]
    assert retrieval["accuracy"] == pytest.approx(training["result"]["evaluation"]["accuracy"])
    assert retrieval["sealed"] is sealed
    if sealed:
        assert retrieval["opened"] is True
    for png in ("confusion_matrix.png", "sample_predictions.png"):
        assert _png_size(lab_run / png)[0] > 100


@pytest.mark.slow
def test_attack_notebook_shows_every_refusal_with_its_reason(lab_run: Path) -> None:
    attacks = json.loads((lab_run / "attacks" / "attacks.json").read_text())
    board = json.loads((lab_run / "attacks" / "metrics.json").read_text())
    reasons = {a["name"]: a["reason"] for a in attacks["attacks"]}

    # four attacks, and three on the workload image where the image tools are installed
    expected = 4 + (0 if missing_tools() else 3)
    assert attacks["refused"] == expected and all(a["refused"] for a in attacks["attacks"])
    assert "mr_td" in reasons["modified worker code"]
    assert "DEBUG" in reasons["DEBUG TD"]
    assert "key_binding" in reasons["MITM server"]
    assert "PERMISSION_DENIED" in reasons["client without attestation"]
    refused = {(c["verifier"], c["subject"]) for c in board["attestation_matrix"]["cells"]
               if c["verdict"] == "fail"}
    assert len(refused) == expected
    assert ("lab", "trust") in {(c["verifier"], c["subject"])
                                for c in board["attestation_matrix"]["cells"]
                                if c["verdict"] != "fail"}
    assert _png_size(lab_run / "attacks" / "attestation_matrix.png")[0] > 100


# ---------------------------------------------------------------------- on its own, and errors


@pytest.mark.slow
def test_retrieval_notebook_on_its_own_names_the_runs_and_trains_only_when_asked(
    tmp_path: Path,
) -> None:
    import papermill
    from papermill.exceptions import PapermillExecutionError

    from hfl_lab.lab.jupyter import ensure_kernel

    ensure_kernel()
    (tmp_path / "earlier").mkdir()
    (tmp_path / "earlier" / "training.json").write_text("{}")
    # the training 05 starts runs without the workload image (as tests/local_support's
    # quick_config): the pull is the whole-lab run's subject (lab_run, notebook 03), and here it
    # would only add a publish and an interpreter start per participant
    params = {**SMALL, "run_dir": str(tmp_path / "alone"), "workload_image": "off"}

    # a run folder without a training (a typo, say) is an error naming the runs there are
    with pytest.raises(PapermillExecutionError) as missing:
        papermill.execute_notebook(
            str(NOTEBOOK_DIR / "05_model_retrieval.ipynb"), str(tmp_path / "05-missing.ipynb"),
            parameters=params, kernel_name="hfl-lab", cwd=str(NOTEBOOK_DIR), progress_bar=False,
        )
    assert missing.value.ename == "ConfigError"
    assert str(tmp_path / "earlier") in missing.value.evalue
    assert "train_if_missing=True" in missing.value.evalue
    assert not (tmp_path / "alone" / "training.json").exists()

    papermill.execute_notebook(
        str(NOTEBOOK_DIR / "05_model_retrieval.ipynb"), str(tmp_path / "05.ipynb"),
        parameters={**params, "train_if_missing": True}, kernel_name="hfl-lab",
        cwd=str(NOTEBOOK_DIR), progress_bar=False,
    )

    assert json.loads((tmp_path / "alone" / "training.json").read_text())["result"]
    assert json.loads((tmp_path / "alone" / "retrieval.json").read_text())["step"] == 8
    # the run it trained is the session's current run now
    current = json.loads((tmp_path / "current_run.json").read_text())
    assert current == {"run_dir": str((tmp_path / "alone").resolve())}


def test_a_lab_error_is_one_sentence_with_its_fix_and_fails_the_run(tmp_path: Path) -> None:
    import papermill
    from papermill.exceptions import PapermillExecutionError

    from hfl_lab.lab.jupyter import ensure_kernel

    ensure_kernel()
    out = tmp_path / "04.ipynb"

    with pytest.raises(PapermillExecutionError) as failed:
        papermill.execute_notebook(
            str(NOTEBOOK_DIR / "04_federated_training.ipynb"), str(out),
            parameters={"workers": -1, "run_dir": str(tmp_path / "run")},
            kernel_name="hfl-lab", cwd=str(NOTEBOOK_DIR), progress_bar=False,
        )

    error = failed.value
    assert error.ename == "ConfigError"
    assert "workers" in error.evalue and "Fix:" in error.evalue
    assert len(error.traceback) == 1 and "\n" not in error.evalue
    nb = nbformat.read(out, as_version=4)
    outputs = [o for c in nb.cells for o in c.get("outputs", [])]
    errors = [o for o in outputs if o.output_type == "error"]
    # one box (the cell's error output) with the message and, on its own line, the fix; the
    # same sentence is not shown a second time in another output
    assert len(errors) == 1 and "Fix:" in errors[0].traceback[0].split("\n")[1]
    assert not [o for o in outputs if o.output_type == "display_data"
                and "workers" in str(o.data) and "Fix" in str(o.data)]
