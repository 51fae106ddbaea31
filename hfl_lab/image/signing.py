"""The owner's image signature: a GPG key made for one run, simple signing, a ``signedBy`` policy.

skopeo signs with GPG (Debian's skopeo has sigstore signing disabled), and gpg needs a keyring
directory: :class:`RunSigner` makes one in a private temporary folder (in ``/dev/shm``, memory,
where there is one), generates an unprotected Ed25519 signing key there, stops the gpg-agent it
started and removes the whole folder on :meth:`RunSigner.close`, so no private key of the
signer remains on disk after the signing step. What stays is public: the signer's key
(``signer.asc``), the signatures (a lookaside folder) and the policy that names the key
(:func:`signature_policy`) together with the ``registries.d`` entry that points skopeo at the
signatures (:func:`lookaside_config`).
"""

from __future__ import annotations

import base64
import contextlib
import os
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Any

from hfl_lab._exceptions import ImageError
from hfl_lab._resources import ClosingContext
from hfl_lab.image.tools import ToolRunner

__all__ = ["RunSigner", "lookaside_config", "owner_push_policy", "signature_policy"]

_KEY_PARAMETERS = """%no-protection
Key-Type: EDDSA
Key-Curve: ed25519
Key-Usage: sign
Name-Real: {name}
Name-Email: image-signer@hfl-lab.invalid
Expire-Date: 2d
%commit
"""


def _private_tmp() -> str | None:
    # memory-backed on Linux: the keyring never reaches a disk (mkdtemp: random name, 0700)
    shm = Path("/dev/shm")  # noqa: S108
    return str(shm) if shm.is_dir() and os.access(shm, os.W_OK) else None


class RunSigner(ClosingContext):
    """A signing key for one run, in a temporary keyring removed by :meth:`close`."""

    def __init__(self, runner: ToolRunner, name: str = "hfl-lab workload image signer") -> None:
        self.runner = runner
        self.home = Path(tempfile.mkdtemp(prefix="hfl-lab-gpg-", dir=_private_tmp()))
        self.home.chmod(0o700)
        self.env = {"GNUPGHOME": str(self.home)}
        try:
            runner.run("sign: key", ["gpg", "--batch", "--quiet", "--gen-key"],
                       env=self.env, stdin=_KEY_PARAMETERS.format(name=name).encode())
            listing = runner.run("sign: key", ["gpg", "--batch", "--with-colons",
                                               "--list-secret-keys"], env=self.env).stdout
            fingerprints = [line.split(":")[9] for line in listing.splitlines()
                            if line.startswith("fpr:")]
            if not fingerprints:
                raise ImageError("gpg made no signing key.", fix="check that gnupg works here.")
            self.fingerprint = fingerprints[0]
            self.public_key = runner.run(
                "sign: key", ["gpg", "--batch", "--armor", "--export", self.fingerprint],
                env=self.env, digest=lambda: f"openpgp:{self.fingerprint}").stdout.encode()
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        """Stop the gpg-agent this keyring started, then remove the keyring."""
        if not self.home.exists():
            return
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            subprocess.run(["gpgconf", "--homedir", str(self.home), "--kill", "all"],
                           capture_output=True, timeout=10, check=False)
        shutil.rmtree(self.home, ignore_errors=True)

    def __repr__(self) -> str:
        return f"RunSigner({getattr(self, 'fingerprint', '?')}, <key in a temporary keyring>)"


def signature_policy(repository: str, public_key: bytes) -> dict[str, Any]:
    """containers-policy.json: everything refused except ``repository`` signed by the key
    (embedded, so the file alone is enough on another machine)."""
    return {
        "default": [{"type": "reject"}],
        "transports": {"docker": {repository: [{
            "type": "signedBy", "keyType": "GPGKeys",
            "keyData": base64.b64encode(public_key).decode(),
        }]}},
    }


def owner_push_policy() -> dict[str, Any]:
    """The policy the owner's own copies run under: it reads its freshly built OCI layout and
    nothing else (a pull never uses this one)."""
    return {"default": [{"type": "reject"}],
            "transports": {"oci": {"": [{"type": "insecureAcceptAnything"}]}}}


def lookaside_config(registry: str, signatures: Path) -> str:
    """A registries.d file: the signatures of ``registry``'s images are files in
    ``signatures`` (read at pull, written at signing)."""
    url = signatures.resolve().as_uri()
    return (f"# simple-signing signatures of the lab registry's images (hfl_lab.image)\n"
            f"docker:\n  {registry}:\n    lookaside: {url}\n    lookaside-staging: {url}\n")
