"""The owner's half of the pipeline: build, encrypt, push and sign the workload image, verify it.

:func:`publish_workload_image` runs, each step through the :class:`ToolRunner` (recorded with its
command, time and digest):

1. **build**: umoci, rootless, from the files MR_TD measures (:mod:`.layout`), into
   ``image/build/`` (plain, on the owner's machine only, removed at the end);
2. **encrypt**: ``skopeo copy --encryption-key jwe:<layer public key>`` into
   ``image/encrypted/`` (the layers become ``...tar+gzip+encrypted``);
3. **push and sign**: ``skopeo copy --sign-by <run key>`` to the lab registry; the signature
   (simple signing, over the pushed manifest's digest) goes to ``image/signatures/``; the
   registry never holds a plain layer;
4. **verify**: ``skopeo copy`` back from the registry through ``image/policy.json``
   (``signedBy`` the run's key) into ``image/oci/``, the encrypted image as an OCI layout that
   stock skopeo can check elsewhere.

The signing key lives in a temporary keyring removed after step 3 (:class:`RunSigner`). Steps 2
to 4 are :func:`publish_image`, the same for the cluster's full image, which buildah or docker
builds from native/image/Dockerfile (:mod:`.container`) and which goes to the user's registry.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hfl_lab._exceptions import ImageError
from hfl_lab.image.layout import OciImage, build_workload_image, read_image
from hfl_lab.image.registry import LabRegistry, RegistryTarget
from hfl_lab.image.signing import (
    RunSigner,
    lookaside_config,
    owner_push_policy,
    signature_policy,
)
from hfl_lab.image.tools import ToolRecord, ToolRunner, require_tools

__all__ = ["REPOSITORY", "ImageSource", "PublishedImage", "publish_image", "publish_workload_image"]

REPOSITORY = "hfl-lab/workload"


@dataclass(frozen=True)
class ImageSource:
    """Where a participant pulls from and what it checks: all public (the run folder's
    ``image/``), so it can travel in the participant's configuration."""

    reference: str  # registry/repository:tag
    digest: str  # the signed manifest's digest
    policy_path: Path
    registries_d: Path
    cert_dir: Path

    def to_dict(self) -> dict[str, str]:
        return {"reference": self.reference, "digest": self.digest,
                "policy_path": str(self.policy_path), "registries_d": str(self.registries_d),
                "cert_dir": str(self.cert_dir)}

    @classmethod
    def from_dict(cls, raw: dict[str, str]) -> ImageSource:
        return cls(raw["reference"], raw["digest"], Path(raw["policy_path"]),
                   Path(raw["registries_d"]), Path(raw["cert_dir"]))


@dataclass
class PublishedImage:
    """What the owner made: the plain and the encrypted image, the signer, the files."""

    source: ImageSource
    plain: OciImage
    encrypted: OciImage
    fingerprint: str
    files: dict[str, str]
    records: list[ToolRecord] = field(default_factory=list)
    #: SHA-256 of ``policy.json`` as the owner wrote it (a participant checks the file by it)
    policy_sha256: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {
            "source": self.source.to_dict(),
            "signer_fingerprint": self.fingerprint,
            "policy_sha256": self.policy_sha256,
            "plain": {"manifest": self.plain.manifest_digest, "size": self.plain.size,
                      "media_types": self.plain.media_types},
            "encrypted": {"manifest": self.encrypted.manifest_digest,
                          "size": self.encrypted.size,
                          "media_types": self.encrypted.media_types},
            "entrypoint": self.plain.config.get("config", {}).get("Entrypoint"),
            "files": self.files,
            "steps": [r.to_dict() for r in self.records],
        }


def _write_json(path: Path, value: Any) -> Path:
    path.write_text(json.dumps(value, indent=2) + "\n")
    return path


def publish_workload_image(
    folder: Path,
    registry: LabRegistry,
    layer_public_pem: bytes,
    *,
    root: Path,
    runner: ToolRunner | None = None,
    tag: str = "run",
) -> PublishedImage:
    """Build the workload of ``root`` with umoci, then encrypt, push, sign and verify it in the
    run's own ``registry`` (see the module's docstring); ``folder`` is the run's ``image/``.
    ``registry`` must be started."""
    require_tools("umoci", "skopeo", "gpg", "gpgconf")
    runner = runner or registry.runner
    if not registry.running:
        raise ImageError("the lab registry is not running.", fix="start it first (start()).")
    folder.mkdir(parents=True, exist_ok=True)
    # 1. build
    plain = build_workload_image(runner, root, folder / "build", "workload")
    return publish_image(folder, plain, registry.target, layer_public_pem, runner=runner,
                         repository=REPOSITORY, tag=tag)


