"""R8, issue 18 item 1: on the TDX overlays a pod's role is what its TD measures, not what it asks.

Before, every StatefulSet of a kata run carried the same initdata (or none), so every pod had the
same MR_CONFIG_ID and a compromised worker, or the host through changed container arguments,
could present a genuine quote and ask for a ps0 certificate. Now each role's pods carry their own
initdata (role, config digest, an agent policy pinning that role's container and denying exec),
the derived policy pins each role to its own MR_CONFIG_ID, and the trust service gives a TD only
the role its measurements match.

The trust service and the verifier are the real ones. The TD is simulated (no TDX here): its
quote reports exactly the MR_CONFIG_ID a kata TD started with that initdata reports (the SHA-384
of the initdata document), signed by the lab's platform, so the policy is the rendered one with
``allow_simulated`` switched on and nothing else changed. What is not tested here: that the kata
agent enforces the generated Rego (no OPA/regorus engine on this machine); its content is checked.
"""

from __future__ import annotations

import base64
import gzip
import hashlib
import json
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest

from hfl_lab import AttestationError, PolicyViolation
from hfl_lab.backends.kubernetes.measurements import DENIED_REQUESTS, mr_config_id
from hfl_lab.backends.kubernetes.render import INITDATA_ANNOTATION, RenderedRun, render_run
from hfl_lab.backends.kubernetes.settings import KubernetesSettings
from hfl_lab.ratls import RaTlsIdentity
from hfl_lab.tee import AttestationPolicy, SimulatedTdProvider, TdMeasurements
from hfl_lab.trust.client import TrustClient
from hfl_lab.trust.service import TrustService, serve
from tests.reliability_report import record
from tests.td_support import PLATFORM

OVERLAYS = ["kata-qemu-tdx", "kata-qemu-tdx-encrypted-signed"]
DIGEST = "sha256:" + "ab" * 32


def _render(tmp_path: Path, overlay: str) -> RenderedRun:
    return render_run(KubernetesSettings(overlay=overlay, workers=2,
                                         image=f"r.example.com/hfl@{DIGEST}",
                                         run_dir=tmp_path / overlay))


def _annotation(run: RenderedRun, statefulset: str) -> str:
    for obj in run.objects:
        if obj["kind"] == "StatefulSet" and obj["metadata"]["name"] == statefulset:
            value = obj["spec"]["template"]["metadata"]["annotations"][INITDATA_ANNOTATION]
            return gzip.decompress(base64.b64decode(value)).decode()
    raise AssertionError(f"no StatefulSet {statefulset}")


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_each_role_has_its_own_initdata_and_mr_config_id(tmp_path: Path, overlay: str) -> None:
    run = _render(tmp_path, overlay)
    initdata = {name: _annotation(run, name) for name in ("trust", "ps", "worker")}

    ids = {name: hashlib.sha384(text.encode()).hexdigest() for name, text in initdata.items()}
    assert len(set(ids.values())) == 3, "the three roles must measure differently"
    assert initdata == run.initdata
    for name, role in (("trust", "trust"), ("ps", "ps0"), ("worker", "worker")):
        assert f'role = "{role}"' in initdata[name]
    # the policy pins each role to its own, workers to the worker initdata, and nothing shared
    policy = run.policy
    assert policy.mr_config_id is None and not policy.allow_simulated
    assert policy.reference_for("trust", "mr_config_id") == (ids["trust"],)
    assert policy.reference_for("ps0", "mr_config_id") == (ids["ps"],)
    assert policy.reference_for("worker0", "mr_config_id") == (ids["worker"],)
    assert policy.reference_for("worker1", "mr_config_id") == (ids["worker"],)
    # the config document each pod reads is measured too
    digest = re.search(r'config_sha384 = "([0-9a-f]{96})"', initdata["ps"])
    assert digest is not None
    if overlay.endswith("signed"):
        assert all(DIGEST in text for text in initdata.values())


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_agent_policy_pins_each_container_and_denies_exec(tmp_path: Path, overlay: str) -> None:
    run = _render(tmp_path, overlay)
    for name in ("trust", "ps", "worker"):
        rego = _annotation(run, name).split('"policy.rego" = \'\'\'\n', 1)[1]
        assert rego.startswith("package agent_policy")
        for request in DENIED_REQUESTS:
            assert f"default {request} := false" in rego
            # no rule can turn a denied request back on
            assert not re.search(rf"^{request}\s+(if\b|\{{|:=\s*true)", rego, re.M)
        data = json.loads(rego.split("policy_data := ", 1)[1].split("\n}\n", 1)[0] + "\n}")
        assert data["container_name"] == name
        container = next(o for o in run.objects if o["kind"] == "StatefulSet"
                         and o["metadata"]["name"] == name)["spec"]["template"]["spec"][
            "containers"][0]
        argv = [*container["command"], *container["args"]]
        assert len(data["args"]) == len(argv)
        exact = [a["exact"] for a in data["args"] if "exact" in a]
        assert "trainer" in exact and ({"trust": "trust", "ps": "ps", "worker": "worker"}[name]
                                       in exact)
        assert data["env"]["HFL_LAB_ROLE"] != {"exact": "trust"} or name == "trust"
        assert "/etc/hfl-lab/policy" in data["mounts"]


