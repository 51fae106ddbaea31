"""Malformed pushes are refused with the right gRPC status, and the PS keeps training."""

from __future__ import annotations

from collections.abc import Iterator

import grpc
import numpy as np
import pytest

from tests.mesh_support import Mesh
from tests.ps_support import (  # noqa: F401 (fixtures model, mesh)
    good_update,
    header,
    push_code,
    resnet8,
    start_ps,
    two_worker_mesh,
)
from trainer.model import ResNet
from trainer.proto import parameter_server_pb2 as pb
from trainer.ps import ParameterServer
from trainer.serving import model_specs
from trainer.tensors import encode_tensors
from trainer.worker import PsConnection


def forged(tensors: dict[str, np.ndarray], **fields: int) -> list[pb.TensorChunk]:
    """A stream whose header lies (encode_tensors itself would fill in the true values)."""
    chunks = list(encode_tensors(tensors, header=header()))
    for name, value in fields.items():
        setattr(chunks[0].header, name, value)
    return chunks


@pytest.fixture()
def worker0(mesh: Mesh, model: ResNet) -> Iterator[tuple[ParameterServer, PsConnection, Mesh]]:
    servicer, address = start_ps(mesh, model, max_staleness=1)
    conn = PsConnection(mesh.connect("worker0", address)())
    conn.register("worker0", 0)
    yield servicer, conn, mesh
    conn.close()
    servicer.close()


def test_malformed_pushes_get_the_right_status_and_training_continues(
    worker0: tuple[ParameterServer, PsConnection, Mesh], model: ResNet
) -> None:
    servicer, conn, mesh = worker0
    good = good_update(model)
    name = next(iter(good))

    def with_tensor(value: np.ndarray, key: str = name) -> dict[str, np.ndarray]:
        return {**good, key: value}

    renamed = {("bogus" if k == name else k): v for k, v in good.items()}
    cases = {
        "wrong shape": (encode_tensors(with_tensor(good[name][..., :1]), header=header()),
                        grpc.StatusCode.INVALID_ARGUMENT),
        "wrong dtype": (encode_tensors(with_tensor(good[name].astype(np.float64)),
                                       header=header()), grpc.StatusCode.INVALID_ARGUMENT),
        "unknown name": (encode_tensors(renamed, header=header()),
                         grpc.StatusCode.INVALID_ARGUMENT),
        "NaN": (encode_tensors(with_tensor(np.full_like(good[name], np.nan)), header=header()),
                grpc.StatusCode.INVALID_ARGUMENT),
        "Inf": (encode_tensors(with_tensor(np.full_like(good[name], np.inf)), header=header()),
                grpc.StatusCode.INVALID_ARGUMENT),
        "oversized": (forged(good, total_bytes=1 << 40), grpc.StatusCode.RESOURCE_EXHAUSTED),
        "truncated": (list(encode_tensors(good, header=header(), chunk_bytes=4096))[:-1],
                      grpc.StatusCode.DATA_LOSS),
        "version ahead": (encode_tensors(good, header=header(version=7)),
                          grpc.StatusCode.FAILED_PRECONDITION),
        "weights in sync mode": (encode_tensors(good, header=header(
            kind=pb.UPDATE_KIND_WEIGHTS)), grpc.StatusCode.INVALID_ARGUMENT),
        "claims another worker": (encode_tensors(good, header=header(worker="worker1")),
                                  grpc.StatusCode.PERMISSION_DENIED),
    }
    for what, (chunks, expected) in cases.items():
        assert push_code(conn, chunks) == expected, what
    assert servicer.version == 0  # nothing of that reached the model

    # the PS still serves, and a good step from both workers goes through
    reply, _, _ = conn.push(good, header())
    assert reply.accepted
    assert push_code(conn, encode_tensors(good, header=header())) == (
        grpc.StatusCode.ALREADY_EXISTS
    ), "a second update for the same step"
    other = PsConnection(mesh.connect("worker1", mesh.last_address)())
    other.register("worker1", 1)
    reply, _, _ = other.push(good_update(model, 0.02), header(worker="worker1"))
    assert reply.accepted and reply.model_version == 1
    pulled = conn.pull("worker0", 1, model_specs(model))
    assert pulled.version == 1
    # late update for step 0: dropped and counted, not an error
    late, _, _ = conn.push(good, header(version=0))
    assert not late.accepted and "completed" in late.detail
    assert servicer.aggregator.counters().late_dropped == 1
    assert sum(servicer.refusals.values()) >= len(cases) + 1
    other.close()


def test_unregistered_and_impersonating_callers_are_refused(
    mesh: Mesh, model: ResNet
) -> None:
    servicer, address = start_ps(mesh, model, max_staleness=1)
    conn = PsConnection(mesh.connect("worker1", address)())
    specs = model_specs(model)
    with pytest.raises(grpc.RpcError) as not_registered:
        conn.pull("worker1", 0, specs)
    assert not_registered.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    with pytest.raises(grpc.RpcError) as impersonation:
        conn.register("worker0", 0)  # certificate says worker1
    assert impersonation.value.code() == grpc.StatusCode.PERMISSION_DENIED
    with pytest.raises(grpc.RpcError) as wrong_index:
        conn.register("worker1", 0)
    assert wrong_index.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    conn.close()
    servicer.close()


def test_async_refuses_updates_beyond_the_staleness_bound(mesh: Mesh, model: ResNet) -> None:
    servicer, address = start_ps(mesh, model, aggregation="async", max_staleness=1)
    conn = PsConnection(mesh.connect("worker0", address)())
    conn.register("worker0", 0)
    good = good_update(model)
    for version in range(2):  # two applied updates: version 2
        reply, _, _ = conn.push(good, header(version=version))
        assert reply.accepted
    assert servicer.version == 2
    reply, _, _ = conn.push(good, header(version=1))  # staleness 1: within the bound
    assert reply.accepted and reply.staleness == 1
    assert push_code(conn, encode_tensors(good, header=header(version=1))) == (
        grpc.StatusCode.FAILED_PRECONDITION  # staleness 2 > bound 1
    )
    conn.close()
    servicer.close()
