"""A participant's first stage when its run names a workload image: pull it, then run from it.

As a CoCo guest pulls its container image before the container runs, ps0 and each worker of a
local run with ``workload_image`` first, in their own simulated TD:

1. check the owner's signature policy against its SHA-256 in the measured config (the file
   itself is the host's);
2. obtain the image's layer key from the trust service by attested release: this TD's evidence,
   bound to a fresh key and challenge, must match its role's entry in the key's release policy;
3. pull the image through the policy (signature verified, layers decrypted with the key as an
   in-memory fd) and unpack it into its own folder (``<image_dir>/<role>``);
4. become ``python -m trainer <the same arguments>`` run from the unpacked files (``exec``: the
   same process, whose stdin is still the launcher's pipe), handing the bootstrap over an
   in-memory descriptor; its simulated TD measures those files, so its MR_TD is what it
   pulled, and the policy refuses anything else, as before.

A refused step stops the participant with one sentence naming the cause (exit code 1). The trust
service does not pull: it holds the key broker that releases the layer key, so it cannot be
given its own image's key by itself; the owner checks its evidence before provisioning it.
"""

from __future__ import annotations

import hashlib
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import NoReturn

from hfl_lab._exceptions import ImageError, ImageRefused
from hfl_lab.image import ImageSource, obtain_layer_key, pull_image
from hfl_lab.image.tools import secret_fd
from hfl_lab.trust.enrollment import bootstrap_document
from trainer.participant import (
    BOOTSTRAP_FD_ENV,
    Bootstrap,
    Emitter,
    Participant,
    measured_argv,
    read_bootstrap,
    workload_root,
)
from trainer.participant_config import ParticipantConfig

__all__ = ["FROM_IMAGE_ENV", "run_from_image"]

#: set in the second stage's environment: the folder of the unpacked image it runs from
FROM_IMAGE_ENV = "HFL_LAB_FROM_IMAGE"


def _source(config: ParticipantConfig, role: str) -> ImageSource:
    d = config.deployment
    policy = Path(d.image_policy)
    try:
        digest = hashlib.sha256(policy.read_bytes()).hexdigest()
    except OSError as e:
        raise ImageRefused(
            f"{role} cannot read the image's signature policy {policy}: {e.strerror or e}.",
            fix="publish the image again (the local backend does it at start).") from None
    if digest != d.image_policy_sha256:
        raise ImageRefused(
            f"{role} refused the image's signature policy {policy}: it is not the one the "
            "owner wrote (its SHA-256 differs from the measured config's).",
            fix="find who changed the file; start the run again to publish a fresh one.")
    return ImageSource(d.image_reference, d.image_reference.rpartition("@")[2], policy,
                       Path(d.image_registries_d), Path(d.image_cert_dir))


def run_from_image(role: str, args_list: Sequence[str], config: ParticipantConfig,
                   emitter: Emitter) -> None:
    """Pull, then become this participant run from the image (it does not return). Returns at
    once when there is no image to pull or this process already runs from one: the caller then
    runs the role."""
    deployment = config.deployment
    if not deployment.image_reference or \
            os.environ.get(FROM_IMAGE_ENV) == str(workload_root()):
        return None
    boot = read_bootstrap()
    emitter.lifecycle("starting", detail="pulling the workload image")
    participant = Participant(role, config, measured_argv("trainer", args_list), boot, emitter)
    source = _source(config, role)
    with participant.connect_trust() as trust:
        key = obtain_layer_key(trust, role, participant.provider)
    try:
        pulled = pull_image(source, key, Path(deployment.image_dir) / role, who="its TD")
    finally:
        del key
    emitter.log(f"{role}: pulled {source.reference}: signature verified, layers decrypted with "
                f"the key released to this TD, unpacked in {pulled.bundle}; running from it")
    _exec_from(pulled.workload_root, args_list, boot)


def _exec_from(root: Path, args_list: Sequence[str], boot: Bootstrap) -> NoReturn:
    """Become ``python -m trainer <args>`` run from ``root`` (same pid, same stdin: the
    launcher's pipe), handing the bootstrap over an in-memory descriptor."""
    line = bootstrap_document(boot.platform)
    env = {**os.environ, FROM_IMAGE_ENV: str(root), "PYTHONPATH": str(root)}
    sys.stdout.flush()
    sys.stderr.flush()
    with secret_fd((line + "\n").encode()) as fd:
        del line
        os.set_inheritable(fd, True)
        env[BOOTSTRAP_FD_ENV] = str(fd)
        try:
            os.chdir(root)
            # the same arguments, no shell: only the code it runs changes
            os.execve(sys.executable, [sys.executable, "-m", "trainer", *args_list], env)  # noqa: S606
        except OSError as e:
            raise ImageError(f"cannot run the pulled workload from {root}: {e.strerror or e}.",
                             fix="check the participant's folder (image/participants/).") from None
