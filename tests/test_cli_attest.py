"""`hfl-lab attest verify/show/policy` on the real fixtures: verdicts, exit codes, bad input."""

from __future__ import annotations

import base64
import json
import random
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from hfl_lab.attestation import policy_from_evidence, render_verdict, verify_evidence
from hfl_lab.cli import ExitCode, main
from hfl_lab.ratls import evidence_ext as ext
from hfl_lab.tee import AttestationPolicy, parse_quote
from tests.cert_support import self_signed
from tests.conftest import (
    SGX_IN_WINDOW,
    TDX_QUOTE_AFTER_WINDOW,
    TDX_QUOTE_IN_WINDOW,
    read_evidence_file,
)

SIGNED_REGION = 48 + 584  # v4 header + TD report body: what the attestation key signs


def run(capsys: pytest.CaptureFixture[str], *argv: object) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def run_json(capsys: pytest.CaptureFixture[str], *argv: object) -> tuple[int, dict[str, Any]]:
    code, out, err = run(capsys, *argv, "--json")
    assert err == "", err
    return code, json.loads(out)


@pytest.fixture(scope="module")
def tdx_quote(attestation_dir: Path) -> Path:
    return attestation_dir / "dcap-qvl/tdx_quote"


@pytest.fixture(scope="module")
def tdx_collateral(attestation_dir: Path) -> Path:
    return attestation_dir / "dcap-qvl/tdx_quote_collateral.json"


def _self_signed(extensions: Sequence[x509.ExtensionType] = ()) -> x509.Certificate:
    return self_signed(extensions=extensions)

def test_real_quote_in_its_collateral_window_is_accepted(
    capsys: pytest.CaptureFixture[str], tdx_quote: Path, tdx_collateral: Path
) -> None:
    code, doc = run_json(
        capsys, "attest", "verify", tdx_quote, "--collateral", tdx_collateral,
        "--at", TDX_QUOTE_IN_WINDOW,
    )

    assert code == 0
    assert doc["accepted"] is True
    assert doc["tcb_status"] == "UpToDate"
    assert doc["simulated"] is False
    assert doc["evidence_kind"] == "quote"
    assert {"name", "passed", "expected", "actual", "reason"} <= set(doc["checks"][0])
    assert all(c["passed"] for c in doc["checks"])


def test_the_table_names_the_evidence_kind_and_every_check(
    capsys: pytest.CaptureFixture[str], tdx_quote: Path, tdx_collateral: Path
) -> None:
    code, out, _ = run(
        capsys, "attest", "verify", tdx_quote, "--collateral", tdx_collateral,
        "--at", TDX_QUOTE_IN_WINDOW,
    )

    assert code == 0
    assert "DCAP quote (binary)" in out
    assert "ACCEPTED" in out
    for name in ("tee_type", "dcap", "tcb_status", "debug", "td_attributes", "simulated"):
        assert name in out


def test_real_quote_after_its_window_is_rejected_collateral_expired(
    capsys: pytest.CaptureFixture[str], tdx_quote: Path, tdx_collateral: Path
) -> None:
    code, doc = run_json(
        capsys, "attest", "verify", tdx_quote, "--collateral", tdx_collateral,
        "--at", TDX_QUOTE_AFTER_WINDOW,
    )

    assert code == 1
    assert doc["accepted"] is False
    assert any("collateral expired" in c["reason"] for c in doc["checks"] if not c["passed"])


def test_sgx_quote_is_rejected_as_not_tdx(
    capsys: pytest.CaptureFixture[str], attestation_dir: Path
) -> None:
    code, doc = run_json(
        capsys, "attest", "verify", attestation_dir / "dcap-qvl/sgx_quote",
        "--collateral", attestation_dir / "dcap-qvl/sgx_quote_collateral.json",
        "--at", SGX_IN_WINDOW,
    )

    assert code == 1
    tee = next(c for c in doc["checks"] if c["name"] == "tee_type")
    assert not tee["passed"]
    assert "not a TDX quote" in tee["reason"]


