"""I-build, I-pull: the workload image made and pulled for real (issue 19).

Both run Debian's tools through :mod:`hfl_lab.image` against one ``docker-registry`` on
loopback with TLS (started once, not timed): I-build times building the image from the files
MR_TD measures (umoci), encrypting its layer, pushing and signing it, and verifying it through
the ``signedBy`` policy into an OCI layout (skopeo, gpg); I-pull times one participant's pull
through that policy, decryption with the layer key (an in-memory fd) and ``umoci unpack``.
Each round uses a fresh folder. The image is about 160 files, one layer of about 350 kB.
"""

from __future__ import annotations

import itertools
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from bench.registry import BenchContext, Measurement, benchmark
from bench.timing import median_seconds
from hfl_lab.image import (
    LabRegistry,
    LayerKey,
    PublishedImage,
    ToolRunner,
    publish_workload_image,
    pull_image,
    require_tools,
)

REPO = Path(__file__).resolve().parents[1]


@contextmanager
def _registry() -> Iterator[tuple[LabRegistry, Path]]:
    require_tools()
    with tempfile.TemporaryDirectory(prefix="hfl-bench-image-") as folder:
        root = Path(folder)
        # closed also when it fails to start: a half-started registry does not outlive the run
        with LabRegistry(root / "registry", ToolRunner()) as registry:
            yield registry.start(), root


def _publisher(registry: LabRegistry, root: Path, key: LayerKey) -> Callable[[], PublishedImage]:
    rounds = itertools.count()

    def publish() -> PublishedImage:
        n = next(rounds)
        return publish_workload_image(root / f"image-{n}", registry, key.public_pem, root=REPO,
                                      runner=ToolRunner(), tag=f"round-{n}")

    return publish


@benchmark(
    "I-build",
    what="build (umoci, the files MR_TD measures: one layer of about 350 kB) + encrypt + push + "
    "sign (skopeo, a GPG key made for the run) + verify through the signedBy policy, against a "
    "docker-registry on loopback with TLS; median, s",
    unit="s",
    judged_by="value",
)
def image_build(ctx: BenchContext) -> Measurement:
    with _registry() as (registry, root):
        publish = _publisher(registry, root, LayerKey())
        return Measurement(median_seconds(publish, repeats=ctx.repeats(7, 3)))


@benchmark(
    "I-pull",
    what="one participant's pull of the workload image through the signedBy policy + "
    "decryption with the released layer key (an in-memory fd) + umoci unpack --rootless; "
    "median, s",
    unit="s",
    judged_by="value",
)
def image_pull(ctx: BenchContext) -> Measurement:
    with _registry() as (registry, root):
        key = LayerKey()
        source = _publisher(registry, root, key)().source
        secret = key.private_pem()
        rounds = itertools.count()

        def pull() -> None:
            dest = root / f"participant-{next(rounds)}"
            pull_image(source, secret, dest, who="the benchmark")
            shutil.rmtree(dest)

        return Measurement(median_seconds(pull, repeats=ctx.repeats(9, 3)))
