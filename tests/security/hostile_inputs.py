"""Hostile evidence for the fuzz tests: seeds, a field map of each quote, and hypothesis strategies.

Seeds are the real quotes in ``../shared/attestation/`` (plus simulated quotes of this lab, which
go through the same verifier). Every generated input records how it was made, so that a test can
tell a genuine seed from a mutated one and report what the fuzzer did.
"""

from __future__ import annotations

import base64
import dataclasses
import datetime as dt
import hashlib
import json
import random
import signal
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import cbor2
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding
from hypothesis import strategies as st

from hfl_lab.ratls import RaTlsIdentity, key_binding
from hfl_lab.ratls import evidence_ext as ext
from hfl_lab.tee import (
    AttestationPolicy,
    Collateral,
    Evidence,
    SimulatedPlatform,
    SimulatedTdProvider,
    Verifier,
    baseline_policy,
    load_collateral,
    measure_workload,
    parse_quote,
)
from hfl_lab.tee.quote import BODY_SGX
from hfl_lab.tee.reports import ENCLAVE_LAYOUT, TD10_LAYOUT, TD15_EXTRA
from tests.cert_support import self_signed
from tests.conftest import SHARED, TDX_QUOTE_IN_WINDOW, read_evidence_file

ATTESTATION = SHARED / "attestation"
#: every verification happens at this time: inside the real collateral's window, and inside
#: the simulated platform's (made for it), so that the genuine seeds verify
NOW = TDX_QUOTE_IN_WINDOW
REAL_QUOTES = (
    "dcap-qvl/tdx_quote",
    "dcap-qvl/tdx_quote_outdated",
    "dcap-qvl/sgx_quote",
    "dcap-qvl/tdx-quote.hex",
    "dcap-qvl/quote-from-tappd.hex",
    "go-tdx-guest/tdx_prod_quote_SPR_E4.dat",
    "go-tdx-guest/quote_v5_sample.dat",
    "go-tdx-guest/cos-113-tdx-quote.dat",
    "trustee/tdx_quote_4.dat",
    "trustee/tdx_quote_5.dat",
)
REAL_COLLATERALS = (
    "dcap-qvl/tdx_quote_collateral.json",
    "dcap-qvl/tdx_quote_outdated_collateral.json",
    "dcap-qvl/sgx_quote_collateral.json",
)
#: what the fuzzer may set a field to besides random bytes: boundaries of lengths and flags
INTERESTING = (b"\x00", b"\xff", b"\x7f", b"\x80", b"\x01")


@dataclass(frozen=True)
class Field:
    name: str
    start: int
    end: int


def field_map(quote: bytes) -> dict[str, Field]:
    """Byte ranges of the named fields of a parseable quote (header, body, signature data)."""
    q = parse_quote(quote)
    fields: dict[str, Field] = {}

    def add(name: str, start: int, size: int) -> int:
        fields[name] = Field(name, start, start + size)
        return start + size

    pos = 0
    for name, size in (("version", 2), ("att_key_type", 2), ("tee_type", 4), ("qe_svn", 2),
                       ("pce_svn", 2), ("qe_vendor_id", 16), ("user_data", 20)):
        pos = add(f"header.{name}", pos, size)
    if q.header.version == 5:
        pos = add("body_type", pos, 2)
        pos = add("body_size", pos, 4)
    if q.body_type == BODY_SGX:
        layout = ENCLAVE_LAYOUT
    else:
        layout = TD10_LAYOUT + (TD15_EXTRA if len(q.body.to_bytes()) > 584 else ())
    for name, size in layout:
        pos = add(f"body.{name}", pos, size)
    pos = add("signature_data_len", pos, 4)
    pos = add("signature", pos, 64)
    pos = add("attestation_key", pos, 64)
    qe = q.signature_data.qe
    if q.header.version != 3:
        pos = add("cert_data.type", pos, 2)
        pos = add("cert_data.size", pos, 4)
    if qe is not None:
        for name, size in ENCLAVE_LAYOUT:
            pos = add(f"qe_report.{name}", pos, size)
        pos = add("qe_report_signature", pos, 64)
        pos = add("qe_auth_data.size", pos, 2)
        pos = add("qe_auth_data", pos, len(qe.qe_auth_data))
        pos = add("pck_cert_data.type", pos, 2)
        pos = add("pck_cert_data.size", pos, 4)
        pos = add("pck_cert_data", pos, len(qe.pck.data))
    if pos < len(quote):
        add("trailing", pos, len(quote) - pos)
    assert pos <= len(quote)
    return fields


