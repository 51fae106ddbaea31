"""Parsing real TDX quotes (v4, v5, padded), the TDREPORT, and refusing malformed ones."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from hfl_lab import QuoteFormatError
from hfl_lab.tee import TdReport15, TdReportStruct, parse_quote
from hfl_lab.tee.quote import BODY_TD10, BODY_TD15
from tests.conftest import read_evidence_file

QUOTES = [
    "dcap-qvl/tdx_quote",
    "dcap-qvl/tdx_quote_outdated",
    "dcap-qvl/tdx-quote.hex",
    "dcap-qvl/quote-from-tappd.hex",
    "dcap-qvl/sgx_quote",
    "go-tdx-guest/tdx_prod_quote_SPR_E4.dat",
    "go-tdx-guest/quote_v5_sample.dat",
    "go-tdx-guest/cos-113-tdx-quote.dat",
    "trustee/tdx_quote_4.dat",
    "trustee/tdx_quote_5.dat",
]


@pytest.mark.parametrize("name", QUOTES)
def test_every_fixture_quote_parses_and_serializes_back_identically(
    attestation_dir: Path, name: str
) -> None:
    raw = read_evidence_file(attestation_dir / name)

    quote = parse_quote(raw)

    assert quote.to_bytes() == raw
    assert quote.signature_data.qe is not None
    assert len(quote.signature_data.pck_certificates()) == 3


def test_padded_quote_keeps_its_trailing_bytes(attestation_dir: Path) -> None:
    raw = (attestation_dir / "go-tdx-guest/cos-113-tdx-quote.dat").read_bytes()

    quote = parse_quote(raw)

    assert len(raw) == 8000
    assert len(quote.trailing) > 0 and set(quote.trailing) == {0}
    assert quote.to_bytes() == raw


@pytest.mark.parametrize(
    ("name", "body_type"),
    [("go-tdx-guest/quote_v5_sample.dat", BODY_TD15), ("trustee/tdx_quote_5.dat", BODY_TD15)],
)
def test_v5_quotes_carry_a_td15_body(attestation_dir: Path, name: str, body_type: int) -> None:
    quote = parse_quote((attestation_dir / name).read_bytes())

    assert quote.header.version == 5
    assert quote.body_type == body_type
    assert isinstance(quote.body, TdReport15)
    assert len(quote.body.mr_servicetd) == 48


def test_trustee_quote_fields_match_trustee_parser(attestation_dir: Path) -> None:
    expected = json.loads((attestation_dir / "trustee/parse_tdx_claims_expected.json").read_text())
    quote = parse_quote((attestation_dir / "trustee/tdx_quote_4.dat").read_bytes())
    header, body = expected["quote"]["header"], expected["quote"]["body"]
    raw_header = quote.header.to_bytes()

    assert quote.body_type == BODY_TD10
    assert raw_header[0:2].hex() == header["version"]
    assert raw_header[2:4].hex() == header["att_key_type"]
    assert raw_header[4:8].hex() == header["tee_type"]
    assert raw_header[8:12].hex() == header["reserved"]
    assert quote.header.qe_vendor_id.hex() == header["vendor_id"]
    assert quote.header.user_data.hex() == header["user_data"]
    td = quote.td_report
    renames = {"mrsigner_seam": "mr_signer_seam", "tcb_svn": "tee_tcb_svn"}
    for key, value in body.items():
        attr = renames.get(key, key.replace("rtmr_", "rtmr"))
        assert getattr(td, attr).hex() == value, key


def test_tdreport_fixture_parses_as_a_1024_byte_tdreport(attestation_dir: Path) -> None:
    raw = (attestation_dir / "go-tdx-guest/report.dat").read_bytes()

    report = TdReportStruct.parse(raw)

    assert report.to_bytes() == raw
    assert TdReportStruct.size() == 1024
    assert len(report.mr_td) == 48 and len(report.report_data) == 64


def test_tdreport_of_wrong_size_is_refused() -> None:
    with pytest.raises(QuoteFormatError, match="1024 bytes"):
        TdReportStruct.parse(bytes(1000))


@pytest.mark.parametrize(
    ("cut", "field"),
    [
        (10, "header.pce_svn"),
        (47, "header.user_data"),
        (100, "body.mr_seam"),
        (113, "body.mr_signer_seam"),
        (633, "signature_data_len"),
        (700, "signature_data_len"),
    ],
)
def test_truncated_quote_names_field_and_offset(
    attestation_dir: Path, cut: int, field: str
) -> None:
    raw = (attestation_dir / "dcap-qvl/tdx_quote").read_bytes()

    with pytest.raises(QuoteFormatError) as err:
        parse_quote(raw[:cut])

    assert err.value.field == field
    assert "offset" in str(err.value)


def test_inconsistent_signature_length_is_refused(attestation_dir: Path) -> None:
    raw = bytearray((attestation_dir / "dcap-qvl/tdx_quote").read_bytes())
    raw[632:636] = (0xFFFF).to_bytes(4, "little")

    with pytest.raises(QuoteFormatError, match="exceeds") as err:
        parse_quote(bytes(raw))

    assert err.value.offset == 632


def test_v5_body_size_must_match_body_type(attestation_dir: Path) -> None:
    raw = bytearray((attestation_dir / "go-tdx-guest/quote_v5_sample.dat").read_bytes())
    raw[50:54] = (584).to_bytes(4, "little")  # claims TD 1.0 size with a TD 1.5 type

    with pytest.raises(QuoteFormatError) as err:
        parse_quote(bytes(raw))

    assert err.value.field == "body_size"


def test_unknown_version_and_tee_type_are_refused(attestation_dir: Path) -> None:
    raw = bytearray((attestation_dir / "dcap-qvl/tdx_quote").read_bytes())
    bad_version = bytes([9, 0]) + bytes(raw[2:])
    bad_tee = bytes(raw[:4]) + (0x42).to_bytes(4, "little") + bytes(raw[8:])

    with pytest.raises(QuoteFormatError, match="version 9"):
        parse_quote(bad_version)
    with pytest.raises(QuoteFormatError, match="TEE type"):
        parse_quote(bad_tee)
