"""R2 hostile peers: eight kinds of peer that must not exchange one tensor or obtain one secret.

Each case runs against a real trust service (with its key broker holding the volume secret) and
a real PS on the attested mesh, with a legitimate worker0 connected. The hostile peer tries
everything it can with what it has: a mesh certificate from the trust service, the volume
secret from the key broker, and a push and a pull at the PS. The figures are the servers' own
counters: ``ParameterServer.tensors_received / tensors_sent`` (tensors_exchanged),
``KeyBroker.released`` (secrets_released) and ``TrustService.issued`` (certificates_issued),
read before and after the attack.

Where a case would need a certificate the trust service refuses to issue (DEBUG TD, wrong
MR_TD), the PS is also tried with one the mesh CA signed without the trust service's checks:
the PS's own pairwise check of the evidence must refuse it too (defence in depth).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from cryptography.hazmat.primitives.serialization import Encoding

from hfl_lab.config import LabConfig
from hfl_lab.ratls import RaTlsIdentity, key_binding, read_evidence
from hfl_lab.tee import AttestationPolicy, SimulatedPlatform, SimulatedTdProvider, measure_workload
from hfl_lab.trust.broker import DEFAULT_APP_ID
from hfl_lab.trust.client import MeshCredentials
from hfl_lab.trust.mesh_ca import MeshCA
from hfl_lab.trust.proto import trust_pb2 as tpb
from tests.mesh_support import Mesh, start_mesh
from tests.reliability_report import record
from tests.td_support import provider
from tests.trust_support import connect
from trainer.model import ResNet
from trainer.proto import parameter_server_pb2 as pb
from trainer.ps import ParameterServer
from trainer.serving import channel_factory, model_specs, parameter_server
from trainer.worker import PsConnection

REPO = Path(__file__).resolve().parents[2]
SECRET_NAME = "volume"
CASES = ("no_certificate", "foreign_ca", "replayed_nonce", "stale_evidence", "debug_td",
         "wrong_mr_td", "second_process_same_certificate", "expired_mesh_certificate")


@dataclass
class Lab:
    """The servers under attack, the legitimate worker0, and the servers' counters."""

    mesh: Mesh
    servicer: ParameterServer
    address: str
    model: ResNet
    legit: PsConnection
    attempts: list[dict[str, str]] = field(default_factory=list)

    def counters(self) -> dict[str, int]:
        return {
            "tensors_exchanged": self.servicer.tensors_exchanged,
            "secrets_released": self.mesh.trust.service.broker.released,
            "certificates_issued": self.mesh.trust.service.issued,
        }

    def gradients(self) -> dict[str, np.ndarray]:
        return {s.name: np.full(s.shape, 1e-3, np.float32) for s in model_specs(self.model)}

    # -- what a hostile peer tries at the trust service -------------------------------------

    def trust_rpc(self, what: str, call: Callable[[Any], Any]) -> None:
        with connect(self.mesh.trust) as client:
            try:
                call(client.stub)
            except grpc.RpcError as e:
                self.attempts.append({"server": "trust", "rpc": what, "code": e.code().name,
                                      "details": e.details() or ""})
                return
        self.attempts.append({"server": "trust", "rpc": what, "code": "OK", "details": ""})

    def challenge(self) -> bytes:
        with connect(self.mesh.trust) as client:
            nonce: bytes = client.stub.GetChallenge(tpb.ChallengeRequest(role="worker0")).nonce
        return nonce

    def attest(self, role: str, nonce: bytes, spki: bytes, evidence_json: str) -> None:
        self.trust_rpc("Attest", lambda stub: stub.Attest(tpb.AttestRequest(
            role=role, nonce=nonce, public_key=spki, evidence_json=evidence_json), timeout=30))

    def release(self, role: str, nonce: bytes, spki: bytes, evidence_json: str) -> None:
        self.trust_rpc("ReleaseSecret", lambda stub: stub.ReleaseSecret(tpb.ReleaseRequest(
            app_id=DEFAULT_APP_ID, name=SECRET_NAME, role=role, nonce=nonce, public_key=spki,
            evidence_json=evidence_json), timeout=30))

    def with_evidence(self, prov: SimulatedTdProvider, *, role: str = "ps0",
                      nonce: bytes | None = None) -> None:
        """Ask for a mesh certificate (as worker0) and for the secret (as ps0) with evidence
        from ``prov`` bound to a fresh key and (by default) a fresh challenge each."""
        for ask in (self.attest, self.release):
            identity = RaTlsIdentity()
            n = nonce if nonce is not None else self.challenge()
            evidence = prov.get_evidence(key_binding(identity.spki_der, n))
            ask("worker0" if ask == self.attest else role, n, identity.spki_der,
                evidence.to_json())

    # -- what it tries at the PS ------------------------------------------------------------

    def at_ps(self, key_pem: bytes | None, cert_pem: bytes | None, role: str = "worker0",
              index: int = 0) -> None:
        """Register, push and pull on its own connection with these credentials."""
        ca = self.mesh.creds["ps0"].ca_pem
        channel = grpc.secure_channel(
            self.address, grpc.ssl_channel_credentials(ca, key_pem, cert_pem),
            options=[("grpc.ssl_target_name_override", "ps0"),
                     ("grpc.use_local_subchannel_pool", 1)])
        conn = PsConnection(channel, timeout_s=30)
        header = pb.StreamHeader(kind=pb.UPDATE_KIND_GRADIENTS,
                                 model_version=self.servicer.version, worker_id=role,
                                 num_samples=8)
        calls: dict[str, Callable[[], Any]] = {
            "Register": lambda: conn.register(role, index),
            "PushUpdate": lambda: conn.push(self.gradients(), header),
            "PullParameters": lambda: conn.pull(role, 0, model_specs(self.model)),
        }
        for what, call in calls.items():
            try:
                call()
            except grpc.RpcError as e:
                self.attempts.append({"server": "ps0", "rpc": what, "code": e.code().name,
                                      "details": e.details() or ""})
            else:
                self.attempts.append({"server": "ps0", "rpc": what, "code": "OK",
                                      "details": ""})
        conn.close()

    def at_ps_with(self, creds: MeshCredentials, role: str = "worker0", index: int = 0) -> None:
        self.at_ps(creds.identity.private_key_pem(), creds.certificate_pem, role, index)

    def ratls_self_signed(self, prov: SimulatedTdProvider) -> None:
        """The PS tried with a self-made RA-TLS certificate carrying ``prov``'s evidence."""
        identity = RaTlsIdentity()
        identity.make_certificate(prov, subject_cn="worker0", role="worker0")
        self.at_ps(identity.private_key_pem(), identity.certificate_pem)