# -- seeds --------------------------------------------------------------------------------


def _simulated_platform() -> SimulatedPlatform:
    return SimulatedPlatform.generate(now=NOW - 3600)


PLATFORM = _simulated_platform()
SIM_ROLE = "worker0"
SIM_MEASUREMENTS = measure_workload(role=SIM_ROLE)
SIM_PROVIDER = SimulatedTdProvider(PLATFORM, SIM_MEASUREMENTS)


def sim_policy() -> AttestationPolicy:
    """The lab's mesh policy for the simulated seeds: simulated allowed, key+nonce bound."""
    m = SIM_MEASUREMENTS
    return AttestationPolicy.from_dict({
        "mr_td": m.mr_td.hex(), "allow_simulated": True, "report_data_binding": "key+nonce",
        "roles": {SIM_ROLE: {"mr_config_id": m.mr_config_id.hex()}},
    })


@dataclass(frozen=True)
class Seed:
    """One genuine quote, the verifier that judges its family, and what it must bind."""

    name: str
    quote: bytes
    family: str  # "real" | "simulated"
    binding: bytes | None  # the REPORTDATA binding a verifier checks (None: not checked)
    evidence: Evidence


def _real_seeds() -> list[Seed]:
    seeds = []
    collateral = (ATTESTATION / "dcap-qvl/tdx_quote_collateral.json").read_text()
    for name in REAL_QUOTES:
        path = ATTESTATION / name
        if not path.exists():
            continue
        quote = read_evidence_file(path)
        evidence = Evidence(quote=quote, provider="fixture", simulated=False,
                            collateral_json=collateral, produced_at=NOW)
        seeds.append(Seed(name, quote, "real", None, evidence))
    return seeds


def _simulated_seeds(count: int = 3) -> list[Seed]:
    seeds = []
    for i in range(count):
        identity = RaTlsIdentity()
        nonce = bytes([i]) * 32
        binding = key_binding(identity.spki_der, nonce)
        evidence = dataclasses.replace(SIM_PROVIDER.get_evidence(binding), produced_at=NOW)
        seeds.append(Seed(f"simulated-{i}", evidence.quote, "simulated", binding, evidence))
    return seeds


SEEDS: list[Seed] = _real_seeds() + _simulated_seeds() if ATTESTATION.is_dir() else []
FIELDS: list[dict[str, Field]] = [field_map(s.quote) for s in SEEDS]


def verifiers(*, collateral_from_evidence: bool = False) -> dict[str, Verifier]:
    """One verifier per seed family, both ending in the same ``dcap_qvl`` call.

    By default with the collateral a peer holds (a file, the lab platform's); with
    ``collateral_from_evidence`` as the trust service runs it: the collateral is whatever the
    evidence document brings, and only the trusted roots are the verifier's own.
    """
    if collateral_from_evidence:
        return {"real": Verifier(baseline_policy(), name="trust"),
                "simulated": Verifier(sim_policy(), lab_root_der=PLATFORM.root_der,
                                      name="trust")}
    real = Verifier(baseline_policy(),
                    collateral=load_collateral(ATTESTATION / REAL_COLLATERALS[0]), name="fuzz")
    sim = Verifier(sim_policy(), lab_root_der=PLATFORM.root_der,
                   lab_collateral=Collateral(PLATFORM.collateral_json, "lab platform"),
                   name="fuzz")
    return {"real": real, "simulated": sim}


