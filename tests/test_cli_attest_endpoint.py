"""`hfl-lab attest endpoint` against live gRPC servers, simulated evidence, and the entry point."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import grpc
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from hfl_lab.attestation import verify_endpoint
from hfl_lab.cli import ExitCode, main
from hfl_lab.ratls import RaTlsIdentity
from hfl_lab.tee import SimulatedPlatform, SimulatedTdProvider
from tests.cert_support import self_signed
from tests.conftest import TDX_QUOTE_IN_WINDOW

ROLE = "trust"  # the TD of the conftest fixtures platform / measurements / provider


@pytest.fixture(scope="module")
def identity(provider: SimulatedTdProvider) -> RaTlsIdentity:
    """The certificate the lab's trust service presents: an RA-TLS certificate from the
    simulated TD (the trust service itself is being written; it uses exactly this call)."""
    ident = RaTlsIdentity()
    ident.make_certificate(provider, subject_cn=ROLE, role=ROLE)
    return ident


@pytest.fixture(scope="module")
def lab_root(tmp_path_factory: pytest.TempPathFactory, platform: SimulatedPlatform) -> Path:
    path = tmp_path_factory.mktemp("lab") / "lab-root.pem"
    path.write_bytes(platform.root_cert.public_bytes(serialization.Encoding.PEM))
    return path


@pytest.fixture(scope="module")
def simulated_ok(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("policy") / "simulated.yaml"
    path.write_text("allow_simulated: true\n")
    return path


def _serve(key_pem: bytes, cert_pem: bytes, *, mtls: bool) -> tuple[grpc.Server, int]:
    server = grpc.server(ThreadPoolExecutor(1))
    creds = grpc.ssl_server_credentials(
        [(key_pem, cert_pem)],
        root_certificates=cert_pem if mtls else None,
        require_client_auth=mtls,
    )
    port = server.add_secure_port("127.0.0.1:0", creds)
    server.start()
    return server, port


@pytest.fixture(params=[False, True], ids=["tls", "mtls"])
def ratls_server(request: pytest.FixtureRequest, identity: RaTlsIdentity) -> Iterator[str]:
    """A gRPC server presenting the trust service's RA-TLS certificate (optionally mTLS)."""
    server, port = _serve(identity.private_key_pem(), identity.certificate_pem, mtls=request.param)
    yield f"127.0.0.1:{port}"
    server.stop(None)


@pytest.fixture
def plain_tls_server() -> Iterator[str]:
    """A gRPC server with an ordinary self-signed certificate: no attestation evidence."""
    key = ec.generate_private_key(ec.SECP256R1())
    cert = self_signed(key)
    key_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    server, port = _serve(key_pem, cert.public_bytes(serialization.Encoding.PEM), mtls=False)
    yield f"127.0.0.1:{port}"
    server.stop(None)


def run_json(capsys: pytest.CaptureFixture[str], *argv: object) -> tuple[int, dict[str, Any]]:
    code = main([str(a) for a in argv] + ["--json"])
    out, err = capsys.readouterr()
    assert err == "", err
    return code, json.loads(out)


# -- endpoint ----------------------------------------------------------------------------------


def test_trust_service_certificate_is_accepted_when_policy_allows_simulated(
    capsys: pytest.CaptureFixture[str], ratls_server: str, lab_root: Path, simulated_ok: Path
) -> None:
    code, doc = run_json(
        capsys, "attest", "endpoint", ratls_server, "--policy", simulated_ok,
        "--lab-root", lab_root,
    )

    assert code == ExitCode.SUCCESS, doc["reason"]
    assert doc["accepted"] and doc["simulated"]
    assert doc["evidence_kind"] == "ratls-dice"
    assert doc["tcb_status"] == "UpToDate"
    checks = {c["name"]: c for c in doc["checks"]}
    assert checks["key_binding"]["passed"] and checks["report_data"]["passed"]


