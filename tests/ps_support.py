"""What the parameter-server tests over a real mesh share: the ``model`` and ``mesh`` fixtures,
and the helpers that start ps0 on the mesh and make or push an update.

A test module takes them by importing their functions (``from tests.ps_support import resnet8,
two_worker_mesh``); pytest registers them there under their fixture names, so each module
still builds its own model once and each test its own mesh. The functions carry other names
than the fixtures so that a test's ``mesh``/``model`` argument does not shadow an import."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest

from hfl_lab.config import LabConfig
from tests.mesh_support import Mesh, mesh_fixture
from trainer.model import ResNet
from trainer.proto import parameter_server_pb2 as pb
from trainer.ps import ParameterServer
from trainer.serving import model_specs, parameter_server
from trainer.worker import PsConnection

__all__ = ["good_update", "header", "push_code", "resnet8", "start_ps", "two_worker_mesh"]


@pytest.fixture(scope="module", name="model")
def resnet8() -> ResNet:
    """ResNet-8 (seed 0), built once per test module."""
    return ResNet(8, seed=0)


@pytest.fixture(name="mesh")
def two_worker_mesh(tmp_path: Path) -> Iterator[Mesh]:
    """A fresh attested mesh per test: trust service, ps0 and two workers."""
    yield from mesh_fixture(tmp_path, workers=2)


def start_ps(mesh: Mesh, model: ResNet, **params: Any) -> tuple[ParameterServer, str]:
    """ps0 for a quick two-worker run of ``model`` (ResNet-8), served on ``mesh``; ``params``
    are further :class:`LabConfig` values (aggregation, max_staleness, quorum_rule, ...)."""
    config = LabConfig.profile("quick", depth=8, workers=2, steps=10, eval_every=0,
                               checkpoint_every=0, **params)
    servicer = parameter_server(config, num_train=1000, model=model)
    return servicer, mesh.serve(servicer, num_workers=2)


def good_update(model: ResNet, scale: float = 0.01) -> dict[str, np.ndarray]:
    """Gradients of the right names/shapes (and BN statistics), in model order."""
    rng = np.random.default_rng(0)
    return {s.name: (rng.standard_normal(s.shape) * scale).astype(np.float32)
            for s in model_specs(model)}


def header(version: int = 0, worker: str = "worker0",
           kind: pb.UpdateKind = pb.UPDATE_KIND_GRADIENTS, **extra: Any) -> pb.StreamHeader:
    """A push's header: ``worker``'s gradients for ``version``, 8 samples."""
    return pb.StreamHeader(kind=kind, model_version=version, worker_id=worker, num_samples=8,
                           **extra)


def push_code(conn: PsConnection, chunks: Any) -> grpc.StatusCode:
    """The status ps0 refuses a push with (the push must be refused, and say why)."""
    with pytest.raises(grpc.RpcError) as refused:
        conn.stub.PushUpdate(iter(list(chunks)), timeout=30)
    assert refused.value.details()  # every refusal says why
    return refused.value.code()