@dataclass
class Cluster:
    run: RenderedRun
    policy: AttestationPolicy
    service: TrustService
    server: grpc.Server
    address: str


def _td(run: RenderedRun, statefulset: str, debug: bool = False) -> SimulatedTdProvider:
    """A TD started with ``statefulset``'s initdata: its MR_CONFIG_ID is that document's."""
    m = TdMeasurements(mr_td=b"\x11" * 48,
                       mr_config_id=bytes.fromhex(mr_config_id(run.initdata[statefulset])))
    return SimulatedTdProvider(PLATFORM, m, debug=debug)


@pytest.fixture()
def cluster(tmp_path: Path) -> Iterator[Cluster]:
    run = _render(tmp_path, "kata-qemu-tdx")
    # the rendered policy; only the hardware is simulated
    policy = run.policy.replace(allow_simulated=True)
    service = TrustService(policy=policy, admin_token=os.urandom(32),
                           lab_root_der=PLATFORM.root_der)
    identity = RaTlsIdentity()
    identity.make_certificate(_td(run, "trust"), subject_cn="trust", role="trust")
    server, port = serve(service, identity.certificate_pem, identity.private_key_pem())
    yield Cluster(run, policy, service, server, f"127.0.0.1:{port}")
    server.stop(0)


ATTEMPTS = [("worker", "ps0"), ("worker", "trust"), ("ps", "worker0"), ("trust", "ps0"),
            ("ps", "owner")]


@pytest.mark.parametrize(("statefulset", "asks_for"), ATTEMPTS)
def test_a_pod_cannot_get_another_roles_certificate(cluster: Cluster, statefulset: str,
                                                     asks_for: str) -> None:
    before = cluster.service.issued
    with (TrustClient.connect(cluster.address, cluster.policy, lab_root_der=PLATFORM.root_der,
                              role="trust") as client,
          pytest.raises((AttestationError, PolicyViolation)) as refused):
        client.attest(asks_for, _td(cluster.run, statefulset))
    issued = cluster.service.issued - before
    record("R8", f"a {statefulset} pod asks for a {asks_for} certificate (kata initdata)",
           held=int(issued == 0), certificates_wrongly_issued=issued)
    assert issued == 0
    assert "mr_config_id" in str(refused.value) or "role" in str(refused.value)


@pytest.mark.parametrize(("statefulset", "role"), [("worker", "worker1"), ("ps", "ps0")])
def test_each_pod_gets_its_own_role(cluster: Cluster, statefulset: str, role: str) -> None:
    with TrustClient.connect(cluster.address, cluster.policy, lab_root_der=PLATFORM.root_der,
                             role="trust") as client:
        creds = client.attest(role, _td(cluster.run, statefulset))
    assert f"CN={role}" in creds.certificate.subject.rfc4514_string()
