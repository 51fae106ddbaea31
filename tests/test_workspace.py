"""`hfl-lab lab` serves an attendee's workspace: copies of the notebooks and the run folders they
write, so the file browser reaches every log, and the tracked notebooks stay untouched."""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from hfl_lab._ports import free_listen_port
from hfl_lab.lab.jupyter import NOTEBOOK_DIR, prepare_workspace

REPO = Path(__file__).resolve().parents[1]


def test_the_workspace_copies_the_notebooks_keeps_edits_and_starts_fresh(tmp_path: Path) -> None:
    root = tmp_path / "workspace"
    tracked = sorted(p.name for p in NOTEBOOK_DIR.glob("*.ipynb"))

    first = prepare_workspace(root)
    assert list(first.copied) == tracked and not first.kept
    assert (root / "runs").is_dir()
    edited = root / "notebooks" / tracked[0]
    edited.write_text('{"edited": true}')

    again = prepare_workspace(root)
    assert not again.copied and list(again.kept) == tracked
    assert json.loads(edited.read_text()) == {"edited": True}  # the attendee's work is kept

    (root / "runs" / "lab").mkdir()
    fresh = prepare_workspace(root, fresh=True)
    assert list(fresh.copied) == tracked
    assert edited.read_bytes() == (NOTEBOOK_DIR / tracked[0]).read_bytes()
    assert (root / "runs" / "lab").is_dir()  # run folders (trained models) survive --fresh


def _get(url: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=60) as reply:
            return reply.status, reply.read()
    except urllib.error.HTTPError as e:
        return e.code, b""
    except OSError:  # URLError, or a reply that did not come in time (not wrapped by urllib)
        return 0, b""  # not listening, or not answering, yet


@pytest.mark.slow
def test_hfl_lab_lab_prints_a_url_with_its_token_and_serves_the_run_folders(
    tmp_path: Path,
) -> None:
    root = tmp_path / "workspace"
    log = root / "runs" / "lab" / "logs" / "ps0.log"
    log.parent.mkdir(parents=True)
    log.write_text("ps0: attested\n")
    port = free_listen_port()
    env = {**os.environ, "KERAS_BACKEND": "tensorflow", "JUPYTER_CONFIG_DIR": str(tmp_path / "cfg"),
           "JUPYTER_RUNTIME_DIR": str(tmp_path / "rt")}
    server = subprocess.Popen(
        [sys.executable, "-m", "hfl_lab.cli", "lab", "--workspace", str(root), "--port",
         str(port)], cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True, start_new_session=True,
    )
    try:
        assert server.stdout is not None
        url = server.stdout.readline().strip()
        assert url.startswith(f"http://127.0.0.1:{port}/lab/tree/notebooks/00_preflight.ipynb"
                              "?token=")
        token = url.rpartition("token=")[2]
        assert len(token) >= 32
        api = f"http://127.0.0.1:{port}/api/contents/runs/lab/logs/ps0.log"
        deadline = time.monotonic() + 120
        status, body = 0, b""
        while time.monotonic() < deadline:
            status, body = _get(f"{api}?token={token}")
            if status == 200:
                break
            assert server.poll() is None, server.stderr.read() if server.stderr else ""
            time.sleep(0.5)
        assert status == 200, status
        assert json.loads(body)["content"] == "ps0: attested\n"
        assert _get(api)[0] in (401, 403)  # no token, no file
        assert sorted(p.name for p in (root / "notebooks").glob("*.ipynb")) == sorted(
            p.name for p in NOTEBOOK_DIR.glob("*.ipynb"))
        # the token is in the server's environment, not on its command line
        children = Path(f"/proc/{server.pid}/task/{server.pid}/children").read_text().split()
        assert children
        for pid in [server.pid, *map(int, children)]:
            assert token.encode() not in Path(f"/proc/{pid}/cmdline").read_bytes()
    finally:
        jupyter = [int(p) for p in Path(f"/proc/{server.pid}/task/{server.pid}/children")
                   .read_text().split()] if server.poll() is None else []
        server.terminate()
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait()
    # stopping `hfl-lab lab` stopped its JupyterLab too (it used to serve on, orphaned)
    deadline = time.monotonic() + 30
    while any(Path(f"/proc/{pid}").exists() for pid in jupyter) and time.monotonic() < deadline:
        time.sleep(0.2)
    alive = [pid for pid in jupyter if Path(f"/proc/{pid}").exists()]
    for pid in alive:
        os.kill(pid, signal.SIGKILL)
    assert jupyter and not alive


def test_a_stop_while_jupyterlab_starts_stops_it_too(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`hfl-lab lab` stopped (SIGTERM) while it is starting JupyterLab: the server it started
    must not outlive it. The stop is sent from inside the server's start (after the process
    exists, before the command holds it): the handler was installed only after that, so such a
    stop killed the command and left JupyterLab serving the workspace."""
    from hfl_lab.cli import lab as lab_cli
    from hfl_lab.lab import jupyter

    servers: list[subprocess.Popen[bytes]] = []

    def starting(argv: list[str], **kwargs: object) -> subprocess.Popen[bytes]:
        server = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
        servers.append(server)
        os.kill(os.getpid(), signal.SIGTERM)  # handled at the next bytecode, still in here
        return server

    monkeypatch.setattr(jupyter, "ensure_kernel", lambda force=False: str(tmp_path))
    monkeypatch.setattr(lab_cli, "ensure_owner_secret", lambda: None)
    monkeypatch.setattr(lab_cli, "subprocess", type(
        "Subprocess", (), {"Popen": staticmethod(starting),
                           "TimeoutExpired": subprocess.TimeoutExpired}))
    args = argparse.Namespace(install_kernel=False, workspace=str(tmp_path / "workspace"),
                              fresh=False, port=8888, ip="127.0.0.1", browser=False)
    unhandled: list[int] = []

    def not_the_commands(signum: int, frame: object) -> None:
        unhandled.append(signum)  # the stop reached no handler of the command's
        for server in servers:
            server.kill()

    before = signal.signal(signal.SIGTERM, not_the_commands)
    try:
        code = lab_cli._cmd_lab(args)
    finally:
        signal.signal(signal.SIGTERM, before)
        for server in servers:
            if server.poll() is None:
                server.kill()
                server.wait()
    assert len(servers) == 1 and unhandled == []
    assert code == -signal.SIGTERM, code  # the command waited for the server it stopped
