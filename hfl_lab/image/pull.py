"""A participant's half of the pipeline: pull through the signature policy, decrypt, unpack.

:func:`pull_image` copies the image from the registry with skopeo under the owner's policy
(``signedBy`` the run's key; everything else refused), decrypting its layers with the layer key
the participant's TD obtained by attested release (:func:`~hfl_lab.image.layer_key.
obtain_layer_key`), handed to skopeo as an in-memory fd (memfd). It then checks that no layer stayed
encrypted and unpacks the image with ``umoci unpack --rootless`` into the participant's own
folder. A refusal is an ``ImageRefused`` whose message is one sentence naming the cause: no
signature, a signature that does not verify, a layer that is not the one the signed manifest
names, or a key that does not decrypt it.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

from hfl_lab._exceptions import HflLabError, ImageError, ImageRefused
from hfl_lab.image.layout import IMAGE_APP_DIR, OciImage, read_image
from hfl_lab.image.publish import ImageSource
from hfl_lab.image.tools import ToolRunner, last_line, secret_fd

__all__ = ["PulledImage", "pull_image", "refusal_cause"]

# What skopeo says, and the cause a person reads (matched in this order).
_CAUSES = (
    ("no signature exists", "it carries no signature by the owner's key"),
    ("Digest did not match", "a layer is not the one the signed manifest names (it was "
     "modified after signing)"),
    ("no suitable key unwrapper", "the layer key does not decrypt its layers"),
    ("decrypting layer", "the layer key does not decrypt its layers"),
    ("is not accepted", "its signature does not verify against the owner's key"),
    ("Invalid GPG signature", "its signature does not verify against the owner's key"),
    ("signature", "its signature does not verify against the owner's key"),
    ("Running image", "the signature policy refuses it"),
    ("rejected", "the signature policy refuses it"),
)


def refusal_cause(stderr: str) -> str | None:
    """The cause of a refused pull, in words, from skopeo's error output; None when skopeo
    failed for another reason (the registry unreachable, a full disk)."""
    line = last_line(stderr)
    for needle, cause in _CAUSES:
        if needle in line:
            return cause
    return None


@dataclass(frozen=True)
class PulledImage:
    """A verified, decrypted and unpacked image in a participant's folder."""

    image: OciImage  # the decrypted layout it was unpacked from
    bundle: Path
    workload_root: Path  # where the workload's files are: run `python -m trainer` here

    @property
    def entrypoint(self) -> list[str]:
        return list(self.image.config.get("config", {}).get("Entrypoint") or [])


def pull_image(
    source: ImageSource, layer_key_pem: bytes, dest: Path, *, who: str = "this participant",
    runner: ToolRunner | None = None,
) -> PulledImage:
    """Pull ``source`` into ``dest`` (made afresh): verify, decrypt, unpack. ``who`` names the
    puller in a refusal."""
    runner = runner or ToolRunner()
    if dest.exists():
        shutil.rmtree(dest)
    dest.mkdir(parents=True)
    layout = dest / "oci"

    def refused(stderr: str) -> HflLabError:
        cause = refusal_cause(stderr)
        if cause is None:
            return ImageError(
                f"{who} could not pull the image {source.reference}: {last_line(stderr)}",
                fix="check that the run's registry serves (image/registry/registry.log), then "
                "start the participant again.")
        return ImageRefused(
            f"{who} refused the image {source.reference}: {cause}.",
            fix="publish the image again (notebook 03; the local backend does at each new run) "
            "and find who changed it; the participant runs nothing it could not verify and "
            "decrypt.")

    try:
        with secret_fd(layer_key_pem) as fd:
            runner.run("pull", [
                "skopeo", "copy", "--quiet", "--remove-signatures",
                "--policy", str(source.policy_path), "--registries.d", str(source.registries_d),
                "--src-cert-dir", str(source.cert_dir), "--decryption-key", f"/dev/fd/{fd}",
                f"docker://{source.reference}", f"oci:{layout}:workload",
            ], pass_fds=(fd,), failure=refused,
                digest=lambda: read_image(layout, "workload").manifest_digest)
        image = read_image(layout, "workload")
        if not image.layers or any(layer.encrypted for layer in image.layers):
            raise ImageRefused(
                f"{who} refused the image {source.reference}: a layer stayed encrypted after "
                "the pull.", fix="give the pull the layer key the trust service released.")
        bundle = dest / "bundle"
        runner.run("unpack", ["umoci", "unpack", "--rootless", "--image",
                              f"{layout}:workload", str(bundle)],
                   digest=lambda: image.manifest_digest)
    except BaseException:
        shutil.rmtree(dest, ignore_errors=True)
        raise
    root = bundle / "rootfs" / IMAGE_APP_DIR.lstrip("/")
    if not (root / "trainer").is_dir():
        raise ImageError(f"the unpacked image has no trainer/ under {IMAGE_APP_DIR}.",
                         fix="publish the workload image again (notebook 03).")
    return PulledImage(image, bundle, root)
