"""Test helpers: simulated TDs on one lab platform, each role's measurements, evidence
providers, and the policies and verifiers the lab checks them with."""

from __future__ import annotations

import functools
from typing import Any

from hfl_lab.tee import (
    AttestationPolicy,
    Collateral,
    SimulatedPlatform,
    SimulatedTdProvider,
    TdMeasurements,
    Verifier,
    measure_workload,
)

#: the lab's simulated platform: its root signs every simulated TD's quote in a test run
PLATFORM = SimulatedPlatform.generate()
#: the roles the lab policy names
LAB_ROLES = ("trust", "ps0", "worker0")


@functools.cache
def measured(role: str) -> TdMeasurements:
    """The measurements of ``role``'s TD running this checkout (computed once per role;
    a test that tampers with measurements takes a fresh ``measure_workload`` instead)."""
    return measure_workload(role=role)


def provider(
    role: str, m: TdMeasurements | None = None, *, platform: SimulatedPlatform = PLATFORM,
    **kw: Any,
) -> SimulatedTdProvider:
    """Evidence from ``role``'s simulated TD (its own measurements unless ``m`` is given)."""
    return SimulatedTdProvider(platform, m or measured(role), **kw)


def policy_for(m: TdMeasurements, binding: str = "key+nonce", **extra: Any) -> AttestationPolicy:
    """A policy pinning every measurement of ``m`` (MR_TD, MR_CONFIG_ID, RTMR0-3), simulated
    evidence allowed, REPORTDATA bound as ``binding`` says; ``extra`` fields override."""
    raw = dict(m.summary(), allow_simulated=True, report_data_binding=binding)
    raw.update(extra)
    return AttestationPolicy.from_dict(raw)


def verifier_for(
    policy: AttestationPolicy, *, platform: SimulatedPlatform = PLATFORM, **kw: Any
) -> Verifier:
    """A verifier trusting ``platform``'s root (collateral: what the evidence carries)."""
    return Verifier(policy, lab_root_der=platform.root_der, **kw)


def lab_policy(*roles: str, **extra: Any) -> AttestationPolicy:
    """The lab's policy: its code (MR_TD, the same for every role) and each role's
    configuration (MR_CONFIG_ID), for ``roles`` (default: the lab roles); ``extra`` fields
    are added."""
    named = {role: measured(role) for role in roles or LAB_ROLES}
    return AttestationPolicy.from_dict(
        {"mr_td": measured("ps0").mr_td.hex(), "allow_simulated": True,
         "report_data_binding": "key+nonce",
         "roles": {r: {"mr_config_id": m.mr_config_id.hex()} for r, m in named.items()},
         **extra}
    )


def lab_verifier(
    name: str = "lab", policy: AttestationPolicy | None = None, **kw: Any
) -> Verifier:
    """How participants verify each other: the lab root and the lab's collateral."""
    lab_collateral = Collateral(PLATFORM.collateral_json, "lab platform")
    return verifier_for(policy or lab_policy(), name=name, lab_collateral=lab_collateral, **kw)
