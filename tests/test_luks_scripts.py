"""The operator scripts in native/luks/ parse, pass shellcheck, and explain their usage."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

SCRIPTS = sorted((Path(__file__).resolve().parents[1] / "native" / "luks").glob("*.sh"))


def test_all_three_scripts_exist() -> None:
    assert [script.name for script in SCRIPTS] == [
        "close_volume.sh",
        "create_volume.sh",
        "open_volume.sh",
    ]


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_script_parses(script: Path) -> None:
    result = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_script_passes_shellcheck(script: Path) -> None:
    if shutil.which("shellcheck") is None:
        pytest.skip("shellcheck is not installed")
    result = subprocess.run(["shellcheck", str(script)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_script_without_arguments_prints_usage(script: Path) -> None:
    result = subprocess.run(
        ["bash", str(script)], capture_output=True, text=True, stdin=subprocess.DEVNULL
    )
    assert result.returncode == 2
    assert result.stderr.startswith("usage:")


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_script_is_strict_and_never_takes_a_passphrase_argument(script: Path) -> None:
    text = script.read_text()
    assert "set -euo pipefail" in text
    assert "--key-file -" in text or script.name == "close_volume.sh"
    assert "--passphrase" not in text
