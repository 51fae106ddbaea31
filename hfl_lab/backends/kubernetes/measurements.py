"""The owner's reference policy for a Kubernetes run, derived from what its pods will run.

- ``runc`` (simulated TDs): exactly as the local backend does it. Each role is measured with
  :func:`hfl_lab.tee.sim.measure.measure_workload` from the participant config document the pods
  read (MR_CONFIG_ID) and the argv its container runs (RTMR2); MR_TD measures the lab's sources,
  so the image must be built from this checkout (native/image/Dockerfile copies the same
  ``hfl_lab/`` and ``trainer/`` the owner measures here).
- ``kata-qemu-tdx*`` (real TDs): MR_TD is the TD firmware of the host, which the lab cannot
  derive, so it stays "any" (pin it in your own policy); DEBUG TDs and simulated evidence are
  refused, and evidence must bind the TLS key and the verifier's nonce. With the encrypted and
  signed image pinned by digest, every pod carries CoCo initdata (the KBS address and a
  signature policy pinned to that digest, :func:`hfl_lab.backends.kubernetes.image.initdata_toml`)
  whose SHA-384 the TD reports as MRCONFIGID: the policy requires exactly that value, so a TD
  started with another image policy is refused.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from hfl_lab.backends.kubernetes import image as image_tools
from hfl_lab.backends.kubernetes.settings import KubernetesSettings
from hfl_lab.tee.policy import AttestationPolicy
from hfl_lab.tee.sim.measure import TdMeasurements, measure_workload

#: the folder holding the ``hfl_lab`` and ``trainer`` packages the image is built from
WORKLOAD_ROOT = Path(__file__).resolve().parents[3]
SIGNED_OVERLAY = "kata-qemu-tdx-encrypted-signed"


def initdata_for(settings: KubernetesSettings) -> str | None:
    """The pods' CoCo initdata: for the encrypted+signed overlay with an image digest, else None."""
    ref = settings.image_ref
    if settings.overlay != SIGNED_OVERLAY or ref.digest is None:
        return None
    return image_tools.initdata_toml(settings.kbs_url, ref.name, ref.digest)


def simulated_measurements(
    document: Mapping[str, Any],
    commands: Mapping[str, Sequence[str]],
    root: Path = WORKLOAD_ROOT,
) -> dict[str, TdMeasurements]:
    """Each role's simulated-TD measurements: this code, the document, its command line."""
    return {
        role: measure_workload(role=role, config=dict(document), argv=list(argv), root=root)
        for role, argv in commands.items()
    }


def reference_policy(
    settings: KubernetesSettings,
    document: Mapping[str, Any],
    commands: Mapping[str, Sequence[str]],
    root: Path = WORKLOAD_ROOT,
) -> AttestationPolicy:
    """The owner's policy for this run (see the module docstring)."""
    raw: dict[str, Any] = {
        "tee_type": "TDX",
        "allow_debug": False,
        "report_data_binding": "key+nonce",
    }
    if not settings.uses_tdx:
        measured = simulated_measurements(document, commands, root)
        raw["allow_simulated"] = True
        raw["mr_td"] = sorted({m.mr_td.hex() for m in measured.values()})
        raw["roles"] = {
            role: {"mr_config_id": m.mr_config_id.hex()} for role, m in measured.items()
        }
        return AttestationPolicy.from_dict(raw)
    raw["allow_simulated"] = False
    # real evidence is judged with collateral the verifiers fetch themselves (issue 18, item 3)
    raw["pccs_url"] = settings.pccs_url
    initdata = initdata_for(settings)
    if initdata is not None:
        raw.update(image_tools.initdata_reference_values(initdata))
    return AttestationPolicy.from_dict(raw)
