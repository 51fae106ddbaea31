"""native/: the image's Dockerfile and entrypoint, and the CoCo host helpers."""

from __future__ import annotations

import contextlib
import json
import os
import shlex
import signal
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPTS = [*sorted((REPO / "native" / "coco").glob("*.sh")), REPO / "native/image/entrypoint.sh"]
INSTRUCTIONS = {
    "FROM",
    "RUN",
    "CMD",
    "LABEL",
    "EXPOSE",
    "ENV",
    "ADD",
    "COPY",
    "ENTRYPOINT",
    "VOLUME",
    "USER",
    "WORKDIR",
    "ARG",
    "ONBUILD",
    "STOPSIGNAL",
    "HEALTHCHECK",
    "SHELL",
}


def parse_dockerfile(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) per instruction: comments dropped, '\\' continuations joined."""
    out: list[tuple[str, str]] = []
    pending = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        line, pending = pending + line, ""
        word, _, rest = line.partition(" ")
        if word.upper() not in INSTRUCTIONS:
            raise ValueError(f"unknown Dockerfile instruction {word!r}")
        out.append((word.upper(), rest.strip()))
    if pending:
        raise ValueError("the Dockerfile ends inside a line continuation")
    return out


def test_parser_rejects_garbage():
    with pytest.raises(ValueError, match="instruction"):
        parse_dockerfile("FROM x\nCOPYY a b\n")
    with pytest.raises(ValueError, match="continuation"):
        parse_dockerfile("FROM x\nRUN a \\\n")


def test_dockerfile_parses_and_copies_only_existing_files():
    steps = parse_dockerfile((REPO / "native/image/Dockerfile").read_text())
    assert steps[0] == ("FROM", "python:3.11-slim")
    runs = " ".join(a for i, a in steps if i == "RUN")
    assert "cryptsetup-bin" in runs and "e2fsprogs" in runs and "requirements.txt" in runs
    copies = [shlex.split(a) for i, a in steps if i in ("COPY", "ADD")]
    sources = [s for args in copies for s in args[:-1] if not s.startswith("--")]
    assert {"hfl_lab/", "trainer/", "requirements.txt"} <= set(sources)
    for src in sources:
        assert (REPO / src).exists(), f"COPY source {src} is not in the repository"
    users = [a for i, a in steps if i == "USER"]
    assert users and not users[-1].startswith(("0", "root"))
    entry = json.loads(next(a for i, a in steps if i == "ENTRYPOINT"))
    assert entry == ["/opt/hfl-lab/entrypoint.sh"]


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_scripts_parse_are_strict_and_have_usage(script):
    assert subprocess.run(["bash", "-n", str(script)], capture_output=True).returncode == 0
    text = script.read_text()
    assert "set -euo pipefail" in text and "usage()" in text
    args = [] if script.name == "entrypoint.sh" else ["--help"]  # --help never acts
    result = subprocess.run(
        ["bash", str(script), *args], capture_output=True, text=True, timeout=10
    )
    assert result.returncode == 2 and "usage:" in result.stderr


def test_kata_config_edits_vcpus_memory_and_kernel_params(tmp_path):
    toml = tmp_path / "configuration-qemu-tdx.toml"
    toml.write_text(
        '[hypervisor.qemu]\nkernel_params = "agent.log=info x=1"\n'
        "default_vcpus = 1\ndefault_memory = 2048\n"
    )
    result = subprocess.run(
        [
            "bash",
            str(REPO / "native/coco/kata_config.sh"),
            "--file",
            str(toml),
            "--vcpus",
            "8",
            "--memory",
            "16384",
            "--kernel-param",
            "agent.log=debug",
            "--kernel-param",
            "y",
        ],
        capture_output=True,
        text=True,
        timeout=10,
    )
    assert result.returncode == 0, result.stderr
    text = toml.read_text()
    assert 'kernel_params = "x=1 agent.log=debug y"' in text
    assert "default_vcpus = 8" in text and "default_memory = 16384" in text
    assert (tmp_path / "configuration-qemu-tdx.toml.bak").read_text().count(
        "default_vcpus = 1"
    ) == 1
    bad = subprocess.run(
        ["bash", str(REPO / "native/coco/kata_config.sh"), "--file", str(toml), "--vcpus", "lots"],
        capture_output=True,
        text=True,
        timeout=10,
    )
    assert bad.returncode == 2 and "positive integer" in bad.stderr


def test_entrypoint_passes_failures_on_and_idles_after_success(tmp_path):
    entry = str(REPO / "native/image/entrypoint.sh")
    config = tmp_path / "config.yaml"
    config.write_text("deployment: {}\n")
    failed = subprocess.run(["bash", entry, "sh", "-c", "exit 7", "--config", str(config)],
                            capture_output=True, text=True, timeout=10)
    assert failed.returncode == 7  # Kubernetes restarts a participant that failed
    missing = subprocess.run(["bash", entry, "true", "--config", str(tmp_path / "nope")],
                             capture_output=True, text=True, timeout=10)
    assert missing.returncode == 1 and "hfl-config ConfigMap" in missing.stderr
    finished = subprocess.Popen(["bash", entry, "true"], stderr=subprocess.PIPE, text=True,
                                start_new_session=True)
    assert finished.stderr is not None
    assert "idle until the pod is stopped" in finished.stderr.readline()
    assert finished.poll() is None  # a StatefulSet would restart a container that exits
    os.killpg(finished.pid, signal.SIGTERM)
    assert finished.wait(timeout=10) == 0
    with contextlib.suppress(ProcessLookupError):
        os.killpg(finished.pid, signal.SIGKILL)
