"""``hfl-lab host``: host a cross-silo run: the trust service and ps0 on a reachable address,
one join link per worker slot, and the participants as they join, attest, train and leave."""

from __future__ import annotations

import argparse
import signal
import sys
from types import FrameType

from hfl_lab.cli import PROG, ExitCode
from hfl_lab.cli.run import add_config_options, config_from_args

__all__ = ["register"]


def register(parser: argparse.ArgumentParser) -> None:
    add_config_options(parser)
    parser.add_argument(
        "--address", required=True, metavar="IPV4",
        help="this machine's address on the joiners' network (the join links carry it), "
        "e.g. 192.168.1.20",
    )
    parser.add_argument("--slots", type=int, default=2, metavar="N",
                        help="worker slots, one join link each (default 2)")
    parser.add_argument(
        "--quorum", type=int, default=None, metavar="K",
        help="sync/fedavg: contributions per step, from the workers live now (default: all "
        "of them; a worker that leaves stops counting once its session lease lapses)",
    )
    parser.add_argument(
        "--min-workers", type=int, default=1, metavar="M",
        help="no step completes while fewer than M workers are live: training waits for M "
        "attendees and holds when too many left (default 1: never holds)")
    parser.add_argument("--link-ttl", type=float, default=3600.0, metavar="SECONDS",
                        help="how long the join links are valid (default 3600)")
    parser.set_defaults(handler=_cmd_host)


def _stop_on_sigterm(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt


def _cmd_host(args: argparse.Namespace) -> int:
    # lazy: the lab layer loads gRPC and the vault; `hfl-lab --help` registers this module
    from hfl_lab.lab.workshop import HostedRun

    config = config_from_args(args)
    signal.signal(signal.SIGTERM, _stop_on_sigterm)
    with HostedRun(config, address=args.address, slots=args.slots, quorum=args.quorum,
                   min_workers=args.min_workers, link_ttl_s=args.link_ttl) as run:
        print(f"{PROG} host: starting the trust service and ps0 on {args.address} "
              f"({run.config.describe()})", file=sys.stderr)
        links = run.start()
        print(f"{PROG} host: trust service {run.backend.trust_address}, ps0 "
              f"{run.backend.ps_address}; give each attendee one line:", file=sys.stderr)
        for link in links:
            print(f"{link.slot}  {link.encode()}", flush=True)
        shown = -1  # the last tenth of the run whose step was printed
        try:
            for event, line in run.events():
                if line is not None:
                    print(f"{PROG} host: {line}", file=sys.stderr, flush=True)
                elif event.kind == "progress" and event.source == "ps0":
                    done, total = int(event.data.get("done", 0)), int(event.data.get("total", 0))
                    if total and done * 10 // total > shown:
                        shown = done * 10 // total
                        print(f"{PROG} host: step {done}/{total}", file=sys.stderr, flush=True)
                elif event.kind == "lifecycle" and event.source in ("trust", "ps0"):
                    print(f"{PROG} host: {event.source} {event.data.get('state')}: "
                          f"{event.data.get('detail', '')}", file=sys.stderr, flush=True)
        except KeyboardInterrupt:
            print(f"{PROG} host: stopping", file=sys.stderr)
            print(run.board.table().to_text(), file=sys.stderr)
            return ExitCode.SUCCESS
        print(run.board.table().to_text(), file=sys.stderr, flush=True)
        result = run.backend.result
    if result is None:
        print(f"{PROG}: error: the run ended without ps0's result. Fix: read the logs in "
              f"{run.backend.log_dir}.", file=sys.stderr)
        return ExitCode.FAILED
    print(f"{PROG} host: done at step {result.final_step} in {result.seconds:.0f} s",
          file=sys.stderr)
    return ExitCode.SUCCESS
