"""Flat pushes and pulls at a real PS over the attested mesh: a bad flat stream gets the status a
bad per-tensor one gets, a good one trains, and pulls come back as one buffer."""

from __future__ import annotations

import threading
import time

import grpc
import numpy as np

from tests.mesh_support import Mesh
from tests.ps_support import (  # noqa: F401 (fixtures model, mesh)
    good_update,
    header,
    push_code,
    resnet8,
    start_ps,
    two_worker_mesh,
)
from trainer.aggregation import Aggregator
from trainer.flat import FlatTensors, flat_layout
from trainer.model import ResNet
from trainer.proto import parameter_server_pb2 as pb
from trainer.serving import model_specs
from trainer.tensors import TensorSpec, encode_tensors
from trainer.worker import PsConnection


def test_flat_pushes_are_validated_and_train(mesh: Mesh, model: ResNet) -> None:
    # Arrange
    servicer, address = start_ps(mesh, model, max_staleness=1)
    conn = PsConnection(mesh.connect("worker0", address)())
    conn.register("worker0", 0)
    layout = flat_layout(model_specs(model))
    assert layout is not None and layout.same_as(servicer.layout)  # type: ignore[arg-type]
    good = layout.gather(good_update(model))
    poisoned = good.copy()
    poisoned.buffer[-1] = np.nan  # a batch-norm statistic
    # the same bytes, one tensor of another shape: only the layout digest tells
    other = flat_layout([TensorSpec(s.name, s.dtype, s.shape[::-1], s.trainable)
                         if s.name == "logits/kernel" else s for s in model_specs(model)])
    assert other is not None

    def flat_stream(tensors: FlatTensors, **fields: object) -> list[pb.TensorChunk]:
        return list(encode_tensors(tensors, header=header(**fields),  # type: ignore[arg-type]
                                   chunk_bytes=16 << 10))

    truncated = flat_stream(good)[:-1]
    wrong_model = flat_stream(other.gather({n: np.zeros(s, np.float32)
                                            for n, s in other.shapes.items()}))
    oversized = flat_stream(good)
    oversized[0].header.total_bytes = 1 << 40
    cases = {
        "NaN": (flat_stream(poisoned), grpc.StatusCode.INVALID_ARGUMENT),
        "another model": (wrong_model, grpc.StatusCode.INVALID_ARGUMENT),
        "truncated": (truncated, grpc.StatusCode.DATA_LOSS),
        "oversized": (oversized, grpc.StatusCode.RESOURCE_EXHAUSTED),
        "version ahead": (flat_stream(good, version=7), grpc.StatusCode.FAILED_PRECONDITION),
        "claims another worker": (flat_stream(good, worker="worker1"),
                                  grpc.StatusCode.PERMISSION_DENIED),
    }
    try:
        # Act
        codes = {what: push_code(conn, chunks) for what, (chunks, _) in cases.items()}
        received = servicer.tensors_received
        reply, _, sent = conn.push(good, header())
        pulled = conn.pull("worker0", 0, model_specs(model))
        per_tensor = conn.pull("worker0", 0, model_specs(model), flat=False)
        # Assert
        assert codes == {what: code for what, (_, code) in cases.items()}
        assert servicer.version == 0 and reply.accepted  # sync K = 2: waiting for worker1
        assert sent == layout.size * 4
        assert servicer.tensors_received == received + len(layout.entries)
        assert isinstance(pulled.weights, FlatTensors)
        assert pulled.nbytes == layout.size * 4 == per_tensor.nbytes
        for name in layout.names:
            np.testing.assert_array_equal(pulled.weights[name], per_tensor.weights[name])
        model.set_weights(pulled.weights)  # one buffer, straight into the variables
        for name, value in model.get_weights().items():
            np.testing.assert_array_equal(value, pulled.weights[name], err_msg=name)
    finally:
        conn.close()
        servicer.close()


def test_a_waiting_pull_is_woken_when_its_caller_gives_up() -> None:
    # Arrange: a pull's wait for a step that does not come (the worker's push was refused)
    aggregator = Aggregator("sync", 2)
    outcome: list[bool] = []
    waiter = threading.Thread(target=lambda: outcome.append(
        aggregator.wait_for_version(1, timeout=300)))
    waiter.start()
    # Act: the call is cancelled (PullParameters registered wake as its callback); woken
    # again until it ends, as the waiter may not be waiting yet at the first wake
    deadline = time.monotonic() + 60
    while waiter.is_alive() and time.monotonic() < deadline:
        aggregator.wake()
        waiter.join(timeout=0.05)
    # Assert: the wait ended without the step, long before its own timeout (300 s)
    assert not waiter.is_alive()
    assert outcome == [False]
    assert aggregator.version == 0
