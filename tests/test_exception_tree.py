"""One exception tree: every exception the lab defines is in hfl_lab._exceptions, and each class
says what `hfl-lab` exits with."""

from __future__ import annotations

import importlib
import inspect
import pkgutil

import pytest

import hfl_lab
import trainer
from hfl_lab import _exceptions
from hfl_lab._exceptions import ExitCode, HflLabError, PeerUnreachable
from hfl_lab.cli import exit_code_for


def _project_modules() -> list[str]:
    names = []
    for package in (hfl_lab, trainer):
        for info in pkgutil.walk_packages(package.__path__, f"{package.__name__}."):
            if info.name.endswith(("__main__", "_pb2", "_pb2_grpc")):
                continue
            names.append(info.name)
    return names


def test_every_exception_class_of_the_project_is_in_the_tree() -> None:
    outside = []
    for name in _project_modules():
        if name == _exceptions.__name__:
            continue
        module = importlib.import_module(name)
        for attr, value in vars(module).items():
            if (inspect.isclass(value) and issubclass(value, BaseException)
                    and value.__module__ == name and not attr.startswith("_")):
                outside.append(f"{name}.{attr}")

    assert outside == [], "define exceptions in hfl_lab/_exceptions.py"


@pytest.mark.parametrize("name", _exceptions.__all__)
def test_each_class_of_the_tree_carries_its_exit_code(name: str) -> None:
    cls = getattr(_exceptions, name)
    if cls is ExitCode:
        return
    assert issubclass(cls, HflLabError)
    assert isinstance(cls.exit_code, ExitCode)
    assert name in (_exceptions.__doc__ or ""), "the drawn tree names every class"


def test_the_cli_reads_the_exit_code_from_the_class() -> None:
    assert exit_code_for(PeerUnreachable("nobody listens")) is ExitCode.UNAVAILABLE
    assert PeerUnreachable("x").check == "connection"
    assert exit_code_for(RuntimeError("a gRPC failure")) is ExitCode.UNAVAILABLE
