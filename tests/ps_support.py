"""The fixtures that the parameter-server tests over a real mesh share: ``model`` and ``mesh``.

A test module takes them by importing their functions (``from tests.ps_support import resnet8,
two_worker_mesh``); pytest registers them there under their fixture names, so each module
still builds its own model once and each test its own mesh. The functions carry other names
than the fixtures so that a test's ``mesh``/``model`` argument does not shadow an import."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.mesh_support import Mesh, mesh_fixture
from trainer.model import ResNet

__all__ = ["resnet8", "two_worker_mesh"]


@pytest.fixture(scope="module", name="model")
def resnet8() -> ResNet:
    """ResNet-8 (seed 0), built once per test module."""
    return ResNet(8, seed=0)


@pytest.fixture(name="mesh")
def two_worker_mesh(tmp_path: Path) -> Iterator[Mesh]:
    """A fresh attested mesh per test: trust service, ps0 and two workers."""
    yield from mesh_fixture(tmp_path, workers=2)
