"""TDX evidence from the CoCo attestation agent's REST API inside a Kata guest."""

from __future__ import annotations

import base64
import binascii
import http.client
import json
import urllib.parse
from typing import Any

from hfl_lab._exceptions import AttestationError
from hfl_lab.tee.evidence import Evidence, encode_report_data

DEFAULT_ENDPOINT = "127.0.0.1:8006"


def quote_from_agent_json(document: Any) -> bytes:
    """The raw quote inside the agent's TDX evidence JSON (``{"quote": "<base64>", ...}``)."""
    if isinstance(document, str | bytes):
        try:
            document = json.loads(document)
        except ValueError as e:
            raise AttestationError(
                f"attestation agent answer is not JSON ({e})", check="evidence"
            ) from None
    if not isinstance(document, dict) or not isinstance(document.get("quote"), str):
        raise AttestationError(
            "attestation agent evidence has no 'quote' field", check="evidence",
            fix="check that the guest runs a TDX attester (TEE platform 'tdx')",
        )
    try:
        return base64.b64decode(document["quote"], validate=True)
    except (binascii.Error, ValueError):
        try:
            return base64.urlsafe_b64decode(document["quote"] + "==")
        except (binascii.Error, ValueError):
            raise AttestationError(
                "attestation agent 'quote' is not base64", check="evidence"
            ) from None


class CocoAgentProvider:
    """``GET /aa/evidence?runtime_data=...`` on the attestation agent's API server.

    The agent copies the runtime_data *string* into REPORTDATA, zero-padded, and refuses more
    than 64 bytes; arbitrary binary does not survive a UTF-8 query string, so we send the 64
    hex characters of SHA-256(binding) and label the evidence ``sha256-hex``.
    """

    name = "coco-attestation-agent"
    simulated = False

    def __init__(self, endpoint: str = DEFAULT_ENDPOINT, timeout_s: float = 30.0) -> None:
        self.host, _, port = endpoint.partition(":")
        self.port = int(port or 8006)
        self.timeout_s = timeout_s

    def available(self) -> bool:
        try:
            conn = http.client.HTTPConnection(self.host, self.port, timeout=0.5)
            conn.request("GET", "/aa/evidence?runtime_data=")
            conn.getresponse().read()
            conn.close()
            return True
        except OSError:
            return False

    def get_evidence(self, report_data: bytes) -> Evidence:
        runtime_data = encode_report_data(report_data, "sha256-hex").decode()
        query = urllib.parse.urlencode({"runtime_data": runtime_data})
        try:
            conn = http.client.HTTPConnection(self.host, self.port, timeout=self.timeout_s)
            conn.request("GET", f"/aa/evidence?{query}")
            resp = conn.getresponse()
            body = resp.read()
            conn.close()
        except OSError as e:
            raise AttestationError(
                f"attestation agent at {self.host}:{self.port} unreachable ({e})",
                check="evidence",
                fix="run inside a CoCo (Kata) guest whose attestation agent API server is on",
            ) from None
        if resp.status != 200:
            raise AttestationError(
                f"attestation agent answered HTTP {resp.status}: {body[:200]!r}", check="evidence"
            )
        return Evidence(
            quote=quote_from_agent_json(body),
            provider=self.name,
            simulated=False,
            report_data_encoding="sha256-hex",
        )