def test_the_same_endpoint_is_rejected_under_the_baseline(
    capsys: pytest.CaptureFixture[str], ratls_server: str, lab_root: Path
) -> None:
    code, doc = run_json(capsys, "attest", "endpoint", ratls_server, "--lab-root", lab_root)

    assert code == ExitCode.REJECTED
    simulated = next(c for c in doc["checks"] if c["name"] == "simulated")
    assert not simulated["passed"]
    assert "not allowed" in simulated["reason"]


def test_simulated_evidence_without_the_lab_root_is_rejected(
    capsys: pytest.CaptureFixture[str], ratls_server: str, simulated_ok: Path
) -> None:
    code, doc = run_json(capsys, "attest", "endpoint", ratls_server, "--policy", simulated_ok)

    assert code == ExitCode.REJECTED
    assert not next(c for c in doc["checks"] if c["name"] == "simulated")["passed"]


def test_plain_tls_server_is_rejected_no_evidence(
    capsys: pytest.CaptureFixture[str], plain_tls_server: str
) -> None:
    """Decision: a reachable server whose certificate carries no evidence is *rejected*
    (exit 1, one failed `evidence` check), as the issue groups it; a certificate *file*
    without evidence is unreadable input (exit 2)."""
    code = main(["attest", "endpoint", plain_tls_server])
    out, err = capsys.readouterr()
    json_code, doc = run_json(capsys, "attest", "endpoint", plain_tls_server)

    assert code == json_code == ExitCode.REJECTED
    assert err == ""
    assert "no attestation evidence in the certificate" in out
    assert doc["accepted"] is False
    assert doc["checks"][0]["name"] == "evidence"
    assert "no attestation evidence in the certificate" in doc["checks"][0]["reason"]


def test_nothing_listening_is_exit_3_and_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    import socket

    # bound, not listening, for the call: a port let go first could be taken meanwhile by
    # another process that listens on it
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
        code = main(["attest", "endpoint", f"127.0.0.1:{port}", "--timeout", "2"])
    _, err = capsys.readouterr()

    assert code == 3
    assert err.count("\n") == 1 and "cannot connect" in err


@pytest.mark.parametrize("address", ["localhost", "host:port", "127.0.0.1:0", ":50051"])
def test_a_bad_address_is_a_usage_error(
    capsys: pytest.CaptureFixture[str], address: str
) -> None:
    assert main(["attest", "endpoint", address]) == ExitCode.INVALID_INPUT
    assert "HOST:PORT" in capsys.readouterr().err


def test_notebooks_get_the_same_endpoint_verdict(
    ratls_server: str, lab_root: Path, simulated_ok: Path
) -> None:
    verdict = verify_endpoint(ratls_server, simulated_ok, lab_root=lab_root)

    assert verdict.accepted and verdict.simulated
    assert verdict.subject == ROLE


# -- the same certificate as a file ----------------------------------------------------------------


def test_the_certificate_file_verifies_like_the_endpoint(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, identity: RaTlsIdentity, lab_root: Path,
    simulated_ok: Path,
) -> None:
    pem = tmp_path / "trust.pem"
    pem.write_bytes(identity.certificate_pem)
    der = tmp_path / "trust.der"
    assert identity.certificate is not None
    der.write_bytes(identity.certificate.public_bytes(serialization.Encoding.DER))
    policy = tmp_path / "from-cert.json"

    pem_code, pem_doc = run_json(
        capsys, "attest", "verify", pem, "--policy", simulated_ok, "--lab-root", lab_root
    )
    der_code, der_doc = run_json(
        capsys, "attest", "verify", der, "--policy", simulated_ok, "--lab-root", lab_root
    )
    made = main(["attest", "policy", "--from-evidence", str(der), "-o", str(policy)])
    capsys.readouterr()
    pinned_code, pinned = run_json(
        capsys, "attest", "verify", pem, "--policy", policy, "--lab-root", lab_root
    )

    assert pem_code == der_code == 0
    assert pem_doc["encoding"] == "pem" and der_doc["encoding"] == "der"
    assert made == 0 and json.loads(policy.read_text())["allow_simulated"] is True
    assert pinned_code == 0 and "mr_td" in {c["name"] for c in pinned["checks"]}