def genuine_signed_regions() -> set[bytes]:
    """Signed header+body of every genuine quote a verifier here accepts: the only claims an
    accepted verdict may rest on. The seeds that verify are checked to verify."""
    judges = verifiers()
    accepted = set()
    for seed in SEEDS:
        verdict = judges[seed.family].verify(seed.evidence, binding=seed.binding, now=NOW)
        if verdict.accepted:
            accepted.add(parse_quote(seed.quote).signed_bytes())
    for quote in certificate_quotes():
        accepted.add(parse_quote(quote).signed_bytes())
    return accepted


# -- quote mutations ----------------------------------------------------------------------
#
# The generators take a ``random.Random``. The tests hand them hypothesis's own
# (``st.randoms(use_true_random=False)``): every choice is recorded, so a failure replays and
# shrinks, at a tenth of the cost of one strategy object per choice (10^5 inputs fit in CI).

#: hypothesis's controlled source of randomness for the generators below
RANDOMS = st.randoms(use_true_random=False)


@dataclass(frozen=True)
class Mutant:
    """A generated input and how it was made (the seed it started from, the operators)."""

    data: bytes
    seed: int
    ops: tuple[str, ...]

    @property
    def family(self) -> str:
        return SEEDS[self.seed].family


OPERATORS = ("truncate", "flip", "overwrite", "extend", "splice", "swap_field", "set_field",
             "delete", "duplicate")


def _mutate(rng: random.Random, data: bytearray, seed: int, op: str) -> bytearray:
    n = len(data)
    if op == "truncate":
        return data[: rng.randint(0, n - 1)]
    if op == "flip":
        for _ in range(rng.randint(1, 8)):
            data[rng.randint(0, n - 1)] ^= 1 << rng.randint(0, 7)
        return data
    if op == "overwrite":
        start = rng.randint(0, n - 1)
        blob = rng.randbytes(rng.randint(1, 16))
        data[start : start + len(blob)] = blob
        return data
    if op == "extend":
        return data + rng.randbytes(rng.randint(1, 64))
    if op == "splice":  # the head of this quote, the tail of another
        other = SEEDS[rng.randint(0, len(SEEDS) - 1)].quote
        cut = rng.randint(0, min(n, len(other)) - 1)
        return data[:cut] + other[cut:]
    if op == "delete":
        start = rng.randint(0, n - 1)
        return data[:start] + data[start + rng.randint(1, 64) :]
    if op == "duplicate":
        start = rng.randint(0, n - 1)
        return data[:start] + data[start : start + rng.randint(1, 64)] + data[start:]
    fields = FIELDS[seed]
    # the field map is the seed's: after a length-changing operator it is only approximately
    # right, which is one more kind of damage
    f = fields[rng.choice(sorted(fields))]
    if op == "swap_field":  # the same field from another quote (which may be longer/shorter)
        donors = [i for i, m in enumerate(FIELDS) if f.name in m and i != seed]
        if not donors:
            return data
        d = rng.choice(donors)
        g = FIELDS[d][f.name]
        return data[: f.start] + SEEDS[d].quote[g.start : g.end] + data[f.end :]
    # set_field: boundary values for length/flag fields, or random bytes of the field's size
    size = f.end - f.start
    fill = rng.choice((*INTERESTING, b""))
    value = (fill * size)[:size] if fill else rng.randbytes(size)
    if size in (2, 4) and rng.random() < 0.5:  # a length one off, or beyond everything
        current = int.from_bytes(data[f.start : f.end], "little")
        delta = rng.choice((-1, 1, n, -current))
        value = ((current + delta) % (1 << (8 * size))).to_bytes(size, "little")
    return data[: f.start] + value + data[f.end :]


def mutate_quote(rng: random.Random, *, max_ops: int = 3) -> Mutant:
    """A seed quote after 1..``max_ops`` mutation operators (1 in 100: unchanged)."""
    seed = rng.randint(0, len(SEEDS) - 1)
    data = bytearray(SEEDS[seed].quote)
    count = 0 if rng.randint(1, 100) == 50 else rng.randint(1, max_ops)
    ops = tuple(rng.choice(OPERATORS) for _ in range(count))
    for op in ops:
        if not data:
            break
        data = _mutate(rng, data, seed, op)
    return Mutant(bytes(data), seed, ops)


