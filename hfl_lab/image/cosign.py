"""The cosign signature beside the GPG one: made where ``cosign`` is installed, else the command.

Debian's skopeo has sigstore signing disabled, so the lab's own signature is GPG simple signing
(:mod:`.signing`). CoCo's image-rs checks cosign (sigstore) signatures, so where ``cosign`` is
installed :func:`cosign_sign` signs the pushed image by digest with a key pair made for the run
and writes what a verifier needs: ``cosign.pub``, a containers-policy ``policy-sigstore.json``
whose rule is ``sigstoreSigned`` by that key (:func:`sigstore_policy`), and a ``registries.d``
entry that makes skopeo read the signature from the registry (:func:`sigstore_registries_d`).

cosign keeps its private key in a file encrypted with a password. The password is random, made
in memory, and reaches cosign only in its own environment (``COSIGN_PASSWORD``, never argv or a
log); the key file lives in a private temporary folder (memory-backed ``/dev/shm`` where there
is one) removed with everything in it once the image is signed, as the GPG keyring is. Where
cosign is not installed, :func:`require_cosign` refuses with the install step and the exact
commands (:func:`cosign_commands`), which notebook 03 prints.
"""

from __future__ import annotations

import base64
import json
import secrets
import shlex
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hfl_lab._exceptions import ImageError
from hfl_lab.image.publish import PublishedImage
from hfl_lab.image.signing import _private_tmp
from hfl_lab.image.tools import ToolRunner

__all__ = [
    "COSIGN_INSTALL",
    "CosignSignature",
    "command_line",
    "cosign_commands",
    "cosign_sign",
    "pinned_reference",
    "require_cosign",
    "sigstore_policy",
    "sigstore_registries_d",
]

COSIGN_INSTALL = (
    "install cosign (https://docs.sigstore.dev/cosign/system_config/installation/; one static "
    "binary on PATH), then run this step again"
)
_KEY_PREFIX = "cosign"


def pinned_reference(reference: str, digest: str) -> str:
    """``registry/repository@digest`` of a ``registry/repository:tag`` reference: cosign signs a
    digest, never a tag, which can move."""
    name = reference.rsplit("@", 1)[0]
    last = name.rsplit("/", 1)[-1]
    if ":" in last:
        name = name[: -(len(last) - last.index(":"))]
    if not digest.startswith("sha256:") or len(digest) != 71:
        raise ImageError(f"{digest!r} is not an image digest (sha256:<64 hex>).",
                         fix="sign the digest the push reported (image/pipeline.json).")
    return f"{name}@{digest}"


def cosign_commands(pinned: str, key_dir: Path, public_key: Path) -> list[tuple[str, list[str]]]:
    """(step, argv) of the key pair, the signature and its check, for the image ``pinned``
    (``name@sha256:...``); the password comes from ``COSIGN_PASSWORD``."""
    prefix = key_dir / _KEY_PREFIX
    return [
        ("cosign: key", ["cosign", "generate-key-pair", "--output-key-prefix", str(prefix)]),
        ("sign (cosign)", ["cosign", "sign", "--yes", "--tlog-upload=false", "--key",
                           f"{prefix}.key", pinned]),
        ("verify (cosign)", ["cosign", "verify", "--insecure-ignore-tlog=true", "--key",
                             str(public_key), pinned]),
    ]


def command_line(pinned: str, public_key: Path) -> str:
    """The cosign step as one shell line a person can run (in a folder of their own: the key
    pair is written there), the password asked for or taken from ``COSIGN_PASSWORD``."""
    return " && ".join(shlex.join(argv) for _, argv in cosign_commands(pinned, Path(), public_key))


def require_cosign(pinned: str, folder: Path) -> None:
    """``ImageError`` naming the install step and the exact commands where cosign is missing."""
    if shutil.which("cosign") is not None:
        return
    commands = command_line(pinned, folder / "cosign.pub")
    raise ImageError(
        "cosign is not installed here, and Debian's skopeo has sigstore signing disabled, so "
        f"the image carries the GPG signature only; the cosign step would run: {commands}",
        fix=COSIGN_INSTALL)


def sigstore_policy(repository: str, public_key: bytes) -> dict[str, Any]:
    """containers-policy.json: everything refused except ``repository``'s images carrying a
    cosign signature by ``public_key`` (embedded, so the file alone is enough elsewhere)."""
    if b"PUBLIC KEY" not in public_key:
        raise ImageError("the cosign public key is not a PEM public key.",
                         fix="pass cosign.pub as cosign generate-key-pair wrote it.")
    return {
        "default": [{"type": "reject"}],
        "transports": {"docker": {repository: [{
            "type": "sigstoreSigned",
            "keyData": base64.b64encode(public_key).decode(),
            "signedIdentity": {"type": "matchRepository"},
        }]}},
    }


def sigstore_registries_d(registry: str) -> str:
    """A registries.d file: read ``registry``'s cosign signatures from the registry itself."""
    return (f"# cosign signatures of {registry}'s images are in the registry (hfl_lab.image)\n"
            f"docker:\n  {registry}:\n    use-sigstore-attachments: true\n")


@dataclass(frozen=True)
class CosignSignature:
    """What the cosign step wrote: the signed digest and the public files."""

    pinned: str
    public_key: Path
    policy: Path
    registries_d: Path


def cosign_sign(published: PublishedImage, folder: Path, runner: ToolRunner) -> CosignSignature:
    """Sign ``published`` by digest with a cosign key pair made for this step, check the
    signature with cosign, and write ``cosign.pub``, ``policy-sigstore.json`` and
    ``registries.d-sigstore/`` into ``folder`` (the run's ``image/``)."""
    pinned = pinned_reference(published.source.reference, published.source.digest)
    require_cosign(pinned, folder)
    public_key = folder / "cosign.pub"
    # cosign trusts the system's CAs, and with SSL_CERT_DIR the registry's (the lab CA)
    env = {"SSL_CERT_DIR": str(published.source.cert_dir)}
    home = Path(tempfile.mkdtemp(prefix="hfl-lab-cosign-", dir=_private_tmp()))
    try:
        home.chmod(0o700)
        env["COSIGN_PASSWORD"] = secrets.token_urlsafe(32)
        key_step, sign_step, verify_step = cosign_commands(pinned, home, public_key)
        runner.run(key_step[0], key_step[1], env=env)
        shutil.copyfile(home / f"{_KEY_PREFIX}.pub", public_key)
        runner.run(sign_step[0], sign_step[1], env=env,
                   digest=lambda: published.source.digest)
    finally:
        shutil.rmtree(home, ignore_errors=True)
    runner.run(verify_step[0], verify_step[1], env={"SSL_CERT_DIR": env["SSL_CERT_DIR"]},
               digest=lambda: published.source.digest)
    repository = pinned.rsplit("@", 1)[0]
    registry = repository.split("/", 1)[0]
    policy = folder / "policy-sigstore.json"
    policy.write_text(json.dumps(sigstore_policy(repository, public_key.read_bytes()),
                                 indent=2) + "\n")
    registries_d = folder / "registries.d-sigstore"
    registries_d.mkdir(exist_ok=True)
    (registries_d / "hfl-lab.yaml").write_text(sigstore_registries_d(registry))
    return CosignSignature(pinned, public_key, policy, registries_d)
