"""Build, encrypt, sign and verify the participant image; and what of it is measured where.

Each step checks its tool (docker, skopeo, cosign), builds the exact command, runs it and
reports (:class:`ToolRun`); a missing tool is a ``BackendError`` that says how to install it.

What is measured where under kata-qemu-tdx (Confidential Containers):

* MRTD measures the TD firmware (TDVF); RTMR0 its configuration; RTMR1 the guest kernel;
  RTMR2 the kernel command line (so ``kernel_params`` set by native/coco/kata_config.sh) and
  the initrd/rootfs with the kata agent. The container image is **not** in any of them.
* The image is pulled inside the TD by image-rs, which verifies its cosign signature against
  the signature policy (pinned to the image's digest, see :func:`signature_policy`) and gets
  the layer key from the KBS only after the TD attested. So the image's digest reaches the
  attestation evidence through the policy the TD was given: put that policy in the pod's
  initdata, whose SHA-384 the TD reports as MRCONFIGID (:func:`initdata_reference_values`
  gives the ``mr_config_id`` reference value for the lab's AttestationPolicy).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hfl_lab._exceptions import BackendError, ConfigError
from hfl_lab.image import IMAGE_APP_ID, LAYER_KEY_NAME

INSTALL = {
    "docker": "install Docker Engine (https://docs.docker.com/engine/install/) and start it.",
    "skopeo": "install skopeo (apt-get install skopeo).",
    "cosign": "install cosign (https://docs.sigstore.dev/cosign/system_config/installation/).",
}
_DIGEST = re.compile(r"^sha256:[0-9a-f]{64}$")
#: where a CoCo guest finds the image's artefacts in Trustee's KBS (its resource paths)
SECURITY_POLICY_URI = "kbs:///default/security-policy/hfl-lab"
SIGNATURE_KEY_URI = "kbs:///default/cosign-public-key/hfl-lab"
LAYER_KEY_URI = "kbs:///default/image_key/hfl-lab"
#: where the run's trust service holds the layer key (hfl_lab.image.layer_key's app and name)
TRUST_SERVICE_KEY = f"{IMAGE_APP_ID}/{LAYER_KEY_NAME}"


@dataclass(frozen=True)
class ToolRun:
    """One command that ran: its argv, exit status and output."""

    argv: tuple[str, ...]
    returncode: int
    stdout: str
    stderr: str

    @property
    def command_line(self) -> str:
        return " ".join(self.argv)


def require_tool(name: str) -> str:
    """The tool's path; ``BackendError`` naming the install step when it is missing."""
    path = shutil.which(name)
    if path is None:
        raise BackendError(f"{name} is not installed on this machine.", fix=INSTALL[name])
    return path


def run_tool(
    argv: Sequence[str], env: Mapping[str, str] | None = None, timeout_s: float = 3600
) -> ToolRun:
    """Run ``argv`` (its tool must be installed); ``BackendError`` with stderr if it fails."""
    require_tool(argv[0])
    full_env = {**os.environ, **(env or {})}
    try:
        result = subprocess.run(
            list(argv), capture_output=True, text=True, env=full_env, timeout=timeout_s, check=False
        )
    except subprocess.TimeoutExpired:
        raise BackendError(
            f"{argv[0]} did not finish within {timeout_s:.0f} s.",
            fix="check the registry connection and retry.",
        ) from None
    run = ToolRun(tuple(argv), result.returncode, result.stdout, result.stderr)
    if run.returncode != 0:
        tail = run.stderr.strip().splitlines()[-1:] or ["(no output)"]
        raise BackendError(
            f"`{run.command_line}` failed with exit code {run.returncode}: {tail[0]}",
            fix=f"fix what {argv[0]} reports, then rerun this step.",
        )
    return run


# -- command builders -----------------------------------------------------------------------


def build_command(tag: str, repo_root: Path) -> list[str]:
    return [
        "docker",
        "build",
        "-f",
        str(repo_root / "native/image/Dockerfile"),
        "-t",
        tag,
        str(repo_root),
    ]


def push_command(tag: str) -> list[str]:
    return ["docker", "push", tag]


def digest_command(ref: str, insecure: bool = False) -> list[str]:
    argv = ["skopeo", "inspect", "--format", "{{.Digest}}"]
    if insecure:
        argv.append("--tls-verify=false")
    return [*argv, f"docker://{ref}"]


def keyprovider_config(grpc_address: str = "127.0.0.1:50000") -> dict[str, Any]:
    """ocicrypt's key-provider config pointing skopeo at CoCo's keyprovider (attestation-agent)."""
    return {"key-providers": {"attestation-agent": {"grpc": grpc_address}}}


def encrypt_command(
    src: str, dst: str, key_path: Path, key_id: str, insecure: bool = False
) -> list[str]:
    """skopeo copy that encrypts every layer with the key ``key_id`` names in the KBS."""
    if not re.fullmatch(r"[A-Za-z0-9_-]+", key_id):
        raise ConfigError(f"key id {key_id!r} must be letters, digits, '_' or '-'.")
    provider = (
        f"provider:attestation-agent:keypath={key_path}"
        f"::keyid=kbs:///default/image_key/{key_id}::algorithm=A256GCM"
    )
    argv = ["skopeo", "copy", "--insecure-policy", "--encryption-key", provider]
    if insecure:
        argv += ["--src-tls-verify=false", "--dest-tls-verify=false"]
    return [*argv, f"docker://{src}", f"docker://{dst}"]