# -- evidence documents -------------------------------------------------------------------


def _scalar(rng: random.Random) -> Any:
    """A JSON value of a random type (also the ones JSON parsers find awkward)."""
    return rng.choice((
        None, True, False, 0, -1, 2**70, float("nan"), float("inf"), 1e308, "", "x" * 9,
        "\u0000", rng.randint(-(2**40), 2**40), rng.random(), rng.randbytes(6).hex(),
    ))


def _value(rng: random.Random) -> Any:
    kind = rng.randint(0, 3)
    if kind == 0:
        return [_scalar(rng) for _ in range(rng.randint(0, 3))]
    if kind == 1:
        return {rng.randbytes(3).hex(): _scalar(rng) for _ in range(rng.randint(0, 3))}
    return _scalar(rng)


def _collaterals() -> list[str]:
    texts = [(ATTESTATION / name).read_text() for name in REAL_COLLATERALS
             if (ATTESTATION / name).exists()]
    return [*texts, PLATFORM.collateral_json]


COLLATERALS = _collaterals() if ATTESTATION.is_dir() else []
#: the signed parts of every genuine collateral: an accepted verdict must rest on one of them
SIGNED_COLLATERAL = {
    (json.loads(c)["tcb_info"], json.loads(c)["qe_identity"]) for c in COLLATERALS
}


def _mutated_collateral(rng: random.Random, text: object) -> str:
    try:
        doc = json.loads(text)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        doc = None
    if not isinstance(doc, dict) or not doc:  # an earlier operator broke it: start afresh
        doc = json.loads(rng.choice(COLLATERALS))
    key = rng.choice(sorted(doc))
    how = rng.choice(("swap", "value", "edit_signed", "flip_text", "drop"))
    if how == "swap":  # the same field from another collateral
        doc[key] = json.loads(rng.choice(COLLATERALS)).get(key)
    elif how == "value":
        doc[key] = _value(rng)
    elif how == "drop":
        del doc[key]
    elif how == "edit_signed" and isinstance(doc[key], str) and doc[key].startswith("{"):
        # rewrite a claim inside the signed TCB info / QE identity without re-signing it; an
        # earlier flip may have broken that inner JSON, which then goes on as text (flip below)
        try:
            inner = json.loads(doc[key])
        except ValueError:
            inner = None
        if isinstance(inner, dict) and inner:
            inner[rng.choice(sorted(inner))] = rng.choice(
                (_value(rng), "2099-01-01T00:00:00Z", "UpToDate", []))
            doc[key] = json.dumps(inner)
    elif isinstance(doc[key], str) and doc[key]:
        value = bytearray(doc[key].encode())
        value[rng.randint(0, len(value) - 1)] = rng.randint(0x20, 0x7E)
        doc[key] = value.decode(errors="replace")
    return json.dumps(doc)


@dataclass(frozen=True)
class EvidenceDoc:
    """An evidence document as a trust service receives it, and how it was made."""

    text: str
    seed: int
    ops: tuple[str, ...]

    @property
    def family(self) -> str:
        return SEEDS[self.seed].family


EVIDENCE_OPERATORS = ("quote", "collateral", "field_type", "drop_field", "extra_field",
                      "text", "nesting_bomb", "not_an_object", "encoding")


