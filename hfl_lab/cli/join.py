"""``hfl-lab join <link>``: join a hosted run from this machine with one worker TD: verify the
host's trust service against the link, enroll, train this site's shard, leave on Ctrl-C."""

from __future__ import annotations

import argparse
import signal
import sys
from pathlib import Path
from types import FrameType

from hfl_lab.cli import PROG, ExitCode

__all__ = ["register"]


def register(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("link", help="the join link the host printed (hfl-join:...)")
    parser.add_argument("--data", metavar="DIR", default=None,
                        help="this site's CIFAR-10 folder (default: the host's data_path)")
    parser.add_argument("--run-dir", metavar="DIR", type=Path, default=None,
                        help="where the run's documents and the worker's log go "
                        "(default: runs/join-<slot>)")
    parser.add_argument("--leave-after", type=int, default=None, metavar="N",
                        help="leave the run after N steps of this worker, as Ctrl-C does "
                        "(an attendee who has to go; default: stay to the end)")
    parser.set_defaults(handler=_cmd_join)


def _stop_on_sigterm(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt


def _cmd_join(args: argparse.Namespace) -> int:
    # lazy: the lab layer loads gRPC and the attestation stack
    from hfl_lab._exceptions import ConfigError
    from hfl_lab.config.join_link import JoinLink
    from hfl_lab.lab.joining import join_run

    if args.leave_after is not None and args.leave_after < 1:
        raise ConfigError(f"--leave-after must be at least 1 step, got {args.leave_after}.",
                          fix="leave it out to stay to the end of the run.")
    link = JoinLink.parse(args.link)
    run_dir = args.run_dir or Path("runs") / f"join-{link.slot}"
    signal.signal(signal.SIGTERM, _stop_on_sigterm)
    print(f"{PROG} join: verifying the host's trust service at {link.trust_address} against "
          "the link", file=sys.stderr)
    worker = join_run(args.link, run_dir=run_dir, data_path=args.data)
    print(f"{PROG} join: host verified, enrolled as {link.slot}; worker log "
          f"{worker.log_dir / (link.slot + '.log')}", file=sys.stderr, flush=True)
    steps = 0
    try:
        for event in worker.events():
            if event.kind == "metrics":
                steps += 1
                print(f"{link.slot} step {event.data.get('step')}: loss "
                      f"{float(event.data.get('loss', 0.0)):.4f}", flush=True)
                if args.leave_after is not None and steps >= args.leave_after:
                    raise KeyboardInterrupt  # the same way out as Ctrl-C
            elif event.kind in ("lifecycle", "attestation"):
                detail = event.data.get("detail") or event.data.get("reason") or ""
                state = event.data.get("state") or (
                    "accepted" if event.data.get("accepted") else "refused")
                pid = f" (pid {event.data['pid']})" if event.data.get("pid") else ""
                print(f"{PROG} join: {event.source} {state}{pid}: {detail}", file=sys.stderr,
                      flush=True)
    except KeyboardInterrupt:
        print(f"{PROG} join: leaving the run after {steps} steps (the host stops counting "
              "this worker at once)", file=sys.stderr, flush=True)
        worker.stop()
        return ExitCode.SUCCESS
    worker.stop()
    code = worker.process.returncode
    if code != 0:
        print(f"{PROG}: error: the worker exited with code {code}. Fix: read "
              f"{worker.log_dir / (link.slot + '.log')}; its last line names the cause.",
              file=sys.stderr)
        return ExitCode.FAILED
    return ExitCode.SUCCESS
