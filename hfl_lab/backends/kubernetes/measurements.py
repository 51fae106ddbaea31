"""The owner's reference policy for a Kubernetes run, derived from what its pods will run.

- ``runc`` (simulated TDs): exactly as the local backend does it. Each role is measured with
  :func:`hfl_lab.tee.sim.measure.measure_workload` from the participant config document the pods
  read (MR_CONFIG_ID) and the argv its container runs (RTMR2); MR_TD measures the lab's sources,
  so the image must be built from this checkout (native/image/Dockerfile copies the same
  ``hfl_lab/`` and ``trainer/`` the owner measures here).
- ``kata-qemu-tdx*`` (real TDs): MR_TD is the TD firmware of the host, which the lab cannot
  derive, so it stays "any" (pin it in your own policy); DEBUG TDs and simulated evidence are
  refused, and evidence must bind the TLS key and the verifier's nonce. Each role's pods carry
  their own CoCo initdata (:func:`role_initdata`): the role, the SHA-384 of the participant
  config document, the KBS address (with the encrypted and signed image pinned by digest, a
  signature policy pinned to that digest) and a Kata agent policy (:func:`agent_policy`) that
  admits only that role's container with its command, environment and mounts, and denies
  exec. The TD reports the initdata's SHA-384 as MRCONFIGID, so the three roles have three
  MR_CONFIG_IDs and the policy pins each role to its own: a worker's genuine quote gets no ps0
  certificate, and a pod started with other arguments, another image policy or exec allowed is
  refused.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from hfl_lab.backends.kubernetes import image as image_tools
from hfl_lab.backends.kubernetes.settings import KubernetesSettings
from hfl_lab.tee.policy import AttestationPolicy
from hfl_lab.tee.sim.measure import TdMeasurements, measure_workload, measured_json

#: the folder holding the ``hfl_lab`` and ``trainer`` packages the image is built from
WORKLOAD_ROOT = Path(__file__).resolve().parents[3]
SIGNED_OVERLAY = "kata-qemu-tdx-encrypted-signed"


#: StatefulSet → the role (prefix) its pods attest as
ROLE_OF_STATEFULSET = {"trust": "trust", "ps": "ps0", "worker": "worker"}
#: mounts the container runtime adds to every container (they are not in the manifest)
_RUNTIME_MOUNTS = ("/proc", "/dev", "/dev/pts", "/dev/mqueue", "/sys", "/sys/fs/cgroup",
                   "/dev/shm", "/etc/hosts",  # noqa: S108 - paths in the guest, not used here "/etc/hostname", "/etc/resolv.conf",
                   "/dev/termination-log")
#: environment the image (native/image/Dockerfile) and the kubelet set: any value
_IMAGE_ENV = ("PATH", "HOSTNAME", "HOME", "LANG", "PYTHONUNBUFFERED", "KERAS_BACKEND",
              "TF_CPP_MIN_LOG_LEVEL", "MPLBACKEND", "TERM")
#: agent requests a pod needs besides creating its containers (logs stay readable: the lab's
#: events are its stdout, and nothing secret is ever logged)
_ALLOWED_REQUESTS = (
    "AddARPNeighborsRequest", "CloseStdinRequest", "CreateSandboxRequest",
    "DestroySandboxRequest", "GetMetricsRequest", "GetOOMEventRequest", "GuestDetailsRequest",
    "ListInterfacesRequest", "ListRoutesRequest", "MemHotplugByProbeRequest",
    "OnlineCPUMemRequest", "PullImageRequest", "ReadStreamRequest", "RemoveContainerRequest",
    "RemoveStaleVirtiofsShareMountsRequest", "ReseedRandomDevRequest", "SetGuestDateTimeRequest",
    "SignalProcessRequest", "StartContainerRequest", "StatsContainerRequest",
    "UpdateContainerRequest", "UpdateInterfaceRequest", "UpdateRoutesRequest",
    "WaitProcessRequest",
)
#: what nobody may do to a running TD: exec into it, write its stdin, swap its policy, trace it
DENIED_REQUESTS = ("ExecProcessRequest", "SetPolicyRequest", "WriteStreamRequest",
                   "StartTracingRequest", "StopTracingRequest", "TtyWinResizeRequest",
                   "PauseContainerRequest", "ResumeContainerRequest", "AddSwapRequest")
_VARIABLE = re.compile(r"(\$\([A-Za-z_][A-Za-z0-9_]*\))")

_RULES = '''
CopyFileRequest if {
    startswith(input.path, "/run/kata-containers/shared/containers/")
    not contains(input.path, "..")
}

# the pod's pause container
CreateContainerRequest if {
    input.OCI.Annotations["io.kubernetes.cri.container-type"] == "sandbox"
    input.OCI.Process.Args == ["/pause"]
}

# the participant: its command, environment and mounts, nothing else
CreateContainerRequest if {
    input.OCI.Annotations["io.kubernetes.cri.container-type"] == "container"
    input.OCI.Annotations["io.kubernetes.cri.container-name"] == policy_data.container_name
    count(input.OCI.Process.Args) == count(policy_data.args)
    every i, arg in input.OCI.Process.Args {
        value_allowed(policy_data.args[i], arg)
    }
    every entry in input.OCI.Process.Env {
        env_allowed(entry)
    }
    every mount in input.OCI.Mounts {
        mount.destination in policy_data.mounts
    }
}

value_allowed(rule, value) if {
    rule.exact == value
}

value_allowed(rule, value) if {
    regex.match(rule.pattern, value)
}

env_allowed(entry) if {
    name := split(entry, "=")[0]
    rule := policy_data.env[name]
    value_allowed(rule, substring(entry, count(name) + 1, -1))
}

env_allowed(entry) if {
    name := split(entry, "=")[0]
    not policy_data.env[name]
    name in policy_data.image_env
}
'''


def _matcher(value: str, indexed: set[str]) -> dict[str, str]:
    """An exact value, or a pattern with digits where the kubelet puts the pod index."""
    if not any(f"$({name})" in value for name in indexed):
        return {"exact": value}
    variables = {f"$({name})" for name in indexed}
    return {"pattern": "^" + "".join("[0-9]+" if part in variables else re.escape(part)
                                     for part in _VARIABLE.split(value)) + "$"}


def agent_policy(container: Mapping[str, Any]) -> str:
    """A Kata agent policy (Rego, package ``agent_policy``) for a pod that runs ``container``
    alone: the pause container and this container with exactly its command and arguments, its
    manifest environment (values pinned; the image's and the kubelet's variables any value)
    and its mounts. Exec, stdin, policy changes and tracing are denied; files are copied in
    only under the sandbox's shared folder (how a TD receives its ConfigMaps and Secrets)."""
    env_items = list(container.get("env") or [])
    indexed = {str(e["name"]) for e in env_items if "valueFrom" in e}
    argv = [*map(str, container.get("command") or []), *map(str, container.get("args") or [])]
    data = {
        "container_name": str(container["name"]),
        "args": [_matcher(a, indexed) for a in argv],
        "env": {str(e["name"]): {"pattern": "^[0-9]+$"} if str(e["name"]) in indexed
                else _matcher(str(e.get("value", "")), indexed) for e in env_items},
        "image_env": list(_IMAGE_ENV),
        "mounts": sorted({str(m["mountPath"]) for m in container.get("volumeMounts") or []}
                         | set(_RUNTIME_MOUNTS)),
    }
    defaults = [f"default {name} := true" for name in _ALLOWED_REQUESTS]
    defaults += [f"default {name} := false" for name in DENIED_REQUESTS]
    defaults += ["default CreateContainerRequest := false", "default CopyFileRequest := false"]
    return (
        "package agent_policy\n\nimport future.keywords.every\nimport future.keywords.if\n"
        "import future.keywords.in\n\n"
        f"# Generated by hfl-lab for the {data['container_name']} pods of one run: nobody "
        "reaches into this TD after it started.\n"
        + "\n".join(defaults)
        + f"\n\npolicy_data := {json.dumps(data, indent=2, sort_keys=True)}\n"
        + _RULES
    )


