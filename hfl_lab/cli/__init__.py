"""The ``hfl-lab`` command line: subcommands, numbered exit codes and one error handler."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import NoReturn

from hfl_lab import __version__
from hfl_lab._exceptions import ExitCode, HflLabError

PROG = "hfl-lab"

EXIT_CODE_HELP: dict[ExitCode, str] = {
    ExitCode.SUCCESS: "success; for `attest verify/endpoint`: the evidence is accepted",
    ExitCode.REJECTED: "the evidence was read and evaluated, and the policy rejects it",
    ExitCode.INVALID_INPUT: (
        "usage error, or input that cannot be read or parsed (evidence, policy, collateral)"
    ),
    ExitCode.UNAVAILABLE: "a peer could not be reached (nothing listening, no TLS, gRPC down)",
    ExitCode.FAILED: "a lab operation failed (backend, vault); the message says which",
}


class _Exit(Exception):
    """Unwinds to ``main`` with an exit code after the message was printed."""

    def __init__(self, code: int) -> None:
        super().__init__(code)
        self.code = code


def exit_code_for(error: BaseException) -> ExitCode:
    """The exit code of an error the lab raised on purpose (its class says), or of a gRPC
    failure."""
    if isinstance(error, HflLabError):
        return error.exit_code
    return ExitCode.UNAVAILABLE  # grpc.RpcError


def _one_line(text: str) -> str:
    return " ".join(text.split())


def error_message(error: HflLabError) -> str:
    """``HflLabError`` as the one line the CLI prints: the message, then the fix."""
    return error.one_line()


def _grpc_message(error: BaseException) -> str:
    """A sentence for a gRPC failure, in the spirit of Flower's ``flwr_cli_grpc_exc_handler``."""
    code = getattr(error, "code", None)
    details = getattr(error, "details", None)
    name = str(code().name) if callable(code) else "UNKNOWN"
    text = str(details()) if callable(details) else str(error)
    hints = {
        "UNAVAILABLE": "the peer is not reachable; check that the lab is running and the address",
        "UNAUTHENTICATED": "the peer refused our credentials; check the attestation policy",
        "PERMISSION_DENIED": "the peer does not allow this call for our identity",
        "DEADLINE_EXCEEDED": "the peer did not answer in time; retry or raise the timeout",
        "UNIMPLEMENTED": "the peer does not offer this call; check that versions match",
    }
    hint = hints.get(name, "see the peer's log for details")
    return f"gRPC call failed ({name}: {text}). Fix: {hint}."


@contextmanager
def cli_error_handler() -> Iterator[None]:
    """Turn ``HflLabError`` and ``grpc.RpcError`` into one line on stderr and an exit code.

    Every subcommand runs inside this. Any other exception is a bug and keeps its traceback.
    """
    import grpc

    try:
        yield
    except HflLabError as e:
        print(f"{PROG}: error: {error_message(e)}", file=sys.stderr)
        raise _Exit(exit_code_for(e)) from None
    except grpc.RpcError as e:
        print(f"{PROG}: error: {_one_line(_grpc_message(e))}", file=sys.stderr)
        raise _Exit(ExitCode.UNAVAILABLE) from None


# -- the subcommand registry ----------------------------------------------------------------
#
# Each subcommand's module is imported inside its ``_register_*`` function, on purpose:
# ``import hfl_lab.cli`` stays free of cryptography, YAML and the attestation stack (attest), and
# the subcommand modules import ``ExitCode``/``PROG`` from this package, so importing them here
# at the top would also be an import cycle.

Handler = Callable[[argparse.Namespace], int]


@dataclass(frozen=True)
class Subcommand:
    """A top-level command: its name, one line of help, and how it adds its arguments.

    ``register`` adds arguments (and sub-subcommands) to the parser it gets and sets
    ``handler=`` via ``parser.set_defaults``; the handler returns an ``ExitCode``.
    """

    name: str
    help: str
    register: Callable[[argparse.ArgumentParser], None]


def _register_attest(parser: argparse.ArgumentParser) -> None:
    from hfl_lab.cli.attest import register  # lazy, and a cycle: see above

    register(parser)


def _register_run(parser: argparse.ArgumentParser) -> None:
    from hfl_lab.cli.run import register  # lazy, and a cycle: see above

    register(parser)


def _register_check(parser: argparse.ArgumentParser) -> None:
    from hfl_lab.cli.check import register  # lazy, and a cycle: see above

    register(parser)


def _register_host(parser: argparse.ArgumentParser) -> None:
    from hfl_lab.cli.host import register  # lazy, and a cycle: see above

    register(parser)


def _register_join(parser: argparse.ArgumentParser) -> None:
    from hfl_lab.cli.join import register  # lazy, and a cycle: see above

    register(parser)


def _register_lab(parser: argparse.ArgumentParser) -> None:
    from hfl_lab.cli.lab import register  # lazy, and a cycle: see above

    register(parser)


SUBCOMMANDS: tuple[Subcommand, ...] = (
    Subcommand(
        "run",
        "run the whole lab (notebooks 00-06) headless with papermill into runs/<time>/",
        _register_run,
    ),
    Subcommand(
        "check",
        "preflight only: environment, TDX, cluster and backend; starts nothing",
        _register_check,
    ),
    Subcommand("lab", "start JupyterLab on the lab's notebooks", _register_lab),
    Subcommand(
        "host",
        "host a cross-silo run: trust service and ps0 on an address, one join link per slot",
        _register_host,
    ),
    Subcommand(
        "join",
        "join a hosted run with one worker TD: verify the host, attest, train, Ctrl-C leaves",
        _register_join,
    ),
    Subcommand(
        "attest",
        "would the lab trust this evidence? verify, show, endpoint, policy",
        _register_attest,
    ),
)


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line plus the usage, and exit code 2."""

    def error(self, message: str) -> NoReturn:
        self.print_usage(sys.stderr)
        print(f"{self.prog}: error: {_one_line(message)}", file=sys.stderr)
        raise _Exit(ExitCode.INVALID_INPUT)

    def exit(self, status: int = 0, message: str | None = None) -> NoReturn:
        if message:
            print(message, file=sys.stderr, end="")
        raise _Exit(status)


def build_parser() -> argparse.ArgumentParser:
    epilog = "exit codes:\n" + "\n".join(f"  {int(c)}  {h}" for c, h in EXIT_CODE_HELP.items())
    parser = _Parser(
        prog=PROG,
        description="HFL-TDX Lab: federated learning inside Intel TDX trust domains.",
        epilog=epilog,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    commands.required = True
    for sub in SUBCOMMANDS:
        sub.register(
            commands.add_parser(
                sub.name,
                help=sub.help,
                description=sub.help,
                epilog=epilog,
                formatter_class=argparse.RawDescriptionHelpFormatter,
            )
        )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``hfl-lab`` with ``argv`` (default: ``sys.argv[1:]``); returns the exit code."""
    try:
        args = build_parser().parse_args(argv)
        handler: Handler = args.handler
        with cli_error_handler():
            return int(handler(args))
    except _Exit as e:
        return e.code
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130


__all__ = [
    "EXIT_CODE_HELP",
    "SUBCOMMANDS",
    "ExitCode",
    "Subcommand",
    "build_parser",
    "cli_error_handler",
    "error_message",
    "exit_code_for",
    "main",
]
