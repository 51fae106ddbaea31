"""Copy one file out of a pod, as ``kubectl cp`` does (exec + tar): the sealed model volume
from ps0's pod, the trust service's sealed state from its pod. On the TDX overlays the agent
policy denies exec into a TD, so a plain reader pod mounts the file's volume read-only and the
copy runs there (:class:`CopyOut`).

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
import time
from pathlib import Path, PurePosixPath
from typing import Any

from hfl_lab._exceptions import ApiError, BackendError
from hfl_lab.backends.kubernetes.cluster_api import ClusterApi
from hfl_lab.backends.kubernetes.render import pod_path
from hfl_lab.backends.kubernetes.settings import KubernetesSettings

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


#: the reader pod (TDX overlays): its container and where it mounts the volume
READER_CONTAINER = "reader"
READER_MOUNT = "/claim"
READER_TIMEOUT_S = 300.0


class CopyOut:
    """``kubectl cp`` of one file: SHA-256 in the pod, tar over exec, checked locally."""

    def __init__(self, api: ClusterApi, settings: KubernetesSettings) -> None:
        self.api = api
        self.settings = settings

    def copy(self, pod: str, container: str, in_pod: str, dest: Path, fix: str,
             claim: tuple[str, str]) -> Path:
        """``in_pod`` of ``pod`` to ``dest``. On the TDX overlays a reader pod mounts the
        file's volume (``claim``: its PVC and where ``pod`` mounts it) read-only instead: the
        file is ciphertext, checked by the owner, so that path may be untrusted."""
        if not self.settings.uses_tdx:
            return self.exec_copy(pod, container, pod_path(self.settings, in_pod), dest, fix)
        name, mount = claim
        reader = f"hfl-reader-{name}"
        try:
            self.start_reader(reader, name, pod)
            path = READER_MOUNT + in_pod.removeprefix(mount)
            return self.exec_copy(reader, READER_CONTAINER, path, dest, fix)
        finally:
            try:
                self.api.delete(f"/api/v1/namespaces/{self.settings.namespace}/pods/{reader}")
            except ApiError as exc:
                if exc.status != 404:
                    raise

    def start_reader(self, reader: str, claim: str, next_to: str) -> None:
        """A non-TD pod on ``next_to``'s node (the volume may attach to one node only) that
        mounts PVC ``claim`` read-only; returns once it runs."""
        ns = self.settings.namespace
        pods = f"/api/v1/namespaces/{ns}/pods"
        node = (self.api.get(f"{pods}/{next_to}").get("spec") or {}).get("nodeName")
        self.api.apply(reader_pod(reader, ns, claim, self.settings.reader_image, node),
                       self.settings.field_manager)
        deadline = time.monotonic() + READER_TIMEOUT_S
        while True:
            status = self.api.get(f"{pods}/{reader}").get("status") or {}
            if status.get("phase") == "Running":
                return
            if status.get("phase") in ("Failed", "Succeeded") or time.monotonic() > deadline:
                raise BackendError(
                    f"the reader pod {reader} for volume {claim} did not start "
                    f"(phase {status.get('phase') or 'Pending'}).",
                    fix=f"check that the cluster can pull {self.settings.reader_image} (set "
                    "reader_image to a copy in your registry) and that the volume is bound: "
                    f"kubectl -n {ns} describe pod {reader}.",
                )
            time.sleep(self.settings.poll_interval_s)

    def exec_copy(self, pod: str, container: str, path: str, dest: Path, fix: str) -> Path:
        ns = self.settings.namespace
        digest_run = self.api.exec(ns, pod, container, sha256_command(path))
        if digest_run.returncode != 0:
            raise BackendError(
                f"{path} cannot be read in pod {pod}: "
                f"{digest_run.stderr.decode(errors='replace').strip()}.",
                fix=fix,
            )
        digest = parse_sha256sum(digest_run.stdout, path)
        tar_run = self.api.exec(ns, pod, container, tar_command(path))
        if tar_run.returncode != 0:
            raise BackendError(
                f"tar of {path} in pod {pod} failed: "
                f"{tar_run.stderr.decode(errors='replace').strip()}.",
                fix=f"check that the {container} container is running, then retry.",
            )
        return extract_single_file(tar_run.stdout, Path(path).name, dest, digest)


def reader_pod(name: str, namespace: str, claim: str, image: str,
               node: str | None) -> dict[str, Any]:
    """A plain pod that mounts PVC ``claim`` read-only at :data:`READER_MOUNT` and idles (it is
    deleted after the copy); as the participants' user, so it reads their files."""
    spec: dict[str, Any] = {
        "restartPolicy": "Never",
        "automountServiceAccountToken": False,
        "enableServiceLinks": False,
        "securityContext": {"runAsNonRoot": True, "runAsUser": 10001, "runAsGroup": 10001,
                            "seccompProfile": {"type": "RuntimeDefault"}},
        "containers": [{
            "name": READER_CONTAINER,
            "image": image,
            "command": ["sleep", str(int(READER_TIMEOUT_S) * 2)],
            "volumeMounts": [{"name": "claim", "mountPath": READER_MOUNT, "readOnly": True}],
            "securityContext": {"allowPrivilegeEscalation": False, "readOnlyRootFilesystem": True,
                                "capabilities": {"drop": ["ALL"]}},
        }],
        "volumes": [{"name": "claim",
                     "persistentVolumeClaim": {"claimName": claim, "readOnly": True}}],
    }
    if node:
        spec["nodeName"] = node
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "namespace": namespace,
                     "labels": {"app.kubernetes.io/managed-by": "hfl-lab",
                                "app.kubernetes.io/component": "reader"}},
        "spec": spec,
    }
