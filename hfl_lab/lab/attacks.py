"""Notebook 06: live attacks on the lab, each refused by a real component, with its reason.

- a worker whose code differs by one byte (its MR_TD differs): the trust service refuses it;
- a DEBUG TD: refused (its memory is readable by the host);
- a MITM server relaying the trust service's genuine evidence under its own key: the lab's
  client refuses it before sending anything (the evidence does not bind the MITM's key);
- a client without attestation asking for the volume key: the key broker refuses it;
- where skopeo, umoci, docker-registry and gnupg are installed, three attacks on the workload
  image (issue 19): an image someone pushed under the run's tag without the owner's signature
  and one whose layer was changed after signing (a participant's pull through the owner's
  ``signedBy`` policy refuses both), and a client without attestation asking for the image's
  layer key (the key broker refuses it).

Genuine participants are attested first (the control), so the matrix shows that the defenses
refuse the attacks and only the attacks. Verdict tables come from :mod:`hfl_lab.attestation`.
"""

from __future__ import annotations

import datetime as dt
import json
import re
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from hfl_lab._exceptions import AttestationError, ConfigError, ImageRefused, PolicyViolation
from hfl_lab._x509 import self_signed
from hfl_lab.attestation import verify_endpoint
from hfl_lab.events import LabEvent
from hfl_lab.image import (
    IMAGE_APP_ID,
    LAYER_KEY_NAME,
    LabRegistry,
    LayerKey,
    PublishedImage,
    ToolRunner,
    image_release_policy,
    missing_tools,
    publish_workload_image,
    pull_image,
    register_layer_key,
)
from hfl_lab.image.layout import build_workload_image
from hfl_lab.image.signing import owner_push_policy
from hfl_lab.lab.notebook import Table, TableReport
from hfl_lab.lab.trust import LabTrustService, VerdictView
from hfl_lab.ratls import evidence_ext
from hfl_lab.ratls.binding import spki_der
from hfl_lab.ratls.peer import fetch_server_certificate
from hfl_lab.tee.sim.measure import measure_workload, source_files
from hfl_lab.tee.verdict import Check, Verdict
from hfl_lab.trust.broker import DEFAULT_APP_ID
from hfl_lab.trust.client import TrustClient
from hfl_lab.trust.proto import trust_pb2 as pb
from hfl_lab.trust.service import TrustService, event_for, serve
from hfl_lab.vault.keyrelease import VOLUME_SECRET_NAME

__all__ = [
    "ATTACKS",
    "AttackOutcome",
    "AttackReport",
    "debug_td",
    "image_attacks",
    "mitm_server",
    "modified_worker",
    "run_attacks",
    "tampered_image_layer",
    "unattested_key_request",
    "unattested_layer_key_request",
    "unsigned_image",
]

_REPO = Path(__file__).resolve().parents[2]
#: a verdict subject that is a participant's role (an attacker posing as it)
_POSED_AS = re.compile(r"^(trust|ps\d+|worker\d+)\b")
#: the file whose one byte the modified worker changes (the worker's own code when present)
TAMPERED_FILES = ("trainer/worker.py", "trainer/model.py", "trainer/__init__.py")


@dataclass
class AttackOutcome:
    """One attack: what the attacker did, whether (and by whom, why) it was refused."""

    name: str
    attempt: str
    refused: bool
    refused_by: str
    reason: str
    verdict: Verdict | None = None
    details: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "attempt": self.attempt,
            "refused": self.refused,
            "refused_by": self.refused_by,
            "reason": self.reason,
            "details": self.details,
            "verdict": self.verdict.to_dict() if self.verdict is not None else None,
        }

    def verdict_view(self) -> VerdictView | None:
        if self.verdict is None:
            return None
        return VerdictView(self.verdict, f"{self.name}: the verdict behind the refusal")


