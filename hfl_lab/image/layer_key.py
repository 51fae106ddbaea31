"""The image's layer key: made in memory, held by the key broker, released to attested TDs only.

skopeo encrypts each layer with a fresh content key and wraps it (JWE, ECDH-ES+A256KW) for the
public half of :class:`LayerKey`. The private half is registered in the trust service's key
broker under ``(IMAGE_APP_ID, LAYER_KEY_NAME)`` with a release policy naming the run's
participant roles, each pinned to its own MR_TD and MR_CONFIG_ID (:func:`image_release_policy`),
as CoCo's KBS holds an image key. Debian's skopeo predates ocicrypt's key-provider protocol, so
the key is a JWE recipient key rather than ``provider:attestation-agent``; what guards it is
the same: only an attested TD of a named role receives it.
"""

from __future__ import annotations

from collections.abc import Mapping

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from hfl_lab._exceptions import ImageRefused, PolicyViolation
from hfl_lab.tee.evidence import EvidenceProvider
from hfl_lab.tee.policy import AttestationPolicy
from hfl_lab.tee.sim.measure import TdMeasurements
from hfl_lab.trust.broker import check_release_rules
from hfl_lab.trust.client import TrustClient

__all__ = [
    "IMAGE_APP_ID",
    "LAYER_KEY_NAME",
    "LayerKey",
    "image_release_policy",
    "obtain_layer_key",
]

#: where the key broker holds the layer key
IMAGE_APP_ID = "hfl-lab-image"
LAYER_KEY_NAME = "workload-layers"
_PINNED = ("mr_td", "mr_config_id")


class LayerKey:
    """An EC P-384 key pair made in memory; the private half leaves only as PEM bytes for the
    key broker or an in-memory fd (memfd), never to a file."""

    def __init__(self) -> None:
        self._key = ec.generate_private_key(ec.SECP384R1())

    @property
    def public_pem(self) -> bytes:
        return self._key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)

    def private_pem(self) -> bytes:
        return self._key.private_bytes(serialization.Encoding.PEM,
                                       serialization.PrivateFormat.PKCS8,
                                       serialization.NoEncryption())

    def __repr__(self) -> str:
        return "LayerKey(<private key in memory>)"

    def __reduce__(self) -> str:
        raise TypeError("the layer key cannot be pickled: it stays in this process")


def _reference(m: TdMeasurements | Mapping[str, str]) -> dict[str, str]:
    summary = m if isinstance(m, Mapping) else m.summary()
    return {name: summary[name] for name in _PINNED if summary.get(name)}


def image_release_policy(
    measurements: Mapping[str, TdMeasurements | Mapping[str, str]],
    *,
    base: AttestationPolicy | None = None,
) -> AttestationPolicy:
    """Who may receive the layer key: each role of ``measurements`` (ps0, the workers), held
    to its own MR_TD and MR_CONFIG_ID, evidence bound to the requester's key and the challenge;
    ``base`` gives the other rules (``allow_simulated``, TCB statuses). ``PolicyViolation`` when
    the result breaks the key broker's release rules (a role left open, a role no TD has)."""
    roles = {role: _reference(m) for role, m in measurements.items()}
    fields = (base or AttestationPolicy()).to_dict()
    for name in _PINNED:
        fields.pop(name, None)
    fields["roles"] = roles
    fields["report_data_binding"] = "key+nonce"
    fields["allow_debug"] = False
    policy = AttestationPolicy.from_dict(fields)
    check_release_rules(policy)
    return policy


def register_layer_key(
    client: TrustClient, key: LayerKey, release_policy: AttestationPolicy, admin_token: bytes
) -> None:
    """As the owner: hand the private half to the key broker under ``release_policy``."""
    client.register_secret(IMAGE_APP_ID, LAYER_KEY_NAME, key.private_pem(), release_policy,
                           admin_token)


def obtain_layer_key(client: TrustClient, role: str, provider: EvidenceProvider) -> bytes:
    """As a participant's TD: the layer key by attested release (PEM, in memory only);
    ``ImageRefused`` naming the broker's reason when it is not released."""
    try:
        return client.release_secret(IMAGE_APP_ID, LAYER_KEY_NAME, role, provider)
    except PolicyViolation as refusal:
        raise ImageRefused(
            f"the trust service did not release the image's layer key to {role}, so its image "
            f"stays encrypted: {refusal.message}",
            fix="run the participant in the TD the image's release policy names for its role; "
            "the trust service's audit log has the verdict.",
        ) from None
