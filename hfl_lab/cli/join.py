"""``hfl-lab join <link>``: join a hosted run from this machine with one worker TD: verify the
host's trust service against the link, enroll, train this site's shard, leave on Ctrl-C."""

from __future__ import annotations

import argparse
import signal
import sys
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING

from hfl_lab.cli import PROG, ExitCode

if TYPE_CHECKING:
    from hfl_lab.config.join_link import JoinLink

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
    k8s = parser.add_argument_group(
        "a worker pod in this site's cluster (instead of a process here)")
    k8s.add_argument("--kubernetes", metavar="DIR", type=Path, default=None,
                     help="render the remote worker's kustomization into DIR (and the host "
                     "cluster's ingress rules into DIR/host-ingress) instead of starting a worker")
    k8s.add_argument("--namespace", default="hfl-remote", help="this site's namespace")
    k8s.add_argument("--image", default=None,
                     help="the participant image, built from the host's checkout")
    k8s.add_argument("--data-source", default="pvc:cifar10", metavar="SOURCE",
                     help="this site's data: pvc:<claim> or hostpath:/path (default pvc:cifar10)")
    k8s.add_argument("--ingress-ip", default=None, metavar="IPV4",
                     help="the host cluster's ingress address, for the run's host names")
    k8s.add_argument("--apply", action="store_true",
                     help="also create the worker's bootstrap Secret (from memory) and its "
                     "objects through the Kubernetes API")
    k8s.add_argument("--kubeconfig", default=None, help="this site's kubeconfig (with --apply)")
    k8s.add_argument("--context", default=None, help="its context (with --apply)")
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
    if args.kubernetes is not None:
        return _join_kubernetes(args, link)
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


def _join_kubernetes(args: argparse.Namespace, link: JoinLink) -> int:
    from hfl_lab.lab.joining import RemoteWorkerSite, join_kubernetes

    site = RemoteWorkerSite(namespace=args.namespace, data_source=args.data_source,
                            ingress_ip=args.ingress_ip,
                            **({"image": args.image} if args.image else {}))
    print(f"{PROG} join: verifying the host's trust service at {link.trust_address} against "
          "the link", file=sys.stderr)
    remote = join_kubernetes(args.link, args.kubernetes, site, apply=args.apply,
                             kubeconfig=args.kubeconfig, context=args.context)
    print(f"{PROG} join: host verified, enrolled as {link.slot}; its pod's kustomization is "
          f"{remote.folder}", file=sys.stderr)
    for route in remote.routes:
        print(f"{PROG} join: {route.participant} at {route.address}, server names (SNI) "
              f"{', '.join(route.server_names)}", file=sys.stderr)
    for ip, names in remote.host_aliases.items():
        print(f"{PROG} join: the pod resolves {', '.join(names)} to the host's ingress {ip}",
              file=sys.stderr)
    print(f"{PROG} join: the host cluster's ingress must route those names with TLS "
          f"passthrough: {remote.folder / 'host-ingress'} (for the host's admin)",
          file=sys.stderr)
    if args.apply:
        print(f"{PROG} join: created the bootstrap Secret and the worker in namespace "
              f"{remote.namespace}", file=sys.stderr)
    else:
        print(f"{PROG} join: the bootstrap Secret (the simulated platform's keys) is in no "
              "file: run again with --apply to create it and the worker through the API",
              file=sys.stderr)
    return ExitCode.SUCCESS
