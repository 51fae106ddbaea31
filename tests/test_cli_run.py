"""`hfl-lab run | check | lab`: parameters validated up front, failures named, preflight only."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from hfl_lab import ConfigError
from hfl_lab.cli import main
from hfl_lab.config import LabConfig
from hfl_lab.lab.sequence import NOTEBOOKS, notebook_parameters, resolve_notebooks

REPO = Path(__file__).resolve().parents[1]


def _env() -> dict[str, str]:
    return {**os.environ, "KERAS_BACKEND": "tensorflow", "MPLBACKEND": "agg"}


@pytest.mark.parametrize(
    ("pair", "name"),
    [("workers=-1", "workers"), ("backend=foo", "backend"), ("wokers=2", "wokers"),
     ("depth=9", "depth"), ("steps=many", "steps")],
)
def test_a_wrong_parameter_exits_non_zero_with_one_line_naming_it(
    pair: str, name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.chdir(tmp_path)

    code = main(["run", "--profile", "quick", "-p", pair])

    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert len(err) == 1 and err[0].startswith("hfl-lab: error: ")
    assert name in err[0] and "Fix:" in err[0]
    assert not (tmp_path / "runs").exists(), "nothing may run before the parameters are valid"


def test_the_installed_command_exits_2_on_a_wrong_parameter(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "hfl_lab.cli", "run", "-p", "workers=-1"],
        cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=120, check=False,
    )

    assert done.returncode == 2
    assert done.stderr.count("\n") == 1 and "workers" in done.stderr
    assert "Traceback" not in done.stderr


@pytest.mark.slow
def test_a_failing_notebook_is_named_with_its_cell_and_the_rest_is_skipped(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    argv = [sys.executable, "-m", "hfl_lab.cli", "run", "-q", "-p", f"run_dir={run_dir}",
            "-p", f"data_path={tmp_path / 'no-cifar-here'}"]

    done = subprocess.run(argv, cwd=REPO, env=_env(), capture_output=True, text=True,
                          timeout=600, check=False)

    record = json.loads((run_dir / "run.json").read_text())
    last = done.stderr.strip().splitlines()
    assert done.returncode == 4
    errors = [line for line in last if line.startswith("hfl-lab: error: ")]
    assert len(errors) == 1
    assert "notebook 00_preflight failed in cell " in errors[0] and "BackendError" in errors[0]
    assert "data" in errors[0]
    assert [n["status"] for n in record["notebooks"]] == ["failed"] + ["skipped"] * 6
    assert "FAILED in cell" in (run_dir / "summary.md").read_text()
    assert (run_dir / "notebooks" / "00_preflight.ipynb").is_file()


def test_every_notebook_gets_the_whole_validated_configuration(tmp_path: Path) -> None:
    config = LabConfig.profile("full", run_dir=str(tmp_path))

    params = notebook_parameters(config)

    assert params["profile"] == "full" and "profile_name" not in params
    assert params["depth"] == 56 and params["epochs"] == 182
    assert LabConfig.from_dict(params) == config  # what validate_notebook_parameters rebuilds


def test_notebooks_are_chosen_by_number_or_name() -> None:
    assert resolve_notebooks(None) == list(NOTEBOOKS)
    assert resolve_notebooks(["04", "00_preflight"]) == ["00_preflight", "04_federated_training"]
    with pytest.raises(ConfigError, match="no notebook '9'"):
        resolve_notebooks(["9"])


def test_list_parameters(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["run", "--list-parameters"]) == 0
    out = capsys.readouterr().out
    assert "workers (int, default 2)" in out and "backend (str" in out


def test_check_is_the_preflight_only(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(tmp_path)

    ready = main(["check"])
    out = capsys.readouterr().out
    not_ready = main(["check", "-p", f"data_path={tmp_path / 'missing'}"])
    err = capsys.readouterr().err.strip().splitlines()

    assert ready == 0 and "READY" in out and "evidence provider" in out
    assert not_ready == 4
    assert len(err) == 1 and "data" in err[0] and "Fix:" in err[0]
    assert not (tmp_path / "runs").exists(), "check starts and writes nothing"


def test_check_as_json(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["check", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["ok"] and report["backend"] == "local"
    assert {"TDX", "backend"} <= {c["section"] for c in report["checks"]}


def test_lab_registers_the_kernel_of_this_environment(capsys: pytest.CaptureFixture[str]) -> None:
    from jupyter_client.kernelspec import KernelSpecManager

    assert main(["lab", "--install-kernel"]) == 0

    spec = KernelSpecManager().get_kernel_spec("hfl-lab")
    assert Path(spec.argv[0]) == Path(sys.executable)
    assert spec.env.get("KERAS_BACKEND") == "tensorflow"
    assert "registered" in capsys.readouterr().out


def test_lab_command_serves_the_notebooks() -> None:
    from hfl_lab.lab.jupyter import NOTEBOOK_DIR, jupyter_lab_command

    argv = jupyter_lab_command(port=9999, token="t")

    assert argv[:3] == [sys.executable, "-m", "jupyterlab"]
    assert f"--ServerApp.root_dir={NOTEBOOK_DIR}" in argv and "--ServerApp.port=9999" in argv
    assert "--MappingKernelManager.default_kernel_name=hfl-lab" in argv
