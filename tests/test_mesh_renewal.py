"""Mesh certificates are short-lived: renewal keeps a participant in the mesh past the first
certificate's expiry; a participant whose fresh evidence fails is cut off when it expires."""

from __future__ import annotations

import time
from functools import partial
from pathlib import Path

import grpc
import numpy as np
import pytest

from hfl_lab import PolicyViolation
from hfl_lab.config import LabConfig
from hfl_lab.tee import measure_workload
from hfl_lab.trust.mesh import PeerCheck
from tests.mesh_support import start_mesh
from tests.td_support import provider
from tests.trust_support import connect
from trainer.model import ResNet
from trainer.proto import parameter_server_pb2 as pb
from trainer.ps_server import serve_ps, worker_peers
from trainer.serving import channel_factory, model_specs, parameter_server
from trainer.worker import PsConnection

LIFETIME_S = 8.0


def gradients(model: ResNet) -> dict[str, np.ndarray]:
    return {s.name: np.full(s.shape, 1e-3, np.float32) for s in model_specs(model)}


def test_renewed_participants_outlive_their_first_certificate_and_failed_ones_are_cut_off(
    tmp_path: Path,
) -> None:
    model = ResNet(8, seed=0)
    config = LabConfig.profile("quick", depth=8, workers=2, steps=100, aggregation="async",
                               eval_every=0, checkpoint_every=0)
    servicer = parameter_server(config, num_train=1000, model=model)
    # the first certificates are issued after the model is built: between their issuance and
    # the first pushes only the connections are made, well inside their lifetime on a busy
    # machine too
    mesh = start_mesh(tmp_path, workers=2, cert_lifetime_s=LIFETIME_S)
    current = dict(mesh.creds)  # each role's current credentials
    check = PeerCheck(mesh.verifier("ps0"), current["ps0"].ca_pem, worker_peers(2))
    server, port = serve_ps(servicer, lambda: current["ps0"], check)
    address = f"127.0.0.1:{port}"
    try:
        conns = {}
        for i in range(2):
            role = f"worker{i}"
            creds = partial(current.__getitem__, role)  # this role's current credentials
            connect_fn = channel_factory(address, creds, mesh.verifier(role))
            conns[role] = PsConnection(connect_fn())
            conns[role].register(role, i)
        for i, conn in enumerate(conns.values()):
            header = pb.StreamHeader(kind=pb.UPDATE_KIND_GRADIENTS, model_version=i,
                                     worker_id=f"worker{i}", num_samples=1)
            assert conn.push(gradients(model), header)[0].accepted

        issued_at = time.monotonic()
        time.sleep(LIFETIME_S / 2)  # re-attest at half-life, as participants do
        with connect(mesh.trust) as client:
            # ps0 and worker0 re-attest with their unchanged TDs
            current["ps0"] = client.attest("ps0", provider("ps0", measure_workload(role="ps0")))
            current["worker0"] = client.attest(
                "worker0", provider("worker0", measure_workload(role="worker0")))
            # worker1's fresh evidence shows changed code: no new certificate
            tampered = measure_workload(role="worker1", config={"changed": True})
            with pytest.raises(PolicyViolation):
                client.attest("worker1", provider("worker1", tampered))

        # every first certificate has expired now; the renewed ones have not (notAfter is a
        # whole second and valid through that second, RFC 5280: wait past the next one)
        time.sleep(max(0.0, issued_at + LIFETIME_S + 1.5 - time.monotonic()))

        renewed = PsConnection(
            channel_factory(address, lambda: current["worker0"], mesh.verifier("worker0"))())
        renewed.register("worker0", 0)
        header = pb.StreamHeader(kind=pb.UPDATE_KIND_GRADIENTS, model_version=servicer.version,
                                 worker_id="worker0", num_samples=1)
        assert renewed.push(gradients(model), header)[0].accepted

        header.worker_id = "worker1"
        header.model_version = servicer.version
        with pytest.raises(grpc.RpcError) as cut_off:  # on its existing connection
            conns["worker1"].push(gradients(model), header)
        assert cut_off.value.code() == grpc.StatusCode.PERMISSION_DENIED
        assert "expired" in (cut_off.value.details() or "").lower() or "valid" in (
            cut_off.value.details() or "").lower()
        for conn in (*conns.values(), renewed):
            conn.close()
    finally:
        server.stop(0)
        servicer.close()
        mesh.close()
