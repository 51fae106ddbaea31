"""The lab owner's side of the workload image on a local run (``workload_image``, issue 19).

When the run names a workload image, :meth:`WorkloadImageSide._publish_image` (from
``prepare()``) starts the run's ``docker-registry`` on loopback, builds the image from the
checkout's measured files, encrypts it for a layer key made in memory, pushes and signs it
(:func:`hfl_lab.image.publish_workload_image`), and writes where it is into the measured
participant config: its reference pinned by digest and the SHA-256 of the signature policy.
Once the trust service is up and provisioned, :meth:`WorkloadImageSide._register_layer_key`
hands the private half of the layer key to its key broker under a release policy naming ps0 and
every worker, each pinned to its own MR_TD and MR_CONFIG_ID, and drops it. ps0 and the workers
then pull and run the image (:mod:`trainer.image_boot`); the trust service does not (it holds
the key). Teardown stops the registry; its storage, the signatures and ``image/oci/`` stay.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from hfl_lab._exceptions import ImageError
from hfl_lab.config import LabConfig
from hfl_lab.events import LabEvent
from hfl_lab.image import (
    SYSTEM_DEPS_FIX,
    LabRegistry,
    LayerKey,
    PublishedImage,
    ToolRunner,
    image_release_policy,
    missing_tools,
    publish_workload_image,
    register_layer_key,
)
from hfl_lab.image.publish import REPOSITORY
from hfl_lab.tee.policy import AttestationPolicy
from hfl_lab.tee.sim.measure import TdMeasurements
from hfl_lab.trust.client import TrustClient


class WorkloadImageSide:
    """What the owner does for the workload image of a local run."""

    # set by LocalBackend
    config: LabConfig
    run_dir: Path
    workload_root: Path
    admin_token: bytes
    policy: AttestationPolicy | None
    measurements: dict[str, TdMeasurements]
    registry: LabRegistry | None
    published_image: PublishedImage | None
    _layer_key: LayerKey | None
    # provided by the other parts
    _put: Callable[[LabEvent], None]
    trust_client: Callable[[], TrustClient]

    @property
    def pulling_roles(self) -> list[str]:
        """ps0 and the workers: every role but the trust service, which holds the key."""
        return [role for role in self.measurements if role != "trust"]

    @property
    def image_dir(self) -> Path:
        return self.run_dir / "image"

    def image_enabled(self) -> bool:
        """Whether this run pulls the workload image: ``on`` (the tools must be there),
        ``auto`` (when they are) or ``off``."""
        choice = self.config.workload_image
        if choice == "off":
            return False
        missing = missing_tools()
        if missing and choice == "on":
            raise ImageError(f"workload_image=on needs {', '.join(missing)}, not installed.",
                             fix=f"{SYSTEM_DEPS_FIX}, or run with -p workload_image=off.")
        return not missing

    def _publish_image(self) -> dict[str, Any]:
        """Start the registry and publish the image (once per run); the measured config's
        image fields."""
        if self.published_image is None or self.registry is None or not self.registry.running:
            runner = ToolRunner()
            self.registry = LabRegistry(self.image_dir / "registry", runner).start()
            self._layer_key = LayerKey()
            self.published_image = publish_workload_image(
                self.image_dir, self.registry, self._layer_key.public_pem,
                root=self.workload_root, runner=runner)
            source = self.published_image.source
            self._put(LabEvent("log", "owner", {
                "level": "info",
                "message": f"workload image {source.reference}@{source.digest}: built from the "
                f"measured files, layers encrypted, pushed to {self.registry.address} and "
                f"signed (key {self.published_image.fingerprint[-16:]})",
            }))
        source = self.published_image.source
        return {
            "image_reference": f"{self.registry.address}/{REPOSITORY}@{source.digest}",
            "image_policy": str(source.policy_path),
            "image_policy_sha256": self.published_image.policy_sha256,
            "image_registries_d": str(source.registries_d),
            "image_cert_dir": str(source.cert_dir),
            "image_dir": str(self.image_dir / "participants"),
        }

    def image_release_policy(self) -> AttestationPolicy:
        """Who may receive the layer key: ps0 and every worker, each held to its own
        measurements (this code, its role's configuration)."""
        return image_release_policy({r: self.measurements[r] for r in self.pulling_roles},
                                    base=self.policy)

    def _register_layer_key(self) -> None:
        """As the owner, once the trust service is provisioned: the layer key to its broker."""
        key = self._layer_key
        if key is None:
            return  # registered already (a restart keeps it in the sealed state)
        with self.trust_client() as client:
            register_layer_key(client, key, self.image_release_policy(), self.admin_token)
        self._layer_key = None
        self._put(LabEvent("log", "owner", {
            "level": "info",
            "message": "the image's layer key is registered in the key broker for "
            f"{', '.join(self.pulling_roles)} only (attested release); the owner dropped it",
        }))

    def _stop_registry(self) -> None:
        if self.registry is not None:
            self.registry.close()
