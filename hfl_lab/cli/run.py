"""``hfl-lab run``: the whole lab (notebooks 00-06) headless with papermill, into runs/<time>/."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from hfl_lab.cli import PROG, ExitCode
from hfl_lab.config import PROFILES, LabConfig

__all__ = ["add_config_options", "config_from_args", "register"]


def add_config_options(parser: argparse.ArgumentParser) -> None:
    """``--profile``, ``--config FILE`` and repeated ``-p name=value``: one LabConfig."""
    parser.add_argument(
        "--profile",
        choices=tuple(PROFILES),
        default=None,
        help="base parameter set: quick (minutes on 2 cores, the default) or full (the "
        "reference: ResNet-56, 2 workers, reference schedule)",
    )
    parser.add_argument(
        "--config",
        metavar="FILE",
        type=Path,
        help="a YAML file of name: value parameters (LabConfig.to_yaml writes one)",
    )
    parser.add_argument(
        "-p",
        "--param",
        dest="params",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="set one parameter (repeatable), e.g. -p workers=4 -p steps=100; "
        "`hfl-lab run --list-parameters` shows them all",
    )
    parser.add_argument(
        "--list-parameters",
        action="store_true",
        help="print every parameter with its type, default and allowed values, then exit",
    )


def config_from_args(args: argparse.Namespace) -> LabConfig:
    """The validated configuration: the profile, the YAML file over it, then each ``-p``."""
    profile = args.profile or "quick"
    if args.config is not None:
        values = LabConfig.from_yaml(args.config).to_dict()
        named = values.pop("profile_name")
        # the file was written from a profile; --profile, when given, picks the base instead
        base = LabConfig.profile(args.profile or named, **values)
    else:
        base = LabConfig.profile(profile)
    config: LabConfig = LabConfig.from_cli(args.params, base=base) if args.params else base
    return config


def _list_parameters() -> int:
    print(LabConfig.help_text())
    return ExitCode.SUCCESS


def _cmd_run(args: argparse.Namespace) -> int:
    # lazy: hfl_lab.lab loads matplotlib, gRPC and the vault; `hfl-lab --help` registers this module
    from hfl_lab.lab.sequence import run_lab

    if args.list_parameters:
        return _list_parameters()
    config = config_from_args(args)
    print(f"{PROG} run: {config.describe()}", file=sys.stderr)
    print(f"{PROG} run: writing into {Path(config.run_dir).resolve()}", file=sys.stderr)
    run = run_lab(config, notebooks=args.only or None, cell_progress=not args.quiet)
    summary = run.run_dir / "summary.md"
    if not run.ok:
        print(f"{PROG}: error: {run.failure_message()}", file=sys.stderr)
        print(f"{PROG} run: summary {summary}", file=sys.stderr)
        return ExitCode.FAILED
    print(f"{PROG} run: all {len(run.notebooks)} notebooks ran in {run.seconds:.0f} s")
    print(f"{PROG} run: summary {summary} (and summary.html)")
    return ExitCode.SUCCESS


def register(parser: argparse.ArgumentParser) -> None:
    add_config_options(parser)
    parser.add_argument(
        "--only",
        nargs="+",
        metavar="NOTEBOOK",
        help="run only these notebooks (by number or name, e.g. --only 00 04); "
        "each starts what it needs",
    )
    parser.add_argument(
        "-q", "--quiet", action="store_true", help="no per-cell progress bar, one line per notebook"
    )
    parser.set_defaults(handler=_cmd_run)