@dataclass(repr=False)  # shown as its table (TableReport)
class AttackReport(TableReport):
    """Every attack of the run; ``raise_if_any_succeeded`` fails the notebook if a defense fell."""

    outcomes: list[AttackOutcome]
    controls: list[str] = field(default_factory=list)

    def table(self) -> Table:
        table = Table(("attack", "what the attacker did", "refused", "by", "reason"),
                      title="attacks and defenses")
        for o in self.outcomes:
            table.add(o.name, o.attempt, o.refused, o.refused_by, o.reason,
                      color="#dafbe1" if o.refused else "#ffebe9")
        if self.controls:
            table.note = "controls (genuine, accepted): " + "; ".join(self.controls)
        return table

    def to_dict(self) -> dict[str, Any]:
        return {
            "attacks": [o.to_dict() for o in self.outcomes],
            "refused": sum(o.refused for o in self.outcomes),
            "controls": self.controls,
        }

    def save(self, folder: str | Path) -> Path:
        path = Path(folder) / "attacks.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_dict(), indent=2) + "\n", encoding="utf-8")
        return path

    def subject_labels(self) -> dict[str, str]:
        """Each attacker that posed as a participant, named by its attack: ``worker0`` →
        ``modified worker code (as worker0)``, so the real worker0 does not look refused.
        Attacks on one role share its label."""
        names: dict[str, list[str]] = {}
        roles: dict[str, str] = {}
        for o in self.outcomes:
            subject = o.verdict.subject if o.verdict is not None else ""
            posed = _POSED_AS.match(subject)
            if posed is not None:
                names.setdefault(subject, []).append(o.name)
                roles[subject] = posed[1]
        return {subject: f"{' / '.join(attacks)} (as {roles[subject]})"
                for subject, attacks in names.items()}

    def raise_if_any_succeeded(self) -> None:
        accepted = [o.name for o in self.outcomes if not o.refused]
        if accepted:
            raise AttestationError(
                f"attack(s) not refused: {', '.join(accepted)}; the lab's defenses are broken.",
                check="defenses",
                fix="do not use this build of the lab; run the security tests (make reliability).",
            )


# ---------------------------------------------------------------------- the attacks


def _refused_by_trust(
    trust: LabTrustService, role: str, attempt: str, name: str, provider: Any
) -> AttackOutcome:
    """Ask the trust service for a mesh certificate with ``provider``'s evidence."""
    before = len(trust.events)
    try:
        with trust.client() as client:
            client.attest(role, provider)
    except PolicyViolation as e:
        verdict = _last_verdict(trust, before)
        reason = verdict.reason if verdict is not None else e.message
        return AttackOutcome(name, attempt, True, "trust service", reason, verdict)
    return AttackOutcome(name, attempt, False, "", "a mesh certificate was issued")


def _last_verdict(trust: LabTrustService, since: int) -> Verdict | None:
    """The trust service's verdict event after ``since``, as a Verdict (for the table)."""

    for event in reversed(trust.events[since:]):
        if event.kind == "attestation":
            data = event.data
            verdict = Verdict(
                checks=[Check(**c) for c in data.get("checks", [])],
                simulated=bool(data.get("simulated")),
                measurements=dict(data.get("measurements") or {}),
                subject=str(data.get("subject", "")),
                verifier=str(data.get("verifier", "")),
            )
            return verdict
    return None


def _one_byte_changed_copy(dest: Path) -> tuple[str, int, str, str]:
    """Copy the workload sources to ``dest`` and flip the case of one letter of one file."""
    for file in source_files(_REPO):
        target = dest / file.relative_to(_REPO)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(file, target)
    name = next(n for n in TAMPERED_FILES if (dest / n).is_file())
    data = bytearray((dest / name).read_bytes())
    offset = next(i for i, b in enumerate(data) if chr(b).isalpha())
    old = chr(data[offset])
    data[offset] = ord(old.swapcase())
    (dest / name).write_bytes(bytes(data))
    return name, offset, old, old.swapcase()


def modified_worker(trust: LabTrustService, role: str = "worker0") -> AttackOutcome:
    """A worker built from the lab's code with one byte changed asks to join the mesh."""
    run = {"run_dir": str(Path(trust.config.run_dir).resolve()), "workers": trust.config.workers}
    with tempfile.TemporaryDirectory(prefix="hfl-lab-tampered-") as tmp:
        name, offset, old, new = _one_byte_changed_copy(Path(tmp))
        measured = measure_workload(role=role, config=run, root=Path(tmp))
    genuine = trust.measurements[role].mr_td.hex()
    attempt = (
        f"{role} runs code with one byte changed ({name} offset {offset}: {old!r} → {new!r}); "
        f"MR_TD {measured.mr_td.hex()[:16]}… instead of {genuine[:16]}…"
    )
    outcome = _refused_by_trust(
        trust, role, attempt, "modified worker code", trust.provider(role, measured)
    )
    outcome.details = {"file": name, "offset": offset, "mr_td": measured.mr_td.hex(),
                       "genuine_mr_td": genuine}
    return outcome


def debug_td(trust: LabTrustService, role: str = "worker1") -> AttackOutcome:
    """The genuine worker code, but in a DEBUG TD (the host can read its memory)."""
    if role not in trust.measurements:
        role = "worker0"
    attempt = f"{role} with the genuine code, launched as a DEBUG TD (TD attribute bit 0 set)"
    return _refused_by_trust(
        trust, role, attempt, "DEBUG TD", trust.provider(role, debug=True)
    )