def test_debug_quote_without_collateral_fails_debug_and_dcap(
    capsys: pytest.CaptureFixture[str], attestation_dir: Path
) -> None:
    code, doc = run_json(capsys, "attest", "verify", attestation_dir / "trustee/tdx_quote_4.dat")

    assert code == 1
    checks = {c["name"]: c for c in doc["checks"]}
    assert not checks["debug"]["passed"]
    assert checks["debug"]["actual"] == "DEBUG set"
    assert not checks["dcap"]["passed"]
    assert "no collateral" in checks["dcap"]["reason"]
    assert "--collateral" in checks["dcap"]["reason"]  # the fix
    # SEPT_VE_DISABLE (bit 28) is set in this quote and is no reason to reject
    assert checks["td_attributes"]["passed"]
    assert int(checks["td_attributes"]["actual"], 16) & (1 << 28)


def _flip_offsets() -> list[int]:
    header = list(range(0, 48, 3))
    body = random.Random(20240601).sample(range(48, SIGNED_REGION), 24)
    return header + sorted(body)


@pytest.mark.parametrize("offset", _flip_offsets())
def test_any_flipped_byte_of_the_signed_region_is_rejected(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, tdx_quote: Path, tdx_collateral: Path,
    offset: int,
) -> None:
    """Header bytes 0-7 (version, attestation key type, TEE type) may make the quote
    unparseable: exit 2 (invalid input) is right for those. Every other flip must parse and be
    rejected (exit 1) with the DCAP check failed."""
    data = bytearray(tdx_quote.read_bytes())
    data[offset] ^= 0x01
    altered = tmp_path / "altered"
    altered.write_bytes(bytes(data))

    code, out, err = run(
        capsys, "attest", "verify", altered, "--collateral", tdx_collateral,
        "--at", TDX_QUOTE_IN_WINDOW, "--json",
    )

    assert code != 0
    if offset < 8 and code == ExitCode.INVALID_INPUT:
        assert err.count("\n") == 1 and "offset" in err
        return
    assert code == ExitCode.REJECTED, err
    dcap = next(c for c in json.loads(out)["checks"] if c["name"] == "dcap")
    assert not dcap["passed"]


# -- reading every kind of input ---------------------------------------------------------------


@pytest.mark.parametrize("name", ["tdx-quote.hex", "quote-from-tappd.hex"])
def test_hex_quotes_are_read_as_hex_and_shown(
    capsys: pytest.CaptureFixture[str], attestation_dir: Path, name: str
) -> None:
    path = attestation_dir / "dcap-qvl" / name
    td = parse_quote(read_evidence_file(path)).td_report

    code, out, err = run(capsys, "attest", "show", path)

    assert code == 0, err
    assert "DCAP quote as hex text" in out
    for field in ("header.version", "td_report.mr_td", "td_report.rtmr3", "qe_report.mr_enclave",
                  "pck_chain[0].subject", "pck_chain[0].not_after", "fmspc"):
        assert field in out
    assert td.mr_td.hex() in out
    assert td.report_data.hex() in out


def test_show_json_has_header_td_report_qe_report_chain_and_fmspc(
    capsys: pytest.CaptureFixture[str], tdx_quote: Path
) -> None:
    code, doc = run_json(capsys, "attest", "show", tdx_quote)

    assert code == 0
    assert doc["header"]["tee_type"] == "0x00000081"
    assert doc["fmspc"] == "B0C06F000000"
    assert len(doc["td_report"]) == 15
    assert doc["qe_report"]["isv_prod_id"]
    assert [c["subject"].rsplit("CN=", 1)[1] for c in doc["pck_chain"]] == [
        "Intel SGX PCK Certificate", "Intel SGX PCK Platform CA", "Intel SGX Root CA",
    ]
    assert doc["td_attributes"]["flags"] == ["SEPT_VE_DISABLE"]


def test_coco_agent_json_is_detected_and_verified(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, tdx_quote: Path, tdx_collateral: Path
) -> None:
    agent = tmp_path / "evidence.json"
    quote = base64.b64encode(tdx_quote.read_bytes()).decode()
    agent.write_text(json.dumps({"cc_eventlog": None, "quote": quote, "aa_eventlog": None}))

    code, doc = run_json(
        capsys, "attest", "verify", agent, "--collateral", tdx_collateral,
        "--at", TDX_QUOTE_IN_WINDOW,
    )

    assert code == 0
    assert doc["evidence_kind"] == "coco-agent-json"


