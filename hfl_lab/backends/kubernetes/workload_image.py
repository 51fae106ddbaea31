"""The cluster's participant image made as the local one: built, encrypted, pushed, signed.

:func:`publish_cluster_image` builds native/image/Dockerfile with buildah or docker
(:mod:`hfl_lab.image.container`) and sends it through the same steps as the local workload image
(:func:`hfl_lab.image.publish.publish_image`): layers encrypted by skopeo for the public half of
a :class:`~hfl_lab.image.LayerKey` made in memory (JWE), pushed to the user's registry (the
registry of ``settings.image``, a parameter) and signed there with a GPG key made for the run,
then read back through the ``signedBy`` policy into ``image/oci/``. :func:`pinned_settings`
pins the run to the signed digest, which the encrypted+signed overlay's initdata (MRCONFIGID)
then measures. :func:`cluster_release_policy` says who may receive the layer key from the run's
trust service: ps0 and every worker, each held to its own MR_TD and MR_CONFIG_ID, as the run's
policy pins them; the backend registers the key once the trust service is provisioned
(:meth:`~hfl_lab.backends.kubernetes.backend.KubernetesBackend.register_layer_key`).

Under kata-qemu-tdx it is the guest (CoCo's image-rs), not the participant, that pulls and
decrypts, and it asks Trustee's KBS for the key (``kbs:///default/image_key/<id>``), which needs
a key-provider encryption Debian's skopeo cannot make: k8s/README.md, "The image key in
Trustee", gives that step.
"""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path

from hfl_lab._exceptions import BackendError, PolicyViolation
from hfl_lab.backends.kubernetes.render import RenderedRun
from hfl_lab.backends.kubernetes.settings import KubernetesSettings
from hfl_lab.image import LayerKey, PublishedImage, ToolRunner, require_tools
from hfl_lab.image.container import build_container_image
from hfl_lab.image.publish import publish_image
from hfl_lab.image.registry import RegistryTarget
from hfl_lab.tee.policy import AttestationPolicy
from hfl_lab.trust.broker import check_release_rules

__all__ = ["cluster_registry", "cluster_release_policy", "pinned_settings",
           "publish_cluster_image"]

#: the repository root that holds native/image/Dockerfile
REPO_ROOT = Path(__file__).resolve().parents[3]
#: a full image build (pip install of TensorFlow) takes minutes, not seconds
BUILD_TIMEOUT_S = 3600.0
_PINNED = ("mr_td", "mr_config_id")


def cluster_registry(settings: KubernetesSettings, folder: Path,
                     ca_file: Path | None = None) -> RegistryTarget:
    """The user's registry, from ``settings.image`` (or ``settings.registry``): its CA
    certificates in ``folder/certs.d`` (``ca_file`` copied there; empty: the system's CAs),
    TLS checked unless ``registry_insecure``."""
    host = settings.registry_host
    if host is None:
        raise BackendError(
            f"the image {settings.image!r} names no registry, and the encrypted image goes to "
            "the user's own registry.",
            fix="set image to <registry[:port]>/<name>:<tag>, e.g. "
            "registry.hfl-lab.local:5000/hfl-lab:0.1.0 (native/coco/registry.sh starts one).")
    cert_dir = folder / "certs.d"
    cert_dir.mkdir(parents=True, exist_ok=True)
    if ca_file is not None:
        shutil.copyfile(ca_file, cert_dir / "ca.crt")
    return RegistryTarget(host, cert_dir, tls_verify=not settings.registry_insecure)


def publish_cluster_image(
    settings: KubernetesSettings,
    folder: Path,
    layer_key: LayerKey,
    *,
    root: Path = REPO_ROOT,
    runner: ToolRunner | None = None,
    builder: str | None = None,
    ca_file: Path | None = None,
) -> PublishedImage:
    """Build, encrypt, push, sign and verify the participant image as ``settings.image``
    (registry, repository and tag; see the module's docstring); ``folder`` is the run's
    ``image/``. ``ImageError`` when no builder works here, naming how to install one."""
    require_tools("skopeo", "gpg", "gpgconf")
    ref = settings.image_ref
    target = cluster_registry(settings, folder, ca_file)
    runner = runner or ToolRunner(timeout_s=BUILD_TIMEOUT_S)
    plain = build_container_image(runner, root, folder / "build", builder=builder)
    return publish_image(folder, plain, target, layer_key.public_pem, runner=runner,
                         repository=ref.repository, tag=ref.tag or "latest")


def pinned_settings(settings: KubernetesSettings,
                    published: PublishedImage) -> KubernetesSettings:
    """``settings`` running the published image by its signed digest (never by a tag)."""
    name = settings.image_ref.name
    return dataclasses.replace(settings, image=f"{name}@{published.source.digest}")


def cluster_release_policy(rendered: RenderedRun) -> AttestationPolicy:
    """Who may receive the layer key from the run's trust service: ps0 and each worker, held
    to the MR_TD and MR_CONFIG_ID the run's policy pins for it; evidence bound to key and
    nonce, no DEBUG TD. ``BackendError`` when the policy leaves a role's MR_TD open (a real
    TD's firmware, which the lab cannot derive), naming the fix."""
    policy = rendered.policy
    workers = int(rendered.document.get("deployment", {}).get("workers", 0))
    roles: dict[str, dict[str, list[str]]] = {}
    for role in ["ps0", *(f"worker{i}" for i in range(workers))]:
        values = {name: policy.reference_for(role, name) for name in _PINNED}
        open_fields = [name for name, value in values.items() if value is None]
        if open_fields:
            raise BackendError(
                f"the run's policy leaves {' and '.join(open_fields)} of {role} open, so the "
                "image's layer key could reach a TD running other code.",
                fix="give a policy that pins every participant's MR_TD (policy_path; `hfl-lab "
                "attest policy --from-evidence` on a participant's evidence writes one).")
        roles[role] = {name: list(value or ()) for name, value in values.items()}
    fields = policy.to_dict()
    for name in _PINNED:
        fields.pop(name, None)
    fields.update(roles=roles, report_data_binding="key+nonce", allow_debug=False)
    release = AttestationPolicy.from_dict(fields)
    try:
        check_release_rules(release, policy)
    except PolicyViolation as error:
        raise BackendError(f"the layer key's release policy: {error.message}",
                           fix=error.fix or "pin every participant in the run's policy.") from None
    return release