def _mitm_certificate(genuine: x509.Certificate) -> tuple[bytes, bytes]:
    """The attacker's own key, in a certificate that copies the genuine RA-TLS evidence."""
    key = ec.generate_private_key(ec.SECP256R1())
    evidence = genuine.extensions.get_extension_for_oid(evidence_ext.DICE_EVIDENCE_OID).value
    cert = self_signed(
        key, genuine.subject, valid_for=dt.timedelta(hours=1),
        extensions=[x509.SubjectAlternativeName([x509.DNSName("trust"), x509.DNSName("localhost")]),
                    evidence],
    )
    key_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    return cert.public_bytes(serialization.Encoding.PEM), key_pem


def mitm_server(trust: LabTrustService) -> AttackOutcome:
    """A server in the middle presents the trust service's genuine evidence with its own key."""

    host, _, port = trust.address.rpartition(":")
    genuine = fetch_server_certificate(host, int(port))
    cert_pem, key_pem = _mitm_certificate(genuine)
    rogue = TrustService(policy=trust.policy, admin_token=b"m" * 32)  # accepts whatever it gets
    server, rogue_port = serve(rogue, cert_pem, key_pem)
    address = f"127.0.0.1:{rogue_port}"
    attempt = (
        f"a MITM at {address} relays the trust service's genuine evidence in a certificate "
        "for its own key, hoping the lab hands it the policy and the volume key"
    )
    try:
        verdict = verify_endpoint(
            address, trust.policy.replace(report_data_binding="key"),
            lab_root=trust.lab_root_der, role="trust",
        )
        verdict.verifier, verdict.subject = "lab", "trust (MITM)"
        trust.publish(event_for(verdict))
        try:  # the lab's own client, misdirected to the MITM
            TrustClient.connect(
                address, trust.policy, lab_root_der=trust.lab_root_der, role="trust"
            ).close()
            handed = True
        except AttestationError:
            handed = False
    finally:
        server.stop(0)
    refused = not verdict.accepted and not handed
    return AttackOutcome(
        "MITM server", attempt, refused, "the lab's client (before sending anything)",
        verdict.reason, verdict, {"address": address},
    )


def unattested_key_request(
    trust: LabTrustService, role: str = "owner", *, app_id: str = DEFAULT_APP_ID,
    name: str = VOLUME_SECRET_NAME, subject: str = "client without attestation",
) -> AttackOutcome:
    """A client with no TD evidence at all asks the key broker for a secret (the volume key)."""

    secret = f"{app_id}/{name}"
    attempt = f"a client without attestation asks for {secret} as {role}"
    key = ec.generate_private_key(ec.SECP256R1())
    with trust.client() as client:
        challenge = client.stub.GetChallenge(pb.ChallengeRequest(role=role), timeout=30)
        request = pb.ReleaseRequest(
            app_id=app_id, name=name, role=role, nonce=challenge.nonce,
            public_key=spki_der(key.public_key()), evidence_json="",
        )
        try:
            client.stub.ReleaseSecret(request, timeout=30)
        except grpc.RpcError as e:
            detail = str(e.details()) if hasattr(e, "details") else str(e)
            reason = f"{e.code().name}: {detail}" if hasattr(e, "code") else detail
            refused = True
        else:
            reason, refused = "the key was released", False
    verdict = Verdict(evidence_kind="none", subject=subject, verifier="key-broker")
    verdict.add("evidence", False, "TDX evidence binding the key and the challenge", "none",
                reason)
    trust.publish(event_for(verdict))
    return AttackOutcome("client without attestation", attempt, refused, "key broker", reason,
                         verdict)


# ---------------------------------------------------------------------- the workload image


@contextmanager
def _published_image() -> Iterator[tuple[LabRegistry, PublishedImage, LayerKey, Path]]:
    """The lab's workload image, built, encrypted, signed and pushed to a registry of its own
    (stopped afterwards), and the layer key the trust service would hold."""
    with tempfile.TemporaryDirectory(prefix="hfl-lab-image-attack-") as tmp:
        runner = ToolRunner()
        key = LayerKey()
        with LabRegistry(Path(tmp) / "registry", runner) as registry:
            registry.start()
            published = publish_workload_image(Path(tmp) / "image", registry, key.public_pem,
                                               root=_REPO, runner=runner)
            yield registry, published, key, Path(tmp)


def _pull_outcome(name: str, attempt: str, published: PublishedImage, key: LayerKey,
                  folder: Path, trust: LabTrustService) -> AttackOutcome:
    """A participant's pull through the owner's policy; refused or not, as a verdict."""
    try:
        pull_image(published.source, key.private_pem(), folder / "worker0", who="worker0")
    except ImageRefused as refusal:
        reason, refused = refusal.message, True
    else:
        reason, refused = "the image was pulled, decrypted and unpacked", False
    verdict = Verdict(evidence_kind="image", subject=name, verifier="image policy")
    verdict.add("signature", not refused, "signed by the run's key over this manifest",
                "refused" if refused else "accepted", reason)
    trust.publish(event_for(verdict))
    return AttackOutcome(name, attempt, refused, "the participant's pull (signature policy)",
                         reason, verdict)