def release_policy() -> AttestationPolicy:
    """The volume secret: for ps0's measurements only."""
    m = measure_workload(role="ps0")
    return AttestationPolicy.from_dict({
        "mr_td": m.mr_td.hex(), "mr_config_id": m.mr_config_id.hex(),
        "allow_simulated": True, "report_data_binding": "key+nonce", "roles": {"ps0": {}},
    })


@pytest.fixture()
def lab(tmp_path: Path) -> Iterator[Lab]:
    mesh = start_mesh(tmp_path, workers=2)
    model = ResNet(8, seed=0)
    config = LabConfig.profile("quick", depth=8, workers=2, steps=50, aggregation="sync",
                               eval_every=0, checkpoint_every=0)
    servicer = parameter_server(config, num_train=1000, model=model)
    address = mesh.serve(servicer, num_workers=2)
    with connect(mesh.trust) as client:
        client.register_secret(DEFAULT_APP_ID, SECRET_NAME, os.urandom(32),
                               release_policy(), mesh.trust.admin)
        # the legitimate ps0 gets it: the broker's counter counts
        client.release_secret(DEFAULT_APP_ID, SECRET_NAME, "ps0",
                              provider("ps0", measure_workload(role="ps0")))
    legit = PsConnection(mesh.connect("worker0", address)())
    legit.register("worker0", 0)
    running = Lab(mesh, servicer, address, model, legit)
    header = pb.StreamHeader(kind=pb.UPDATE_KIND_GRADIENTS, model_version=0,
                             worker_id="worker0", num_samples=8)
    assert legit.push(running.gradients(), header)[0].accepted
    legit.pull("worker0", 0, model_specs(model))  # worker0 is live: it just pulled
    assert servicer.tensors_exchanged > 0 and mesh.trust.service.broker.released == 1
    yield running
    legit.close()
    servicer.close()
    mesh.close()


def misissued_certificate(lab: Lab, prov: SimulatedTdProvider) -> MeshCredentials:
    """A certificate the mesh CA signed for ``prov``'s evidence without the trust service's
    checks (a misconfigured or bypassed issuance): what only the PS's own check can stop."""
    identity = RaTlsIdentity()
    nonce = os.urandom(32)
    evidence = prov.get_evidence(key_binding(identity.spki_der, nonce))
    ca = lab.mesh.trust.service.ca
    cert = ca.issue("worker0", identity.spki_der, evidence, nonce, 600)
    return MeshCredentials(identity, cert.public_bytes(Encoding.PEM), ca.certificate_pem,
                           cert.not_valid_after_utc.timestamp(), {})