def _pinned(image_name: str, digest: str) -> str:
    if not _DIGEST.match(digest):
        raise ConfigError(f"{digest!r} is not an image digest (sha256:<64 hex>).")
    return f"{image_name}@{digest}"


def sign_command(image_name: str, digest: str, key: Path) -> list[str]:
    """cosign sign of the image by digest (never by tag, which can move)."""
    return [
        "cosign",
        "sign",
        "--yes",
        "--tlog-upload=false",
        "--key",
        str(key),
        _pinned(image_name, digest),
    ]


def verify_command(image_name: str, digest: str, pubkey: Path) -> list[str]:
    return [
        "cosign",
        "verify",
        "--insecure-ignore-tlog=true",
        "--key",
        str(pubkey),
        _pinned(image_name, digest),
    ]


# -- runners ----------------------------------------------------------------------------------


def build_image(tag: str, repo_root: Path) -> ToolRun:
    return run_tool(build_command(tag, repo_root))


def image_digest(ref: str, insecure: bool = False) -> str:
    digest = run_tool(digest_command(ref, insecure)).stdout.strip()
    if not _DIGEST.match(digest):
        raise BackendError(f"skopeo returned {digest!r} for {ref}, not a digest.")
    return digest


def encrypt_image(
    src: str,
    dst: str,
    key_path: Path,
    key_id: str,
    workdir: Path,
    insecure: bool = False,
    grpc_address: str = "127.0.0.1:50000",
) -> ToolRun:
    """Encrypt ``src`` into ``dst`` (the coco-keyprovider must listen on ``grpc_address``)."""
    config = workdir / "ocicrypt.conf"
    config.write_text(json.dumps(keyprovider_config(grpc_address)))
    return run_tool(
        encrypt_command(src, dst, key_path, key_id, insecure),
        env={"OCICRYPT_KEYPROVIDER_CONFIG": str(config)},
    )


def sign_image(image_name: str, digest: str, key: Path, password: str = "") -> ToolRun:
    return run_tool(sign_command(image_name, digest, key), env={"COSIGN_PASSWORD": password})


def verify_image(image_name: str, digest: str, pubkey: Path) -> ToolRun:
    return run_tool(verify_command(image_name, digest, pubkey))


# -- KBS side: keys and signature policy --------------------------------------------------


def signature_policy(image_name: str, key_uri: str = SIGNATURE_KEY_URI) -> dict[str, Any]:
    """containers-policy.json for image-rs: reject everything but ``image_name`` signed by us."""
    return {
        "default": [{"type": "reject"}],
        "transports": {"docker": {image_name: [{"type": "sigstoreSigned", "keyPath": key_uri}]}},
    }


def initdata_toml(kbs_url: str, image_name: str, digest: str | None,
                  extra: Mapping[str, str] | None = None) -> str:
    """CoCo initdata for a pod: the KBS address, an image policy pinned to ``digest`` (when
    there is one), and ``extra`` files (name → text, e.g. the role and the agent policy)."""
    parts = [
        'version = "0.1.0"\nalgorithm = "sha384"\n\n[data]\n',
        f'"aa.toml" = """\n[token_configs.kbs]\nurl = "{kbs_url}"\n"""\n',
        f'"cdh.toml" = """\n[kbc]\nname = "cc_kbc"\nurl = "{kbs_url}"\n',
    ]
    if digest is not None:
        policy = json.dumps(signature_policy(_pinned(image_name, digest).split("@")[0]))
        parts.append(f'[image]\nimage_security_policy_uri = "{SECURITY_POLICY_URI}"\n'
                     f'# pinned: {image_name}@{digest}\n"""\n')
        parts.append(f"\"policy.json\" = '''{policy}'''\n")
    else:
        parts.append('"""\n')
    for name, text in (extra or {}).items():
        if "'''" in text:
            raise ConfigError(f"initdata file {name} holds ''', which TOML cannot quote here.")
        parts.append(f"\"{name}\" = '''\n{text}'''\n")
    return "".join(parts)


def image_artefacts(reference: str, files: Mapping[str, str]) -> dict[str, Any]:
    """What the encrypted+signed overlay's ``hfl-image`` ConfigMap says in ``image.yaml``: the
    image the run deploys, its signature policies (``files``: ConfigMap key → what it is) and
    where the layer key and the guest's policy are held."""
    return {
        "reference": reference,
        "signature_policies": dict(files),
        "layer_key": {"trust_service": TRUST_SERVICE_KEY, "trustee": LAYER_KEY_URI},
        "security_policy": SECURITY_POLICY_URI,
        "signature_key": SIGNATURE_KEY_URI,
    }


def initdata_reference_values(initdata: str) -> dict[str, list[str]]:
    """The AttestationPolicy reference value a TD with this initdata reports (MRCONFIGID)."""
    return {"mr_config_id": [hashlib.sha384(initdata.encode()).hexdigest()]}
