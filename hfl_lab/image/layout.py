"""The workload image as an OCI layout: built with umoci from what MR_TD measures, and read back.

The image holds exactly the files the simulated TD's MR_TD measures
(:func:`hfl_lab.tee.sim.measure.source_files`: every ``.py`` and ``.proto`` of ``trainer/`` and
``hfl_lab/``) under ``/app``, and its config names the entrypoint (``python -m trainer``, the
role's arguments as its command). The runtime (Python and the installed packages) is not in it:
on the local backend each participant runs the unpacked code with the lab's own environment.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hfl_lab._exceptions import ImageError
from hfl_lab.image.tools import ToolRunner
from hfl_lab.tee.sim.measure import source_files

__all__ = [
    "ENCRYPTED_SUFFIX",
    "ENTRYPOINT",
    "IMAGE_APP_DIR",
    "Layer",
    "OciImage",
    "build_workload_image",
    "read_image",
]

#: where the workload lives inside the image, and what runs it
IMAGE_APP_DIR = "/app"
ENTRYPOINT = ("python", "-m", "trainer")
ENCRYPTED_SUFFIX = "+encrypted"
# A fixed file time: the layer's bytes then depend on the files' contents alone.
_MTIME = 315532800  # 1980-01-01, what zip-based tools also use as "no time"


@dataclass(frozen=True)
class Layer:
    media_type: str
    digest: str
    size: int

    @property
    def encrypted(self) -> bool:
        return self.media_type.endswith(ENCRYPTED_SUFFIX)


@dataclass(frozen=True)
class OciImage:
    """One tag of an OCI layout: its manifest's digest, layers and config."""

    layout: Path
    tag: str
    manifest_digest: str
    layers: tuple[Layer, ...]
    config: dict[str, Any]

    @property
    def size(self) -> int:
        """Bytes of the layers (what a pull moves besides the small manifest and config)."""
        return sum(layer.size for layer in self.layers)

    @property
    def media_types(self) -> list[str]:
        return [layer.media_type for layer in self.layers]

    @property
    def reference(self) -> str:
        """skopeo's name of this image: ``oci:<layout>:<tag>``."""
        return f"oci:{self.layout}:{self.tag}"


def _blob(layout: Path, digest: str) -> bytes:
    algorithm, _, hexdigest = digest.partition(":")
    return (layout / "blobs" / algorithm / hexdigest).read_bytes()


def read_image(layout: Path, tag: str) -> OciImage:
    """The image ``tag`` of the OCI layout at ``layout``; ``ImageError`` when it is not one."""
    try:
        index = json.loads((layout / "index.json").read_text())
        found = [m for m in index.get("manifests", [])
                 if m.get("annotations", {}).get("org.opencontainers.image.ref.name") == tag]
        if not found:
            raise ImageError(f"the OCI layout {layout} has no image tagged {tag!r}.",
                             fix="build or copy the image into it first.")
        digest = str(found[0]["digest"])
        manifest = json.loads(_blob(layout, digest))
        config = json.loads(_blob(layout, str(manifest["config"]["digest"])))
        layers = tuple(Layer(str(x["mediaType"]), str(x["digest"]), int(x["size"]))
                       for x in manifest["layers"])
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise ImageError(f"{layout} is not a readable OCI layout: {error}",
                         fix="remove it and run the step that makes it again.") from None
    return OciImage(layout, tag, digest, layers, config)


def _stage(root: Path, staging: Path) -> int:
    """Copy the measured files under ``staging/app`` (fixed times); returns how many."""
    files = source_files(root)
    if not files:
        raise ImageError(f"no workload source files under {root} (trainer/, hfl_lab/).",
                         fix="point the image build at the lab's checkout.")
    app = staging / IMAGE_APP_DIR.lstrip("/")
    for path in files:
        target = app / path.relative_to(root)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, target)
    for path in [*app.rglob("*"), app]:
        path.chmod(0o755 if path.is_dir() else 0o644)
        os.utime(path, (_MTIME, _MTIME), follow_symlinks=False)
    return len(files)


def build_workload_image(
    runner: ToolRunner, root: Path, layout: Path, tag: str = "workload",
    labels: dict[str, str] | None = None,
) -> OciImage:
    """Build the workload image from ``root``'s measured files into the OCI layout ``layout``
    (made afresh) with umoci, rootless: a new image, one layer inserted at ``/app``, a config
    naming the entrypoint. Returns the image as read back."""
    # absolute: umoci's rootless walk drops a leading "../" of the source it inserts
    # (a notebook's run_dir, "../runs/lab", failed with "no such file or directory")
    root, layout = root.resolve(), layout.resolve()
    if layout.exists():
        shutil.rmtree(layout)
    staging = layout.parent / f".{layout.name}.staging"
    if staging.exists():
        shutil.rmtree(staging)
    try:
        count = _stage(root, staging)
        ref = f"{layout}:{tag}"
        runner.run("build: layout", ["umoci", "init", "--layout", str(layout)])
        runner.run("build: image", ["umoci", "new", "--image", ref])
        runner.run("build: insert the workload",
                   ["umoci", "insert", "--rootless", "--image", ref,
                    str(staging / IMAGE_APP_DIR.lstrip("/")), IMAGE_APP_DIR])
        config = ["umoci", "config", "--image", ref, "--config.workingdir", IMAGE_APP_DIR,
                  "--config.env", f"PYTHONPATH={IMAGE_APP_DIR}",
                  "--config.env", "KERAS_BACKEND=tensorflow",
                  "--config.label", f"io.hfl-lab.workload.files={count}",
                  "--config.label", "io.hfl-lab.runtime=not included: the lab's Python "
                  "environment runs it on the local backend"]
        for part in ENTRYPOINT:
            config += ["--config.entrypoint", part]
        for key, value in (labels or {}).items():
            config += ["--config.label", f"{key}={value}"]
        runner.run("build", config, digest=lambda: read_image(layout, tag).manifest_digest)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return read_image(layout, tag)
