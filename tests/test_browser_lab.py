"""A real browser on JupyterLab: notebook 04 runs, and its live dashboard shows and updates.

JupyterLab is started by the test; Debian's chromium (/usr/bin/chromium, installed by
`make system-deps`) is driven by Playwright pointed at that binary; no browser is downloaded.
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import socket
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nbformat
import pytest

REPO = Path(__file__).resolve().parents[1]
CHROMIUM = Path("/usr/bin/chromium")
NOTEBOOK = "04_federated_training"
STEPS = 12
PARAMS = {"depth": 8, "steps": STEPS, "batch_size": 16, "eval_every": 6, "checkpoint_every": 6,
          "vault_size_mb": 8}
RUN_TIMEOUT_S = 300


def _require_browser() -> Any:
    if not CHROMIUM.is_file():
        pytest.skip(
            f"{CHROMIUM} is not installed, so there is no browser to drive "
            "(`make system-deps` installs it: apt-get install chromium)"
        )
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.skip("the playwright package is not installed (make install; requirements.txt)")
    return sync_playwright


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Lab:
    url: str
    token: str
    folder: Path
    run_dir: Path


@pytest.fixture()
def jupyter_lab(tmp_path: Path) -> Iterator[Lab]:
    """JupyterLab serving a copy of notebook 04 whose parameters are small (as papermill would)."""
    import papermill

    from hfl_lab.lab.jupyter import NOTEBOOK_DIR, ensure_kernel, jupyter_lab_command

    _require_browser()  # skip before starting anything when there is no browser
    ensure_kernel()
    folder, run_dir = tmp_path / "notebooks", tmp_path / "run"
    folder.mkdir()
    papermill.execute_notebook(  # parameterized as papermill does it, not executed
        str(NOTEBOOK_DIR / f"{NOTEBOOK}.ipynb"), str(folder / f"{NOTEBOOK}.ipynb"),
        parameters={**PARAMS, "run_dir": str(run_dir)}, prepare_only=True, kernel_name="hfl-lab",
    )
    settings = tmp_path / "settings"
    for name, values in {  # start the notebook's kernel without asking; no news toast
        "notebook-extension/tracker": '{"autoStartDefaultKernel": true}',
        "apputils-extension/notification": '{"fetchNews": "false"}',
    }.items():
        path = settings / "@jupyterlab" / f"{name}.jupyterlab-settings"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(values)
    port, token = _free_port(), secrets.token_hex(16)
    env = {k: v for k, v in os.environ.items() if k != "MPLBACKEND"}  # a front end is watching
    env.update(HFL_LAB_FRONTEND="1", KERAS_BACKEND="tensorflow",
               JUPYTER_CONFIG_DIR=str(tmp_path / "cfg"),
               JUPYTERLAB_SETTINGS_DIR=str(settings),
               JUPYTERLAB_WORKSPACES_DIR=str(tmp_path / "workspaces"))
    log = (tmp_path / "jupyter.log").open("w")
    server = subprocess.Popen(
        jupyter_lab_command(notebook_dir=folder, port=port, token=token), cwd=folder, env=env,
        stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 90
        while True:
            try:
                with urllib.request.urlopen(f"{url}/api/status?token={token}", timeout=2):
                    break
            except OSError:
                if server.poll() is not None or time.monotonic() > deadline:
                    log_text = (tmp_path / "jupyter.log").read_text()
                    pytest.fail(f"JupyterLab did not start:\n{log_text}")
                time.sleep(0.5)
        yield Lab(url, token, folder, run_dir)
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait(timeout=10)
        log.close()


def _state(page: Any) -> dict[str, Any]:
    """What the dashboard shows right now, read from the DOM."""
    result: dict[str, Any] = page.evaluate(
        """() => {
        const images = [...document.querySelectorAll('.jp-OutputArea-output img')]
            .map(i => i.getAttribute('src') || '');
        const htmls = [...document.querySelectorAll('.widget-html-content')]
            .map(h => h.innerHTML);
        const matrix = htmls.find(h => h.includes('verifier \\\\ subject')
                                       || h.includes('no attestation yet')) || '';
        const labels = [...document.querySelectorAll('.widget-label')].map(l => l.textContent);
        const bars = [...document.querySelectorAll('.widget-hprogress .progress-bar')]
            .map(b => b.style.width);
        const errors = [...document.querySelectorAll(
            '.jp-OutputArea-output[data-mime-type="application/vnd.jupyter.stderr"]')]
            .map(e => e.textContent).filter(t => /Traceback|Error/.test(t));
        const text = document.querySelector('.jp-Notebook')?.textContent || '';
        const kernel = document.querySelector('.jp-Notebook-ExecutionIndicator')
            ?.getAttribute('data-status') || '';
        return {images, matrix, labels, errors, bars, kernel,
                done: text.includes('federated training: result')};
    }"""
    )
    return result


def _server_kernel_state(lab: Lab) -> str:
    """The kernel's execution state as the Jupyter server tracks it (what the status bar and
    every other client are told)."""
    with urllib.request.urlopen(f"{lab.url}/api/kernels?token={lab.token}", timeout=5) as r:
        kernels = json.loads(r.read())
    return ",".join(sorted(str(k.get("execution_state")) for k in kernels))


def _training(label: str) -> bool:
    """A progress label of a training under way: "N/12 steps" with 0 < N < 12."""
    done, _, rest = label.partition("/")
    return done.strip().isdigit() and 0 < int(done) < STEPS and rest.startswith(f"{STEPS} steps")


@pytest.mark.slow
def test_notebook_04_runs_in_jupyterlab_with_a_live_dashboard(jupyter_lab: Lab) -> None:
    sync_playwright = _require_browser()
    args = ["--no-sandbox"] if hasattr(os, "geteuid") and os.geteuid() == 0 else []
    loss_frames: set[str] = set()
    matrices: set[str] = set()
    kernel_while_training: list[str] = []
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=args)
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        page.goto(f"{jupyter_lab.url}/lab/tree/{NOTEBOOK}.ipynb?token={jupyter_lab.token}")
        page.wait_for_selector(".jp-Notebook .jp-Cell", timeout=60_000)
        page.wait_for_selector(".jp-Notebook-ExecutionIndicator[data-status='idle'], "
                               ".jp-KernelStatus", timeout=60_000)

        page.wait_for_timeout(1000)
        dialog = page.locator(".jp-Dialog button.jp-mod-accept")
        if dialog.count():  # "Select Kernel" on JupyterLab versions that still ask
            dialog.first.click()
        page.click("li.lm-MenuBar-item:has-text('Run')")
        page.click("li.lm-Menu-item:has-text('Run All Cells')")
        deadline = time.monotonic() + RUN_TIMEOUT_S
        state = _state(page)
        while not state["done"] and not state["errors"] and time.monotonic() < deadline:
            if state["images"]:
                loss_frames.add(state["images"][0])
            if state["matrix"]:
                matrices.add(state["matrix"])
            if any(_training(label) for label in state["labels"]):
                kernel_while_training.append(_server_kernel_state(jupyter_lab))
            page.wait_for_timeout(250)
            state = _state(page)
        page.wait_for_timeout(1000)
        state = _state(page)
        jupyter_lab.run_dir.mkdir(parents=True, exist_ok=True)
        shot = jupyter_lab.run_dir / "jupyterlab_04_federated_training.png"
        page.screenshot(path=str(shot), full_page=True)
        page.keyboard.press("Control+s")
        page.wait_for_timeout(1500)
        browser.close()

    assert not state["errors"], state["errors"]
    assert state["done"], "the notebook did not finish"
    assert len(state["images"]) >= 2, "the loss and step-time figures are shown"
    assert len(loss_frames) >= 2, "the live loss figure never updated"
    assert len(matrices) >= 2 and "SIMULATED PASS" in state["matrix"], "the matrix never updated"
    assert any(f"{STEPS}/{STEPS} steps" in label for label in state["labels"]), state["labels"]
    assert state["bars"] == ["100%"], f"the progress bar stopped at {state['bars']}"
    # the kernel reads busy while the training cell runs (ipykernel 7's own idle statuses for
    # other messages used to make JupyterLab show "Idle" throughout)
    busy = kernel_while_training.count("busy")
    assert kernel_while_training and busy >= len(kernel_while_training) / 2, (
        kernel_while_training)
    saved = nbformat.read(jupyter_lab.folder / f"{NOTEBOOK}.ipynb", as_version=4)
    outputs = [o for c in saved.cells for o in c.get("outputs", [])]
    assert outputs and not [o for o in outputs if o.output_type == "error"]
    assert shot.stat().st_size > 10_000
    assert (jupyter_lab.run_dir / "metrics.json").is_file()
