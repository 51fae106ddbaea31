"""CoCo attestation agent provider against a loopback server speaking the agent's REST API."""

from __future__ import annotations

import base64
import json
import threading
import urllib.parse
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import ClassVar

import pytest

from hfl_lab import AttestationError
from hfl_lab.tee import (
    AttestationPolicy,
    CocoAgentProvider,
    SimulatedPlatform,
    SimulatedTdProvider,
    Verifier,
    parse_quote,
)
from hfl_lab.tee.sim.measure import measure_workload

PLATFORM = SimulatedPlatform.generate()
SIM = SimulatedTdProvider(PLATFORM, measure_workload(role="ps0"))


class AgentDouble(BaseHTTPRequestHandler):
    """Behaves like api-server-rest's /aa/evidence for a TDX guest (a double, not the agent)."""

    seen: ClassVar[list[str]] = []

    def do_GET(self) -> None:
        url = urllib.parse.urlparse(self.path)
        runtime_data = urllib.parse.parse_qs(url.query).get("runtime_data", [""])[0]
        AgentDouble.seen.append(runtime_data)
        raw = runtime_data.encode()
        if url.path != "/aa/evidence" or len(raw) > 64:
            self.send_response(400)
            self.end_headers()
            self.wfile.write(b"runtime_data longer than 64 bytes")
            return
        quote = SIM.get_evidence(raw).quote  # the agent zero-pads runtime_data into REPORTDATA
        body = json.dumps({"quote": base64.b64encode(quote).decode(), "cc_eventlog": None})
        self.send_response(200)
        self.end_headers()
        self.wfile.write(body.encode())

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture()
def agent() -> Iterator[str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), AgentDouble)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def test_evidence_binds_the_value_within_the_64_byte_limit(agent: str) -> None:
    binding = bytes(range(64))

    evidence = CocoAgentProvider(agent).get_evidence(binding)

    assert len(AgentDouble.seen[-1].encode()) == 64
    assert parse_quote(evidence.quote).report_data == evidence.expected_report_data(binding)
    policy = AttestationPolicy(allow_simulated=True, report_data_binding="key")
    verdict = Verifier(policy, lab_root_der=PLATFORM.root_der, collateral=None).verify(
        evidence.__class__(**{**evidence.__dict__, "collateral_json": PLATFORM.collateral_json}),
        binding=binding,
    )
    assert verdict.check("report_data").passed
    assert verdict.accepted, verdict.to_table()


def test_unreachable_agent_names_the_fix() -> None:
    with pytest.raises(AttestationError, match="unreachable") as err:
        CocoAgentProvider("127.0.0.1:9", timeout_s=1).get_evidence(bytes(64))
    assert err.value.fix and "CoCo" in err.value.fix