def unsigned_image(trust: LabTrustService) -> AttackOutcome:
    """Someone with push access replaces the run's image tag with an image of their own."""
    with _published_image() as (registry, published, key, folder):
        copy = folder / "tampered"
        _one_byte_changed_copy(copy)
        runner = ToolRunner()
        theirs = build_workload_image(runner, copy, folder / "theirs")
        push_policy = folder / "push-policy.json"
        push_policy.write_text(json.dumps(owner_push_policy()))
        runner.run("push", ["skopeo", "copy", "--quiet", "--policy", str(push_policy),
                            "--dest-cert-dir", str(registry.cert_dir), theirs.reference,
                            f"docker://{published.source.reference}"])
        attempt = (f"an image with one byte changed, pushed without the owner's signature "
                   f"under the tag the participants pull ({published.source.reference})")
        return _pull_outcome("unsigned image", attempt, published, key, folder, trust)


def tampered_image_layer(trust: LabTrustService) -> AttackOutcome:
    """The registry's storage admin changes one byte of the signed image's (encrypted) layer."""
    with _published_image() as (registry, published, key, folder):
        digest = published.encrypted.layers[0].digest
        blob = next((registry.folder / "storage").rglob(f"{digest.split(':')[1]}/data"))
        data = bytearray(blob.read_bytes())
        data[len(data) // 2] ^= 0x01
        blob.write_bytes(bytes(data))
        attempt = f"one byte of the signed image's layer {digest[:19]}… changed in the registry"
        return _pull_outcome("image layer modified after signing", attempt, published, key,
                             folder, trust)


def unattested_layer_key_request(trust: LabTrustService, role: str = "worker0") -> AttackOutcome:
    """The owner registers the image's layer key for ps0 and the workers; a client with no TD
    evidence asks for it."""
    key = LayerKey()
    roles = {r: m for r, m in trust.measurements.items() if r.startswith(("ps", "worker"))}
    with trust.client() as client:
        register_layer_key(client, key, image_release_policy(roles, base=trust.policy),
                           trust.admin_token)
    del key
    outcome = unattested_key_request(trust, role, app_id=IMAGE_APP_ID, name=LAYER_KEY_NAME,
                                     subject="client without attestation (layer key)")
    outcome.name = "layer key without attestation"
    return outcome


Attack = Callable[[LabTrustService], AttackOutcome]
ATTACKS: dict[str, Attack] = {
    "modified worker code": modified_worker,
    "DEBUG TD": debug_td,
    "MITM server": mitm_server,
    "client without attestation": unattested_key_request,
}
#: the workload image's attacks: they need the image tools (``make system-deps``)
IMAGE_ATTACKS: dict[str, Attack] = {
    "unsigned image": unsigned_image,
    "image layer modified after signing": tampered_image_layer,
    "layer key without attestation": unattested_layer_key_request,
}


def image_attacks() -> dict[str, Attack]:
    """The image attacks this machine can run: all three, or none without the tools."""
    return {} if missing_tools() else dict(IMAGE_ATTACKS)


def _controls(trust: LabTrustService) -> list[str]:
    """The genuine parties get in: the lab verifies the trust service, ps0 attests and receives
    the volume key. So the matrix shows that the defenses refuse the attacks, not everyone."""
    done = []
    if trust.verify().accepted:
        done.append("the lab verified the trust service")
    with trust.client() as client:
        client.attest("ps0", trust.provider("ps0"))
    done.append("ps0 attested")
    trust.release_volume_key("ps0")
    done.append("volume key released to ps0")
    return done


def run_attacks(
    trust: LabTrustService,
    on_outcome: Callable[[AttackOutcome], None] | None = None,
    names: list[str] | None = None,
) -> AttackReport:
    """The controls, then every attack (or those in ``names``), live against ``trust``."""
    known = {**ATTACKS, **IMAGE_ATTACKS}
    unknown = sorted(set(names or ()) - set(known))
    if unknown:
        raise ConfigError(
            f"unknown attack(s) {', '.join(unknown)}.", fix=f"use: {', '.join(known)}."
        )
    report = AttackReport([], _controls(trust))
    for name, attack in {**ATTACKS, **image_attacks()}.items():
        if names is not None and name not in names:
            continue
        outcome = attack(trust)
        report.outcomes.append(outcome)
        trust.publish(
            LabEvent("log", "lab", {"level": "info", "message": f"attack {name}: "
                                    f"{'refused' if outcome.refused else 'NOT refused'}"})
        )
        if on_outcome is not None:
            on_outcome(outcome)
    return report
