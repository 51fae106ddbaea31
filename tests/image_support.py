"""What the image pipeline tests share: the run's lab registry, started for a block."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from hfl_lab.image import LabRegistry, ToolRunner

__all__ = ["serving_registry"]


@contextmanager
def serving_registry(folder: Path, runner: ToolRunner) -> Iterator[LabRegistry]:
    """The lab registry kept in ``folder``, started and serving for the block, then closed
    (also when it fails to start: a half-started registry process does not outlive the test)."""
    with LabRegistry(folder, runner) as registry:
        yield registry.start()
