"""The public surface: one exception tree (every exception the lab defines is in
hfl_lab._exceptions, and each class says what `hfl-lab` exits with), and the package's public
names listed once."""

from __future__ import annotations

import importlib
import inspect
import pkgutil
from pathlib import Path

import pytest

import hfl_lab
import trainer
from hfl_lab import _exceptions
from hfl_lab._exceptions import ExitCode, HflLabError, PeerUnreachable
from hfl_lab.cli import exit_code_for

REPO_ROOT = Path(__file__).resolve().parents[1]


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


def test_the_package_lists_its_public_names_once_and_each_resolves() -> None:
    import ast

    source = (REPO_ROOT / "hfl_lab" / "__init__.py").read_text()
    checked: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            checked = {a.asname or a.name for n in node.body if isinstance(n, ast.ImportFrom)
                       for a in n.names}

    # the names the module binds itself (not what __getattr__ cached since: that depends on
    # which test ran first)
    bound: set[str] = set()
    for stmt in ast.parse(source).body:
        if isinstance(stmt, ast.ImportFrom | ast.Import):
            bound |= {a.asname or a.name.split(".")[0] for a in stmt.names}
        elif isinstance(stmt, ast.Assign | ast.AnnAssign):
            targets = stmt.targets if isinstance(stmt, ast.Assign) else [stmt.target]
            bound |= {t.id for t in targets if isinstance(t, ast.Name)}
        elif isinstance(stmt, ast.FunctionDef | ast.ClassDef):
            bound.add(stmt.name)
    eager = {n for n in hfl_lab.__all__ if n in bound}
    assert checked == set(hfl_lab.__all__) - eager - {"__version__"}, (
        "the names type checkers see are the lazily loaded ones of __all__")
    for name in hfl_lab.__all__:
        assert getattr(hfl_lab, name) is not None
