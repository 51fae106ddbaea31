"""``hfl-lab check``: the preflight only (environment, TDX, cluster, backend), nothing started."""

from __future__ import annotations

import argparse
import json

from hfl_lab.cli import ExitCode
from hfl_lab.cli.run import add_config_options, config_from_args
from hfl_lab.config import LabConfig

__all__ = ["register"]


def _cmd_check(args: argparse.Namespace) -> int:
    # lazy: hfl_lab.lab loads matplotlib, gRPC and the vault; `hfl-lab --help` registers this module
    from hfl_lab.lab.preflight import run_preflight

    if args.list_parameters:
        print(LabConfig.help_text())
        return ExitCode.SUCCESS
    report = run_preflight(config_from_args(args))
    print(json.dumps(report.to_dict(), indent=2) if args.json else report.to_text())
    report.raise_if_failed()  # one line on stderr naming the failed checks, exit 4
    return ExitCode.SUCCESS


def register(parser: argparse.ArgumentParser) -> None:
    add_config_options(parser)
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    parser.set_defaults(handler=_cmd_check)
