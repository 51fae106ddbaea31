"""The workload image made for real: built, encrypted, signed, pushed, and pulled by TDs.

Owner's half (:mod:`.publish`): umoci builds the image from the files MR_TD measures, skopeo
encrypts its layers for a key pair made in memory (:mod:`.layer_key`; the private half goes to
the trust service's key broker), pushes it to the run's own ``docker-registry`` on loopback
(:mod:`.registry`) and signs it with a GPG key made for the run (:mod:`.signing`).
Participant's half (:mod:`.pull`): the layer key by attested release, a pull through the
``signedBy`` policy, decryption with the key as an in-memory fd, ``umoci unpack``. Every
command goes through :class:`~hfl_lab.image.tools.ToolRunner`, which records it. For a cluster,
:mod:`.container` builds the full image of native/image/Dockerfile with buildah or docker and
:func:`~hfl_lab.image.publish.publish_image` takes it through the same steps into the user's
registry; :mod:`.cosign` adds a cosign signature and a ``sigstoreSigned`` policy where cosign is
installed.

This package sits in the TD runtime layer, beside ``hfl_lab.vault`` (which also holds both the
owner's and the TD's half of the model volume), so that the participant's side can use it.
"""

from hfl_lab.image.layer_key import (
    IMAGE_APP_ID,
    LAYER_KEY_NAME,
    LayerKey,
    image_release_policy,
    obtain_layer_key,
    register_layer_key,
)
from hfl_lab.image.layout import ENTRYPOINT, IMAGE_APP_DIR, Layer, OciImage, read_image
from hfl_lab.image.publish import ImageSource, PublishedImage, publish_workload_image
from hfl_lab.image.pull import PulledImage, pull_image
from hfl_lab.image.registry import LabRegistry
from hfl_lab.image.tools import (
    PIPELINE_TOOLS,
    SYSTEM_DEPS_FIX,
    ToolRecord,
    ToolRunner,
    missing_tools,
    require_tools,
)

__all__ = [
    "ENTRYPOINT",
    "IMAGE_APP_DIR",
    "IMAGE_APP_ID",
    "LAYER_KEY_NAME",
    "PIPELINE_TOOLS",
    "SYSTEM_DEPS_FIX",
    "ImageSource",
    "LabRegistry",
    "Layer",
    "LayerKey",
    "OciImage",
    "PublishedImage",
    "PulledImage",
    "ToolRecord",
    "ToolRunner",
    "image_release_policy",
    "missing_tools",
    "obtain_layer_key",
    "publish_workload_image",
    "pull_image",
    "read_image",
    "register_layer_key",
    "require_tools",
]
