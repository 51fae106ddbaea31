"""``hfl-lab attest``: would the lab trust this evidence? The command line over
:mod:`hfl_lab.attestation`, the API the notebooks call too, so the two cannot disagree."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from hfl_lab._exceptions import ConfigError
from hfl_lab.attestation import (
    load_evidence_file,
    policy_from_evidence,
    policy_text,
    render_verdict,
    verdict_document,
    verify_endpoint,
    verify_evidence,
)
from hfl_lab.attestation.evidence_input import LoadedEvidence
from hfl_lab.attestation.evidence_view import describe_evidence, render_description
from hfl_lab.cli import ExitCode
from hfl_lab.tee.verdict import Verdict

__all__ = ["register"]



def _print_verdict(verdict: Verdict, loaded: LoadedEvidence | None, as_json: bool) -> int:
    if as_json:
        print(json.dumps(verdict_document(verdict, loaded), indent=2))
    else:
        print(render_verdict(verdict, loaded))
    return ExitCode.SUCCESS if verdict.accepted else ExitCode.REJECTED


def _cmd_verify(args: argparse.Namespace) -> int:
    loaded = load_evidence_file(args.evidence)
    verdict = verify_evidence(
        loaded,
        args.policy,
        collateral=args.collateral,
        pccs_url=args.pccs,
        lab_root=args.lab_root,
        at=args.at,
        role=args.role,
    )
    return _print_verdict(verdict, loaded, args.json)


def _cmd_show(args: argparse.Namespace) -> int:
    desc = describe_evidence(load_evidence_file(args.evidence))
    print(json.dumps(desc, indent=2) if args.json else render_description(desc))
    return ExitCode.SUCCESS


def _cmd_endpoint(args: argparse.Namespace) -> int:
    verdict = verify_endpoint(
        args.address,
        args.policy,
        collateral=args.collateral,
        pccs_url=args.pccs,
        lab_root=args.lab_root,
        role=args.role,
        timeout=args.timeout,
    )
    if args.json:
        doc = verdict_document(verdict)
        doc["source"] = args.address
        print(json.dumps(doc, indent=2))
    else:
        print(f"endpoint: {args.address}")
        print(render_verdict(verdict))
    return ExitCode.SUCCESS if verdict.accepted else ExitCode.REJECTED


def _cmd_policy(args: argparse.Namespace) -> int:
    loaded = load_evidence_file(args.from_evidence)
    policy = policy_from_evidence(loaded)
    out: Path | None = args.output
    fmt = "json" if out is not None and out.suffix == ".json" else "yaml"
    text = policy_text(policy, fmt=fmt, origin=f"{loaded.source} ({loaded.description})")
    if out is None:
        print(text, end="")
        return ExitCode.SUCCESS
    try:
        out.write_text(text)
    except OSError as e:
        raise ConfigError(f"cannot write the policy to {out}: {e.strerror or e}") from None
    print(f"wrote {out}: reference values of {loaded.source} ({loaded.description})")
    return ExitCode.SUCCESS


def _unix_seconds(text: str) -> int:
    if not text.isdigit():
        raise argparse.ArgumentTypeError(f"'{text}' is not a UNIX time in whole seconds")
    return int(text)


def _add_trust_options(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--policy",
        metavar="FILE",
        type=Path,
        help="policy (YAML/JSON); default: the baseline (TDX, DCAP passes, UpToDate, "
        "no DEBUG or other bit of TD attributes 7:0, no simulated evidence)",
    )
    source = p.add_mutually_exclusive_group()
    source.add_argument(
        "--collateral",
        metavar="FILE",
        type=Path,
        help="DCAP collateral (dcap-qvl QuoteCollateralV3 JSON)",
    )
    source.add_argument("--pccs", metavar="URL", help="fetch the collateral from this PCCS")
    p.add_argument(
        "--lab-root",
        metavar="FILE",
        type=Path,
        help="the simulated platform's root certificate (PEM/DER): needed to check "
        "simulated evidence, which is rejected without it",
    )
    p.add_argument(
        "--role",
        help="use the policy's reference values for this role "
        "(default for certificates: the role they claim)",
    )
    p.add_argument("--json", action="store_true", help="print the verdict as JSON")


def register(parser: argparse.ArgumentParser) -> None:
    """Add ``verify``, ``show``, ``endpoint`` and ``policy`` under ``hfl-lab attest``."""
    sub = parser.add_subparsers(dest="attest_command", metavar="ACTION")
    sub.required = True
    evidence_help = (
        "a raw or hex quote, a PEM/DER RA-TLS certificate, or CoCo agent / "
        "hfl-lab evidence JSON ('-' reads stdin)"
    )

    verify = sub.add_parser("verify", help="verify evidence against a policy; exit 0 if accepted")
    verify.add_argument("evidence", metavar="EVIDENCE", help=evidence_help)
    _add_trust_options(verify)
    verify.add_argument(
        "--at", metavar="UNIX_SECONDS", type=_unix_seconds, help="verification time (default: now)"
    )
    verify.set_defaults(handler=_cmd_verify)

    show = sub.add_parser("show", help="print every field of the evidence")
    show.add_argument("evidence", metavar="EVIDENCE", help=evidence_help)
    show.add_argument("--json", action="store_true", help="print the fields as JSON")
    show.set_defaults(handler=_cmd_show)

    endpoint = sub.add_parser(
        "endpoint",
        help="verify the RA-TLS certificate a gRPC server presents (mTLS servers included)",
    )
    endpoint.add_argument("address", metavar="HOST:PORT")
    _add_trust_options(endpoint)
    endpoint.add_argument(
        "--timeout",
        type=float,
        default=5.0,
        metavar="SECONDS",
        help="TLS handshake timeout (default 5)",
    )
    endpoint.set_defaults(handler=_cmd_endpoint)

    policy = sub.add_parser(
        "policy", help="write a policy whose reference values are this evidence's measurements"
    )
    policy.add_argument("--from-evidence", metavar="EVIDENCE", required=True, help=evidence_help)
    policy.add_argument(
        "-o",
        "--output",
        metavar="FILE",
        type=Path,
        help="write here (.json: JSON, else YAML); default: stdout",
    )
    policy.set_defaults(handler=_cmd_policy)
