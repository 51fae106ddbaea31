"""The cluster's full participant image: native/image/Dockerfile built by buildah or docker.

On ``kubernetes`` a participant's TD runs the whole image (Python, TensorFlow, the lab), not the
workload alone as on ``local``, so it is built from ``native/image/Dockerfile`` by a builder that
can run a Dockerfile: ``buildah`` (rootless, no daemon; preferred) or ``docker`` (its daemon must
answer). :func:`build_container_image` builds it into an OCI layout, every command through the
:class:`~hfl_lab.image.tools.ToolRunner` that records it, and the image then goes through the
same steps as the local one (:func:`hfl_lab.image.publish.publish_image`: encrypt, push to the
user's registry, sign, verify). Where neither builder works, :func:`find_builder` refuses with
a sentence naming how to install one; :func:`build_commands` gives the command lines either
way, so a person can run them on a build host.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path

from hfl_lab._exceptions import ImageError
from hfl_lab.image.layout import OciImage, read_image
from hfl_lab.image.tools import ToolRunner, require_tools

__all__ = [
    "BUILDERS",
    "BUILDER_FIX",
    "DOCKERFILE",
    "build_commands",
    "build_container_image",
    "builder_status",
    "find_builder",
    "tool_inventory",
    "tool_summary",
    "usable_builders",
]

#: the tools preflight reports, in the order of the pipeline
INVENTORY = ("skopeo", "umoci", "buildah", "docker", "cosign")
#: the builders that can run a Dockerfile without help, in the order they are preferred
BUILDERS = ("buildah", "docker")
DOCKERFILE = "native/image/Dockerfile"
BUILDER_FIX = (
    "install buildah (Debian: apt-get install buildah; rootless, no daemon) or Docker Engine "
    "(https://docs.docker.com/engine/install/, then start its daemon), then run this step "
    "again; or run the printed commands on a build host"
)
_LOCAL_NAME = "localhost/hfl-lab-build"
_ABSENT = "not installed"
_NO_DAEMON = "client only: its daemon does not answer"


def _docker_answers(timeout_s: float = 10.0) -> bool:
    """Whether the docker client reaches a daemon (a client alone builds nothing)."""
    try:
        result = subprocess.run(["docker", "info", "--format", "{{.ServerVersion}}"],
                                capture_output=True, text=True, timeout=timeout_s, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return result.returncode == 0 and bool(result.stdout.strip())


def builder_status(
    which: Callable[[str], str | None] = shutil.which,
    docker_answers: Callable[[], bool] = _docker_answers,
) -> dict[str, str]:
    """Each builder's state in words: ``usable``, ``not installed``, or for docker ``client
    only: its daemon does not answer``."""
    status = {}
    for name in BUILDERS:
        if which(name) is None:
            status[name] = _ABSENT
        elif name == "docker" and not docker_answers():
            status[name] = _NO_DAEMON
        else:
            status[name] = "usable"
    return status


def find_builder(
    which: Callable[[str], str | None] = shutil.which,
    docker_answers: Callable[[], bool] = _docker_answers,
) -> str:
    """The first usable builder of :data:`BUILDERS`; ``ImageError`` naming the fix when none
    is (the message says what was found: a docker client without its daemon builds nothing)."""
    status = builder_status(which, docker_answers)
    for name in BUILDERS:
        if status[name] == "usable":
            return name
    found = "; ".join(f"{name}: {state}" for name, state in status.items())
    raise ImageError(
        f"the participant image ({DOCKERFILE}) needs buildah or docker to build, and neither "
        f"can here ({found}).", fix=BUILDER_FIX)


def build_policy() -> dict[str, object]:
    """The policy of the owner's own copy out of docker's archive (never used for a pull)."""
    accept = {"": [{"type": "insecureAcceptAnything"}]}
    return {"default": [{"type": "reject"}],
            "transports": {"docker-archive": accept, "oci": accept}}


def build_commands(
    builder: str, root: Path, layout: Path, tag: str = "workload", work: Path | None = None,
) -> list[tuple[str, list[str]]]:
    """(step, argv) of each command that builds ``root``'s Dockerfile into the OCI layout
    ``layout`` as ``tag``: buildah builds and pushes to the layout; docker builds, saves an
    archive (in ``work``) and skopeo copies it into the layout."""
    dockerfile = str(root / DOCKERFILE)
    local = f"{_LOCAL_NAME}:{tag}"
    if builder == "buildah":
        return [
            ("build: image", ["buildah", "build", "--layers", "--file", dockerfile,
                              "--tag", local, str(root)]),
            ("build", ["buildah", "push", "--quiet", local, f"oci:{layout}:{tag}"]),
        ]
    if builder == "docker":
        work = work or layout.parent
        archive = work / f"{tag}.docker.tar"
        return [
            ("build: image", ["docker", "build", "--file", dockerfile, "--tag", local,
                              str(root)]),
            ("build: export", ["docker", "save", "--output", str(archive), local]),
            ("build", ["skopeo", "copy", "--quiet", "--policy",
                       str(work / "build-policy.json"), f"docker-archive:{archive}",
                       f"oci:{layout}:{tag}"]),
        ]
    raise ImageError(f"{builder!r} is not an image builder the lab knows.",
                     fix=f"use one of {', '.join(BUILDERS)}.")


def build_container_image(
    runner: ToolRunner, root: Path, layout: Path, tag: str = "workload", *,
    builder: str | None = None,
) -> OciImage:
    """Build ``root``/native/image/Dockerfile into the OCI layout ``layout`` (made afresh) with
    ``builder`` (default: :func:`find_builder`); the image as read back. The layout is plain:
    :func:`hfl_lab.image.publish.publish_image` encrypts it and then removes it."""
    if not (root / DOCKERFILE).is_file():
        raise ImageError(f"{root / DOCKERFILE} does not exist.",
                         fix="build from a checkout of the lab (the repository's root).")
    builder = builder or find_builder()
    require_tools(builder, "skopeo")
    if layout.exists():
        shutil.rmtree(layout)
    work = layout.parent / f".{layout.name}.work"
    work.mkdir(parents=True, exist_ok=True)
    (work / "build-policy.json").write_text(json.dumps(build_policy(), indent=2) + "\n")
    try:
        commands = build_commands(builder, root, layout, tag, work)
        for step, argv in commands:
            last = step == "build"
            runner.run(step, argv,
                       digest=(lambda: read_image(layout, tag).manifest_digest) if last else None)
    finally:
        shutil.rmtree(work, ignore_errors=True)  # docker's archive is the plain image
    return read_image(layout, tag)


def tool_inventory(
    which: Callable[[str], str | None] = shutil.which,
    docker_answers: Callable[[], bool] = _docker_answers,
) -> dict[str, str]:
    """Which of skopeo, umoci, buildah, docker and cosign are here, for preflight: each tool's
    path, ``not installed``, or for a docker client without its daemon, that."""
    builders = builder_status(which, docker_answers)
    found = {}
    for name in INVENTORY:
        path = which(name)
        if path is None:
            found[name] = _ABSENT
        elif builders.get(name, "usable") != "usable":
            found[name] = f"{path} ({builders[name]})"
        else:
            found[name] = path
    return found


def tool_summary(inventory: dict[str, str]) -> str:
    """One line: the tools found, then those missing."""
    here = [f"{name} {state}" for name, state in inventory.items() if state != _ABSENT]
    absent = [name for name, state in inventory.items() if state == _ABSENT]
    return (f"found {', '.join(here) or 'none'}"
            + (f"; not found: {', '.join(absent)}" if absent else ""))


def usable_builders(inventory: dict[str, str]) -> list[str]:
    """The builders of a :func:`tool_inventory` that can build (installed; docker's daemon
    answers)."""
    return [name for name in BUILDERS
            if inventory.get(name, _ABSENT) != _ABSENT and _NO_DAEMON not in inventory[name]]