def test_show_a_certificate_reports_its_key_binding(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, identity: RaTlsIdentity
) -> None:
    pem = tmp_path / "trust.pem"
    pem.write_bytes(identity.certificate_pem)

    code, desc = run_json(capsys, "attest", "show", pem)

    assert code == 0
    cert = desc["certificate"]
    assert cert["subject"] == f"CN={ROLE}" and cert["not_before"] and cert["not_after"]
    assert cert["key_binding"]["binds_this_key"] is True
    assert cert["spki_sha256"] == identity.spki_sha256
    assert desc["simulated_marker"] is True


# -- the installed entry point, out of process ----------------------------------------------------


def _venv_bin(name: str) -> str:
    return str(Path(sys.executable).parent / name)


def test_entry_point_prints_one_line_and_no_traceback_for_garbage(tmp_path: Path) -> None:
    garbage = tmp_path / "garbage.bin"
    garbage.write_bytes(bytes(range(256)) * 3)

    proc = subprocess.run(
        [_venv_bin("hfl-lab"), "attest", "verify", str(garbage)],
        capture_output=True, text=True, timeout=120,
    )

    assert proc.returncode == 2
    assert proc.stdout == ""
    assert proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr
    assert "offset" in proc.stderr


def test_python_m_hfl_lab_cli_verifies_a_real_quote(attestation_dir: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "hfl_lab.cli", "attest", "verify",
         str(attestation_dir / "dcap-qvl/tdx_quote"),
         "--collateral", str(attestation_dir / "dcap-qvl/tdx_quote_collateral.json"),
         "--at", str(TDX_QUOTE_IN_WINDOW), "--json"],
        capture_output=True, text=True, timeout=120,
    )

    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["tcb_status"] == "UpToDate"


def test_grpc_errors_become_one_line_and_exit_3(capsys: pytest.CaptureFixture[str]) -> None:
    from hfl_lab.cli import cli_error_handler

    class Unavailable(grpc.RpcError):
        def code(self) -> grpc.StatusCode:
            return grpc.StatusCode.UNAVAILABLE

        def details(self) -> str:
            return "failed to connect to all addresses"

    with pytest.raises(Exception) as raised, cli_error_handler():
        raise Unavailable()
    err = capsys.readouterr().err

    assert getattr(raised.value, "code", None) == ExitCode.UNAVAILABLE
    assert err.count("\n") == 1 and "UNAVAILABLE" in err and "Fix:" in err


def test_unreachable_pccs_still_evaluates_every_check(
    capsys: pytest.CaptureFixture[str], attestation_dir: Path
) -> None:
    import socket

    with socket.socket() as s:  # bound, not listening, for the call (as above)
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
        code, doc = run_json(
            capsys, "attest", "verify", attestation_dir / "trustee/tdx_quote_4.dat",
            "--pccs", f"https://127.0.0.1:{port}/sgx/certification/v4/",
        )

    assert code == ExitCode.REJECTED
    checks = {c["name"]: c for c in doc["checks"]}
    assert "collateral" in checks["dcap"]["reason"] and "fix" in checks["dcap"]["reason"]
    assert not checks["debug"]["passed"]


def test_stdin_evidence(attestation_dir: Path) -> None:
    hex_text = (attestation_dir / "dcap-qvl/quote-from-tappd.hex").read_bytes()

    proc = subprocess.run(
        [sys.executable, "-m", "hfl_lab.cli", "attest", "show", "-", "--json"],
        input=hex_text, capture_output=True, timeout=120,
    )

    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["evidence_kind"] == "quote-hex"
