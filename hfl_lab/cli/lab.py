"""``hfl-lab lab``: JupyterLab on the lab's notebooks, with the lab's kernel registered."""

from __future__ import annotations

import argparse
import subprocess
import sys

from hfl_lab.cli import PROG, ExitCode
from hfl_lab.owner import ensure_owner_secret

__all__ = ["register"]


def _cmd_lab(args: argparse.Namespace) -> int:
    # lazy: hfl_lab.lab loads matplotlib, gRPC and the vault; `hfl-lab --help` registers this module
    from hfl_lab.lab.jupyter import KERNEL_NAME, NOTEBOOK_DIR, ensure_kernel, jupyter_lab_command

    where = ensure_kernel(force=args.install_kernel)
    if args.install_kernel:
        print(f"{PROG} lab: kernel {KERNEL_NAME!r} ({sys.executable}) registered in {where}")
        return ExitCode.SUCCESS
    ensure_owner_secret()  # every kernel of this JupyterLab shares the session's owner secret
    argv = jupyter_lab_command(port=args.port, ip=args.ip, open_browser=args.browser)
    print(f"{PROG} lab: JupyterLab on {NOTEBOOK_DIR} at http://{args.ip}:{args.port}/lab "
          "(Ctrl-C stops it)", file=sys.stderr)
    return subprocess.call(argv)


def register(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--port", type=int, default=8888, help="port (default 8888)")
    parser.add_argument("--ip", default="127.0.0.1", help="address to listen on (default loopback)")
    parser.add_argument("--browser", action="store_true", help="open a browser window")
    parser.add_argument(
        "--install-kernel",
        action="store_true",
        help="only register this environment as the 'hfl-lab' Jupyter kernel, then exit",
    )
    parser.set_defaults(handler=_cmd_lab)
