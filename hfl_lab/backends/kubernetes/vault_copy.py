"""Copy one file out of a pod, as ``kubectl cp`` does (exec + tar): the sealed model volume
from ps0's pod, the trust service's sealed state from its pod.

Both are ciphertext, so the copy needs no secrecy; it needs integrity: the pod
computes the SHA-256 first, the tar stream is unpacked strictly (one regular file, the
expected name, no links or paths), and the digest is checked before the file is renamed
into place.
"""

from __future__ import annotations

import hashlib
import io
import os
import re
import tarfile
import tempfile
from pathlib import Path, PurePosixPath

from hfl_lab._exceptions import BackendError

_SHA256_LINE = re.compile(rb"^([0-9a-f]{64})\s+\*?(\S.*)$")


def sha256_command(path: str) -> list[str]:
    return ["sha256sum", path]


def tar_command(path: str) -> list[str]:
    p = PurePosixPath(path)
    return ["tar", "cf", "-", "-C", str(p.parent), p.name]


def parse_sha256sum(output: bytes, path: str) -> str:
    """The digest from ``sha256sum path`` output; ``BackendError`` if it is not there."""
    for line in output.splitlines():
        match = _SHA256_LINE.match(line.strip())
        if match and match[2].decode(errors="replace") == path:
            return match[1].decode()
    raise BackendError(
        f"could not read the SHA-256 of {path} in the pod (got {output[:80]!r}).",
        fix="check that the file was written and that the container has sha256sum.",
    )


def extract_single_file(tar_bytes: bytes, name: str, dest: Path, expected_sha256: str) -> Path:
    """Unpack the one regular file ``name`` from a tar stream to ``dest``, checked, atomically."""
    try:
        with tarfile.open(fileobj=io.BytesIO(tar_bytes), mode="r|") as archive:
            members = 0
            for member in archive:
                members += 1
                if member.name != name or not member.isreg() or members > 1:
                    raise BackendError(
                        f"the archive of {name} holds {member.name!r} ({member.type!r}), expected "
                        f"the single regular file {name!r}.",
                        fix="copy it again; do not trust this archive.",
                    )
                source = archive.extractfile(member)
                if source is None:  # pragma: no cover - isreg() guarantees a file object
                    raise BackendError(f"{name} in the archive has no data.")
                dest.parent.mkdir(parents=True, exist_ok=True)
                fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.", dir=dest.parent)
                digest = hashlib.sha256()
                try:
                    with os.fdopen(fd, "wb") as out:
                        while chunk := source.read(1 << 20):
                            digest.update(chunk)
                            out.write(chunk)
                    if digest.hexdigest() != expected_sha256:
                        raise BackendError(
                            f"the copied {name}'s SHA-256 {digest.hexdigest()[:16]}… differs from "
                            f"the pod's {expected_sha256[:16]}…; the copy is corrupt.",
                            fix="copy it again.",
                        )
                    Path(tmp).replace(dest)
                except BaseException:
                    Path(tmp).unlink(missing_ok=True)
                    raise
            if members == 0:
                raise BackendError(f"the archive is empty; {name} was not found.")
    except tarfile.TarError as exc:
        raise BackendError(
            f"the archive of {name} is not a valid tar stream ({exc}).",
            fix="copy it again; check that the container has tar.",
        ) from None
    return dest