def evidence_document(rng: random.Random) -> EvidenceDoc:
    """A seed's evidence document (quote + collateral + claims), damaged at JSON level."""
    seed = rng.randint(0, len(SEEDS) - 1)
    doc = SEEDS[seed].evidence.to_dict()
    ops = tuple(rng.choice(EVIDENCE_OPERATORS) for _ in range(rng.randint(1, 2)))
    keys = sorted(doc)
    for op in ops:
        if op == "quote":
            doc["quote"] = base64.b64encode(mutate_quote(rng, max_ops=2).data).decode()
        elif op == "collateral":
            doc["collateral"] = _mutated_collateral(rng, doc.get("collateral"))
        elif op == "field_type":
            doc[rng.choice(keys)] = _value(rng)
        elif op == "drop_field":
            doc.pop(rng.choice(keys), None)
        elif op == "extra_field":
            doc[rng.randbytes(4).hex()] = _value(rng)
        elif op == "encoding":
            doc["report_data_encoding"] = rng.choice(("raw", "sha256-hex", "", "RAW"))
        elif op == "nesting_bomb":  # deeper than any JSON parser's recursion limit
            depth = rng.randint(1_000, 100_000)
            return EvidenceDoc("[" * depth + "]" * depth, seed, ops)
        elif op == "not_an_object":
            return EvidenceDoc(json.dumps(_value(rng)), seed, ops)
    text = json.dumps(doc)
    if "text" in ops:  # byte damage to the document itself, maybe cut short
        raw = bytearray(text.encode())
        for _ in range(rng.randint(1, 4)):
            raw[rng.randint(0, len(raw) - 1)] = rng.randint(0, 255)
        text = raw[: rng.randint(0, len(raw))].decode(errors="replace")
    return EvidenceDoc(text, seed, ops)


# -- RA-TLS certificates ------------------------------------------------------------------

CERT_OPERATORS = ("der", "extension_bytes", "quote", "claims", "legacy", "no_extension")
#: the challenge the seed certificates bind (as a mesh certificate binds the trust service's)
CERT_NONCE = bytes(range(32))


def _claims(rng: random.Random, spki_hash: bytes, nonce: bytes) -> bytes:
    """A claims buffer: well-formed but for one hostile claim, or garbage."""
    lab = ext.lab_claims(SEEDS[-1].evidence, SIM_ROLE)
    claims: dict[str, Any] = {ext.PUBKEY_HASH: cbor2.dumps([ext.SHA256_ID, spki_hash]),
                              ext.NONCE: nonce, ext.LAB_CLAIM: lab}
    which = rng.choice((ext.PUBKEY_HASH, ext.NONCE, ext.LAB_CLAIM, "raw"))
    if which == "raw":
        return rng.randbytes(rng.randint(1, 200))
    hostile = rng.choice((
        _value(rng), rng.randbytes(rng.randint(0, 70)),
        [rng.choice((1, 7, 8, 0, -1, 99)), rng.randbytes(rng.choice((0, 31, 32, 48, 64)))],
        {k: _scalar(rng) for k in rng.sample(sorted(ext._LAB_TYPES), 2)},
    ))
    if which == ext.PUBKEY_HASH and isinstance(hostile, list) and rng.random() < 0.7:
        hostile = cbor2.dumps(hostile)  # a serialized hash entry, as the claim must be
    claims[which] = hostile
    return cbor2.dumps(claims)


@dataclass(frozen=True)
class CertInput:
    data: bytes  # DER, as a peer presents it in its TLS handshake
    ops: tuple[str, ...]