@pytest.mark.parametrize("encoding", ["pem", "der"])
def test_gramine_legacy_certificate_is_read_and_its_key_binding_judged(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, tdx_quote: Path, tdx_collateral: Path,
    encoding: str,
) -> None:
    """A real quote pasted into another key's certificate: read, but not bound to that key."""
    legacy = x509.UnrecognizedExtension(
        ext.GRAMINE_LEGACY_QUOTE_OID, ext.encode_legacy_extension(tdx_quote.read_bytes())
    )
    cert = tmp_path / "legacy.crt"
    fmt = serialization.Encoding.PEM if encoding == "pem" else serialization.Encoding.DER
    cert.write_bytes(_self_signed([legacy]).public_bytes(fmt))

    show_code, desc = run_json(capsys, "attest", "show", cert)
    code, doc = run_json(
        capsys, "attest", "verify", cert, "--collateral", tdx_collateral,
        "--at", TDX_QUOTE_IN_WINDOW,
    )

    assert show_code == 0
    assert desc["evidence_kind"] == "ratls-gramine"
    assert desc["encoding"] == encoding
    assert desc["certificate"]["subject"] == "CN=plain"
    assert desc["certificate"]["not_after"]
    assert desc["certificate"]["key_binding"]["binds_this_key"] is False
    assert code == 1
    assert doc["evidence_kind"] == "ratls-gramine"
    assert not next(c for c in doc["checks"] if c["name"] == "key_binding")["passed"]
    assert next(c for c in doc["checks"] if c["name"] == "dcap")["passed"]


# -- policy --from-evidence ---------------------------------------------------------------------


def test_policy_from_evidence_accepts_that_evidence_and_rejects_another_on_mr_td(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, attestation_dir: Path, tdx_quote: Path,
    tdx_collateral: Path,
) -> None:
    policy = tmp_path / "policy.yaml"
    other = attestation_dir / "go-tdx-guest/tdx_prod_quote_SPR_E4.dat"

    made, _, _ = run(capsys, "attest", "policy", "--from-evidence", tdx_quote, "-o", policy)
    same, same_doc = run_json(
        capsys, "attest", "verify", tdx_quote, "--policy", policy,
        "--collateral", tdx_collateral, "--at", TDX_QUOTE_IN_WINDOW,
    )
    other_code, other_out, _ = run(capsys, "attest", "verify", other, "--policy", policy)
    _, other_doc = run_json(capsys, "attest", "verify", other, "--policy", policy)

    assert made == 0
    loaded = AttestationPolicy.load(policy)
    td = parse_quote(tdx_quote.read_bytes()).td_report
    assert loaded.mr_td == (td.mr_td.hex(),)
    assert loaded.rtmr3 == (td.rtmr3.hex(),) and loaded.xfam == (td.xfam.hex(),)
    assert loaded.mr_seam == (td.mr_seam.hex(),)
    assert loaded.td_attributes == (f"0x{td.td_attributes_int:016x}",)
    assert same == 0 and same_doc["accepted"]
    assert {"mr_td", "rtmr0", "rtmr1", "rtmr2", "rtmr3", "mr_seam", "xfam"} <= {
        c["name"] for c in same_doc["checks"]
    }
    assert other_code == 1
    mr_td = next(c for c in other_doc["checks"] if c["name"] == "mr_td")
    other_td = parse_quote(other.read_bytes()).td_report
    assert not mr_td["passed"]
    assert mr_td["expected"] == td.mr_td.hex()
    assert mr_td["actual"] == other_td.mr_td.hex()
    assert td.mr_td.hex() in other_out and other_td.mr_td.hex() in other_out  # in full


def test_policy_goes_to_stdout_without_output_file(
    capsys: pytest.CaptureFixture[str], tdx_quote: Path
) -> None:
    code, out, _ = run(capsys, "attest", "policy", "--from-evidence", tdx_quote)

    assert code == 0
    assert AttestationPolicy.from_dict(__import__("yaml").safe_load(out)).mr_td


def test_policy_from_an_sgx_quote_is_refused(
    capsys: pytest.CaptureFixture[str], attestation_dir: Path
) -> None:
    code, _, err = run(
        capsys, "attest", "policy", "--from-evidence", attestation_dir / "dcap-qvl/sgx_quote"
    )

    assert code == 2
    assert "not a TDX quote" in err