def publish_image(
    folder: Path,
    plain: OciImage,
    registry: RegistryTarget,
    layer_public_pem: bytes,
    *,
    runner: ToolRunner,
    repository: str = REPOSITORY,
    tag: str = "run",
) -> PublishedImage:
    """Steps 2 to 4 for an image already built into an OCI layout (by umoci here, by buildah or
    docker from native/image/Dockerfile for a cluster, :mod:`.container`): encrypt it, push
    and sign it as ``<registry>/<repository>:<tag>``, verify it through the written policy into
    ``image/oci/``. The plain layout is removed at the end: it never leaves the owner's
    machine."""
    require_tools("skopeo", "gpg", "gpgconf")
    folder.mkdir(parents=True, exist_ok=True)
    work = folder / "work"
    work.mkdir(exist_ok=True)
    reference = f"{registry.address}/{repository}:{tag}"
    repository_name = f"{registry.address}/{repository}"
    files = {
        "policy": folder / "policy.json",
        "signer": folder / "signer.asc",
        "registries_d": folder / "registries.d",
        "signatures": folder / "signatures",
        "oci": folder / "oci",
        "layer_public_key": folder / "layer-key.pub.pem",
        "cert_dir": registry.cert_dir,
    }
    files["registries_d"].mkdir(exist_ok=True)
    files["signatures"].mkdir(exist_ok=True)
    registry.cert_dir.mkdir(parents=True, exist_ok=True)
    (files["registries_d"] / "hfl-lab.yaml").write_text(
        lookaside_config(registry.address, files["signatures"]))
    files["layer_public_key"].write_bytes(layer_public_pem)
    push_policy = _write_json(work / "owner-push-policy.json", owner_push_policy())

    # 2. encrypt (on the owner's machine: the registry never receives a plain layer)
    encrypted_layout = folder / "encrypted"
    shutil.rmtree(encrypted_layout, ignore_errors=True)
    runner.run("encrypt", [
        "skopeo", "copy", "--quiet", "--policy", str(push_policy),
        "--encryption-key", f"jwe:{files['layer_public_key']}",
        plain.reference, f"oci:{encrypted_layout}:workload",
    ], digest=lambda: read_image(encrypted_layout, "workload").manifest_digest)
    encrypted = read_image(encrypted_layout, "workload")
    # 3. push and sign, with a key that exists for this step only
    with RunSigner(runner) as signer:
        files["signer"].write_bytes(signer.public_key)
        digest_file = work / "pushed.digest"
        runner.run("push and sign", [
            "skopeo", "copy", "--quiet", "--policy", str(push_policy), "--preserve-digests",
            "--registries.d", str(files["registries_d"]), *registry.flags("dest"),
            "--sign-by", signer.fingerprint, "--digestfile", str(digest_file),
            encrypted.reference, f"docker://{reference}",
        ], env=signer.env, digest=lambda: digest_file.read_text().strip())
        fingerprint = signer.fingerprint
        public_key = signer.public_key
    pushed = digest_file.read_text().strip()
    policy_sha256 = hashlib.sha256(
        _write_json(files["policy"], signature_policy(repository_name, public_key)).read_bytes()
    ).hexdigest()
    # 4. verify through the policy, as a participant will, into the outsider's OCI layout
    shutil.rmtree(files["oci"], ignore_errors=True)
    runner.run("verify", [
        "skopeo", "copy", "--quiet", "--remove-signatures", "--preserve-digests",
        "--policy", str(files["policy"]), "--registries.d", str(files["registries_d"]),
        *registry.flags("src"),
        f"docker://{reference}", f"oci:{files['oci']}:workload",
    ], digest=lambda: read_image(files["oci"], "workload").manifest_digest)
    exported = read_image(files["oci"], "workload")
    if exported.manifest_digest != pushed or not all(x.encrypted for x in exported.layers):
        raise ImageError(
            f"the image read back from the registry ({exported.manifest_digest}) is not the one "
            f"signed ({pushed}) or has a plain layer.",
            fix="read the registry's log; rerun the image step.")
    # image/oci/ is the encrypted image; the plain layout leaves the run folder
    shutil.rmtree(encrypted_layout, ignore_errors=True)
    shutil.rmtree(plain.layout, ignore_errors=True)
    source = ImageSource(reference, pushed, files["policy"], files["registries_d"],
                         registry.cert_dir)
    published = PublishedImage(source, plain, exported, fingerprint,
                               {k: str(v) for k, v in files.items()}, list(runner.records),
                               policy_sha256)
    _write_json(folder / "pipeline.json", published.to_dict())
    return published