def role_initdata(
    settings: KubernetesSettings,
    document: Mapping[str, Any],
    containers: Mapping[str, Mapping[str, Any]],
) -> dict[str, str]:
    """Each StatefulSet's CoCo initdata on the TDX overlays (none under runc): the role and the
    SHA-384 of the config document, the KBS (with the signed overlay's image policy pinned to
    the digest), and the agent policy of its container. ``containers``: StatefulSet → its
    main container, as built."""
    if not settings.uses_tdx:
        return {}
    ref = settings.image_ref
    digest = ref.digest if settings.overlay == SIGNED_OVERLAY else None
    config_digest = hashlib.sha384(measured_json(dict(document))).hexdigest()
    return {
        statefulset: image_tools.initdata_toml(settings.kbs_url, ref.name, digest, {
            "hfl-lab.toml": f'role = "{role}"\nconfig_sha384 = "{config_digest}"\n',
            "policy.rego": agent_policy(containers[statefulset]),
        })
        for statefulset, role in ROLE_OF_STATEFULSET.items()
    }


def mr_config_id(initdata: str) -> str:
    """What a TD started with this initdata reports as MRCONFIGID (hex)."""
    return hashlib.sha384(initdata.encode()).hexdigest()


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
    initdata: Mapping[str, str] | None = None,
) -> AttestationPolicy:
    """The owner's policy for this run (see the module docstring); ``initdata``: each
    StatefulSet's (:func:`role_initdata`), on the TDX overlays."""
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
    if initdata:
        # each role pinned to its own initdata: the role a TD gets is the one it measures as
        by_role = {"trust": initdata["trust"], "ps0": initdata["ps"]}
        by_role.update({f"worker{i}": initdata["worker"] for i in range(settings.workers)})
        raw["roles"] = {role: {"mr_config_id": mr_config_id(text)}
                        for role, text in by_role.items()}
    return AttestationPolicy.from_dict(raw)
