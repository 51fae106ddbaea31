"""``hfl-lab lab``: JupyterLab on the attendee's workspace (copies of the lab's notebooks and
their run folders), with the lab's kernel registered."""

from __future__ import annotations

import argparse
import os
import secrets
import signal
import subprocess
import sys
from pathlib import Path

from hfl_lab.cli import PROG, ExitCode
from hfl_lab.owner import ensure_owner_secret

__all__ = ["register"]


def _cmd_lab(args: argparse.Namespace) -> int:
    # lazy: hfl_lab.lab loads matplotlib, gRPC and the vault; `hfl-lab --help` registers this module
    from hfl_lab.lab.jupyter import (
        KERNEL_NAME,
        WORKSPACE_DIR,
        ensure_kernel,
        jupyter_lab_command,
        prepare_workspace,
    )

    where = ensure_kernel(force=args.install_kernel)
    if args.install_kernel:
        print(f"{PROG} lab: kernel {KERNEL_NAME!r} ({sys.executable}) registered in {where}")
        return ExitCode.SUCCESS
    space = prepare_workspace(Path(args.workspace or WORKSPACE_DIR), fresh=args.fresh)
    ensure_owner_secret()  # every kernel of this JupyterLab shares the session's owner secret
    token = secrets.token_hex(24)  # this server's login; printed below, nowhere else
    argv = jupyter_lab_command(notebook_dir=space.root, port=args.port, ip=args.ip,
                               open_browser=args.browser)
    state = (f"{len(space.copied)} notebook(s) copied in"
             + (f", {len(space.kept)} kept as you left them (--fresh starts again)"
                if space.kept else ""))
    print(f"{PROG} lab: your workspace is {space.root}: notebooks/ ({state}) and runs/ (your "
          "run folders: plots, logs, metrics). Open notebooks/00_preflight.ipynb, then Run All "
          "in each notebook in order. Ctrl-C stops JupyterLab.", file=sys.stderr)
    print(f"http://{args.ip}:{args.port}/lab/tree/notebooks/00_preflight.ipynb?token={token}",
          flush=True)
    # A stop of this command stops JupyterLab too: it must not outlive us, serving the
    # workspace. The handler is in place before the server starts; a stop that comes while
    # it starts (before `server` is bound) is acted on as soon as it is.
    started: list[subprocess.Popen[bytes]] = []
    stopped: list[int] = []

    def on_stop(signum: int, frame: object) -> None:
        stopped.append(signum)
        for process in started:
            process.terminate()

    signal.signal(signal.SIGTERM, on_stop)
    if stopped:
        return 128 + signal.SIGTERM
    # in the server's environment, not its command line (which every local user can list)
    server = subprocess.Popen(argv, env={**os.environ, "JUPYTER_TOKEN": token})
    started.append(server)
    if stopped:
        server.terminate()
    try:
        return server.wait()
    except KeyboardInterrupt:
        server.terminate()
        try:
            return server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            server.kill()
            return server.wait()


def register(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--port", type=int, default=8888, help="port (default 8888)")
    parser.add_argument("--ip", default="127.0.0.1", help="address to listen on (default loopback)")
    parser.add_argument("--browser", action="store_true", help="open a browser window")
    parser.add_argument("--workspace", default=None,
                        help="the folder to serve (default: workspace/ in the lab's checkout)")
    parser.add_argument("--fresh", action="store_true",
                        help="copy the tracked notebooks again over your edited ones (run "
                        "folders are kept)")
    parser.add_argument(
        "--install-kernel",
        action="store_true",
        help="only register this environment as the 'hfl-lab' Jupyter kernel, then exit",
    )
    parser.set_defaults(handler=_cmd_lab)