def hostile_certificate(rng: random.Random) -> CertInput:
    """An RA-TLS certificate with damaged evidence, damaged claims, or damaged DER
    (1 in 100: a genuine one, so that the oracle is seen to accept what it should)."""
    identity = _IDENTITIES[rng.randint(0, len(_IDENTITIES) - 1)]
    assert identity.certificate is not None
    genuine = _GENUINE_DER[_IDENTITIES.index(identity)]
    if rng.randint(1, 100) == 50:
        return CertInput(genuine, ())
    op = rng.choice(CERT_OPERATORS)
    if op == "der":  # byte damage to a whole genuine certificate, maybe cut short
        der = bytearray(genuine)
        for _ in range(rng.randint(1, 6)):
            der[rng.randint(0, len(der) - 1)] = rng.randint(0, 255)
        return CertInput(bytes(der[: rng.randint(len(der) // 2, len(der))]), (op,))
    own = ext.decode_dice_extension(_dice_value(identity))  # its evidence binds its key
    spki_hash = hashlib.sha256(identity.spki_der).digest()
    oid: x509.ObjectIdentifier | None = ext.DICE_EVIDENCE_OID
    if op == "quote":
        value = ext.encode_dice_extension(mutate_quote(rng, max_ops=2).data or b"\0",
                                          own.claims_buffer)
    elif op == "claims":
        value = ext.encode_dice_extension(own.quote, _claims(rng, spki_hash, CERT_NONCE))
    elif op == "extension_bytes":  # damage the CBOR framing (first bytes) or anywhere
        raw = bytearray(ext.encode_dice_extension(own.quote, own.claims_buffer))
        hi = rng.choice((16, len(raw)))
        for _ in range(rng.randint(1, 4)):
            raw[rng.randint(0, hi - 1)] = rng.randint(0, 255)
        value = bytes(raw[: rng.randint(1, len(raw))])
    elif op == "legacy":  # Gramine's legacy extension: the raw (damaged) quote
        oid = rng.choice(ext.LEGACY_QUOTE_OIDS)
        value = mutate_quote(rng, max_ops=2).data or b"\0"
    else:
        oid, value = None, b""
    return CertInput(_certificate(identity, oid, value), (op,))


def _dice_value(identity: RaTlsIdentity) -> bytes:
    assert identity.certificate is not None
    value = identity.certificate.extensions.get_extension_for_oid(ext.DICE_EVIDENCE_OID).value
    assert isinstance(value, x509.UnrecognizedExtension)
    return value.value


def certificate_quotes() -> list[bytes]:
    """The genuine quotes the seed certificates carry (each binds its certificate's key)."""
    return [ext.decode_dice_extension(_dice_value(i)).quote for i in _IDENTITIES]


def _certificate(identity: RaTlsIdentity, oid: Any, value: bytes) -> bytes:
    extensions = [x509.UnrecognizedExtension(oid, value)] if oid is not None else []
    # valid at NOW, the verification time of the simulated platform's collateral
    since = dt.timedelta(seconds=time.time() - NOW + 86_400)
    cert = self_signed(identity.private_key, cn=SIM_ROLE, extensions=extensions,
                       valid_since=since, valid_for=dt.timedelta(days=1))
    return cert.public_bytes(Encoding.DER)


def _identities(count: int = 2) -> list[RaTlsIdentity]:
    out = []
    for _ in range(count):
        identity = RaTlsIdentity()
        identity.make_certificate(SIM_PROVIDER, subject_cn=SIM_ROLE, role=SIM_ROLE,
                                  challenge=CERT_NONCE)
        out.append(identity)
    return out


_IDENTITIES = _identities() if SEEDS else []
#: made once: a certificate's length varies with its random serial and ECDSA signature, and
#: the generators must draw the same way every time hypothesis replays them
_GENUINE_DER = [_certificate(i, ext.DICE_EVIDENCE_OID, _dice_value(i)) for i in _IDENTITIES]


# -- bounds -------------------------------------------------------------------------------


class InputHang(Exception):
    """One input ran past its time bound."""


@contextmanager
def time_bound(cpu_seconds: float) -> Iterator[Callable[[], float]]:
    """Interrupt the block with ``InputHang`` once it has used ``cpu_seconds`` of CPU.

    A CPU timer (SIGPROF), because pytest-timeout owns the wall-clock one (SIGALRM) and the
    parsers and verifiers under test do no I/O: a hang there is a loop. Yields a function
    giving the wall time elapsed, for the report.
    """
    started = time.perf_counter()

    def expire(signum: int, frame: object) -> None:
        raise InputHang(f"input still running after {cpu_seconds} s of CPU time")

    previous = signal.signal(signal.SIGPROF, expire)
    signal.setitimer(signal.ITIMER_PROF, cpu_seconds)
    try:
        yield lambda: time.perf_counter() - started
    finally:
        signal.setitimer(signal.ITIMER_PROF, 0)
        signal.signal(signal.SIGPROF, previous)