# -- unreadable input: exit 2, one line on stderr --------------------------------------------------


def _bad_inputs(tdx_quote: Path) -> dict[str, bytes]:
    cert = _self_signed().public_bytes(serialization.Encoding.PEM)
    return {
        "random": random.Random(3).randbytes(3000),
        "empty": b"",
        "truncated": tdx_quote.read_bytes()[:1000],
        "cert-without-evidence": cert,
        "odd-hex": b"0x04000200810",
        "not-json": b"{quote: 1",
        "json-without-quote": b'{"tdx": 1}',
        "private-key-pem": b"-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n",
    }


@pytest.mark.parametrize(
    "kind",
    ["random", "empty", "truncated", "cert-without-evidence", "odd-hex", "not-json",
     "json-without-quote", "private-key-pem"],
)
@pytest.mark.parametrize("action", ["verify", "show"])
def test_unreadable_input_is_exit_2_and_one_line(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, tdx_quote: Path, kind: str, action: str
) -> None:
    path = tmp_path / kind
    path.write_bytes(_bad_inputs(tdx_quote)[kind])

    code, out, err = run(capsys, "attest", action, path)

    assert code == 2
    assert out == ""
    assert err.count("\n") == 1 and err.startswith("hfl-lab: error: ")
    assert str(path) in err
    assert "Traceback" not in err


def test_messages_say_what_is_wrong_and_where(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, tdx_quote: Path
) -> None:
    inputs = _bad_inputs(tdx_quote)
    expect = {
        "truncated": "offset 632",
        "empty": "empty",
        "cert-without-evidence": "no attestation evidence in the certificate",
        "random": "offset 0",
    }
    for kind, needle in expect.items():
        path = tmp_path / kind
        path.write_bytes(inputs[kind])
        _, _, err = run(capsys, "attest", "verify", path)
        assert needle in err, err


def test_a_tdreport_is_named_as_such(
    capsys: pytest.CaptureFixture[str], attestation_dir: Path
) -> None:
    code, _, err = run(capsys, "attest", "show", attestation_dir / "go-tdx-guest/report.dat")

    assert code == 2
    assert "TDREPORT" in err


def test_usage_errors_are_exit_2(capsys: pytest.CaptureFixture[str], tdx_quote: Path) -> None:
    assert run(capsys, "attest", "verify")[0] == 2
    assert run(capsys, "attest", "verify", tdx_quote, "--at", "yesterday")[0] == 2
    assert run(capsys, "attest", "frobnicate")[0] == 2
    assert run(capsys, "attest", "verify", tdx_quote, "--collateral", "a", "--pccs", "b")[0] == 2
    assert run(capsys, "attest", "verify", "/nonexistent/quote")[0] == 2
    assert run(capsys, "attest", "verify", tdx_quote, "--policy", "/nonexistent.yaml")[0] == 2


def test_help_lists_the_exit_codes(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "--help")

    assert code == 0
    assert "exit codes:" in out
    for c in ExitCode:
        assert f"  {int(c)}  " in out


# -- the library the notebooks use --------------------------------------------------------------


def test_notebook_functions_give_the_cli_verdict(
    capsys: pytest.CaptureFixture[str], tdx_quote: Path, tdx_collateral: Path
) -> None:
    verdict = verify_evidence(tdx_quote, collateral=tdx_collateral, at=TDX_QUOTE_IN_WINDOW)
    _, doc = run_json(
        capsys, "attest", "verify", tdx_quote, "--collateral", tdx_collateral,
        "--at", TDX_QUOTE_IN_WINDOW,
    )

    assert verdict.accepted and doc["accepted"]
    assert [c.name for c in verdict.checks] == [c["name"] for c in doc["checks"]]
    assert "ACCEPTED" in render_verdict(verdict)
    policy = policy_from_evidence(tdx_quote.read_bytes())
    assert verify_evidence(tdx_quote.read_bytes(), policy, collateral=tdx_collateral,
                           at=TDX_QUOTE_IN_WINDOW).accepted


def test_exit_codes_keep_their_numbers() -> None:
    assert {c.name: int(c) for c in ExitCode} == {
        "SUCCESS": 0, "REJECTED": 1, "INVALID_INPUT": 2, "UNAVAILABLE": 3, "FAILED": 4,
    }