def clone_process(lab: Lab, creds: MeshCredentials, role: str, index: int) -> dict[str, Any]:
    """Run tests/security/clone_peer.py with ``creds`` in a second process."""
    job = {
        "address": lab.address, "role": role, "index": index,
        "ca_pem": creds.ca_pem.decode(), "cert_pem": creds.certificate_pem.decode(),
        "key_pem": creds.identity.private_key_pem().decode(),
        "shapes": [(s.name, list(s.shape)) for s in model_specs(lab.model)],
        "version": lab.servicer.version,
    }
    done = subprocess.run([sys.executable, "-m", "tests.security.clone_peer"], cwd=REPO,
                          input=json.dumps(job) + "\n", capture_output=True, text=True,
                          timeout=120, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    results: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return results


def attack(lab: Lab, case: str) -> dict[str, Any]:
    """Run the hostile peer of ``case``; returns what the case adds to its record."""
    mesh = lab.mesh
    extra: dict[str, Any] = {}
    if case == "no_certificate":
        lab.at_ps(None, None)
        identity = RaTlsIdentity()
        lab.attest("worker0", lab.challenge(), identity.spki_der, "")
        lab.release("ps0", lab.challenge(), identity.spki_der, "")
    elif case == "foreign_ca":
        # another lab: its own attestation root and its own mesh CA
        foreign = SimulatedPlatform.generate()
        prov = SimulatedTdProvider(foreign, measure_workload(role="worker0"))
        identity = RaTlsIdentity()
        nonce = os.urandom(32)
        evidence = prov.get_evidence(key_binding(identity.spki_der, nonce))
        cert = MeshCA("foreign-lab").issue("worker0", identity.spki_der, evidence, nonce, 600)
        lab.at_ps(identity.private_key_pem(), cert.public_bytes(Encoding.PEM))
        lab.with_evidence(SimulatedTdProvider(foreign, measure_workload(role="ps0")))
    elif case == "replayed_nonce":
        # a recorded exchange of the legitimate ps0 with the key broker, and of worker0's
        # attestation, played back (with their key, and with the attacker's own)
        ps0 = provider("ps0", measure_workload(role="ps0"))
        victim, attacker = RaTlsIdentity(), RaTlsIdentity()
        nonce = lab.challenge()
        recorded = ps0.get_evidence(key_binding(victim.spki_der, nonce)).to_json()
        with connect(mesh.trust) as client:
            client.stub.ReleaseSecret(tpb.ReleaseRequest(
                app_id=DEFAULT_APP_ID, name=SECRET_NAME, role="ps0", nonce=nonce,
                public_key=victim.spki_der, evidence_json=recorded))
        before = lab.counters()
        for spki in (victim.spki_der, attacker.spki_der):
            lab.release("ps0", nonce, spki, recorded)
        used = read_evidence(mesh.creds["worker0"].certificate_pem)  # its nonce is spent
        assert used.nonce is not None
        for spki in (used.spki, attacker.spki_der):
            lab.attest("worker0", used.nonce, spki, used.evidence.to_json())
        lab.ratls_self_signed(provider("worker0", measure_workload(role="worker0")))
        extra["baseline"] = before
    elif case == "stale_evidence":
        nonces = mesh.trust.service.nonces
        real_clock = nonces.clock
        age = nonces.ttl_s + 30
        nonces.clock = lambda: real_clock() - age  # challenges issued `age` seconds ago
        try:
            old = [lab.challenge(), lab.challenge()]
        finally:
            nonces.clock = real_clock
        ps0 = provider("ps0", measure_workload(role="ps0"))
        identity = RaTlsIdentity()
        lab.attest("worker0", old[0], identity.spki_der, ps0.get_evidence(
            key_binding(identity.spki_der, old[0])).to_json())
        lab.release("ps0", old[1], identity.spki_der, ps0.get_evidence(
            key_binding(identity.spki_der, old[1])).to_json())
        lab.ratls_self_signed(ps0)
        extra["challenge_age_s"] = age
    elif case in ("debug_td", "wrong_mr_td"):
        if case == "debug_td":
            worker = provider("worker0", measure_workload(role="worker0"), debug=True)
            ps0 = provider("ps0", measure_workload(role="ps0"), debug=True)
        else:
            worker_m, ps0_m = measure_workload(role="worker0"), measure_workload(role="ps0")
            worker_m.mr_td = ps0_m.mr_td = b"\x42" * 48  # another TD image
            worker, ps0 = provider("worker0", worker_m), provider("ps0", ps0_m)
        lab.with_evidence(worker, role="worker0")
        lab.with_evidence(ps0)
        lab.at_ps_with(misissued_certificate(lab, worker))
    elif case == "second_process_same_certificate":
        creds = mesh.creds["worker0"]  # the legitimate worker0 is live on its connection
        # live however long the second process takes to start and call: its last call (the
        # fixture's pull) would lapse after the 30 s lease, and the clone then take the role
        lab.servicer.sessions.lease_s = 3600.0
        extra["clone"] = clone = clone_process(lab, creds, "worker0", 0)
        for rpc, result in clone.items():
            lab.attempts.append({"server": "ps0", "rpc": f"{rpc} (second process)", **result})
        used = read_evidence(creds.certificate_pem)
        assert used.nonce is not None
        lab.release("worker0", used.nonce, used.spki, used.evidence.to_json())
    elif case == "expired_mesh_certificate":
        service = mesh.trust.service
        service.cert_lifetime_s = 1
        try:
            with connect(mesh.trust) as client:
                expired = client.attest("worker1", provider("worker1",
                                                            measure_workload(role="worker1")))
        finally:
            service.cert_lifetime_s = 600
        before = lab.counters()
        # notAfter is a whole second, valid through that second (RFC 5280)
        time.sleep(max(0.0, expired.not_after + 1.5 - time.time()))
        lab.at_ps_with(expired, role="worker1", index=1)
        used = read_evidence(expired.certificate_pem)
        assert used.nonce is not None
        lab.release("worker1", used.nonce, used.spki, used.evidence.to_json())
        extra["baseline"] = before
    else:
        raise AssertionError(case)
    return extra


@pytest.mark.slow
@pytest.mark.parametrize("case", CASES)
def test_hostile_peer_exchanges_no_tensor_and_gets_no_secret(lab: Lab, case: str) -> None:
    before = lab.counters()

    extra = attack(lab, case)

    after = lab.counters()
    baseline = extra.pop("baseline", before)  # after the case's own set-up, if it had one
    delta = {k: after[k] - baseline[k] for k in after}
    refused = [a for a in lab.attempts if a["code"] != "OK" and a["details"].strip()]
    record("R2", case, tried=1, held=int(len(refused) == len(lab.attempts) and not any(
        delta.values())), lost=0, tensors_exchanged=delta["tensors_exchanged"],
        secrets_released=delta["secrets_released"],
        certificates_issued=delta["certificates_issued"],
        attempts=[{k: (v[:160] if k == "details" else v) for k, v in a.items()}
                  for a in lab.attempts], **{k: v for k, v in extra.items() if k != "clone"})

    assert lab.attempts, "the hostile peer tried nothing"
    assert refused == lab.attempts, [a for a in lab.attempts if a not in refused]
    assert delta == {"tensors_exchanged": 0, "secrets_released": 0, "certificates_issued": 0}
    assert {a["server"] for a in lab.attempts} == {"trust", "ps0"}


def test_a_restarted_worker_takes_its_role_back_at_once(lab: Lab) -> None:
    """The one-live-session rule must not lock out a worker that crashed and came back: the
    restarted process re-attests, and its newer certificate takes over the role at once,
    while the crashed process's certificate is superseded."""
    mesh, servicer = lab.mesh, lab.servicer
    old = mesh.creds["worker0"]
    # the new certificate must be attested in a later second than the old one (notBefore)
    time.sleep(max(0.0, old.certificate.not_valid_before_utc.timestamp() + 31.1 - time.time()))
    with connect(mesh.trust) as client:
        fresh = client.attest("worker0", provider("worker0", measure_workload(role="worker0")))
    restarted = PsConnection(_channel_for(lab, fresh))
    before = servicer.tensors_exchanged

    restarted.register("worker0", 0)  # the old session was live a moment ago
    pulled = restarted.pull("worker0", 0, model_specs(lab.model))
    lab.at_ps_with(old)  # the crashed process's credentials, on a new connection

    assert pulled.version == servicer.version and servicer.tensors_exchanged > before
    codes = {a["rpc"]: a["code"] for a in lab.attempts}
    assert codes == {"Register": "PERMISSION_DENIED", "PushUpdate": "PERMISSION_DENIED",
                     "PullParameters": "PERMISSION_DENIED"}, lab.attempts
    with pytest.raises(grpc.RpcError) as superseded:  # and on its old connection
        lab.legit.pull("worker0", 0, model_specs(lab.model))
    assert superseded.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert "superseded" in (superseded.value.details() or "")
    restarted.close()


def _channel_for(lab: Lab, creds: MeshCredentials) -> grpc.Channel:
    """An attested channel to ps0 with ``creds`` (a fresh connection of its own)."""
    return channel_factory(lab.address, creds, lab.mesh.verifier("worker0"))()


def test_same_certificate_on_a_new_connection_is_accepted_once_the_old_one_lapsed(
    lab: Lab,
) -> None:
    """A worker that reconnects with its unchanged certificate (a transient network failure)
    gets its session back when the old connection has been idle past the lease."""
    lab.servicer.sessions.lease_s = 0.5  # seconds a quiet connection keeps its session
    time.sleep(0.6)  # worker0's connection idle past the (shortened) lease
    creds = lab.mesh.creds["worker0"]

    again = PsConnection(_channel_for(lab, creds))
    again.register("worker0", 0)
    pulled = again.pull("worker0", 0, model_specs(lab.model))

    assert pulled.version == lab.servicer.version
    again.close()
