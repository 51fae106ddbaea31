"""The Kubernetes backend: the lab's participants as pods (CoCo TDs under kata-qemu-tdx).

``start()`` renders the run (:mod:`.render`: manifests, participant config, the owner's
policy), creates the pods' bootstrap Secrets from memory on runc only (:mod:`.bootstrap`) and
applies everything server-side; the pods run the real participant entry points.

The owner's admin credential is in none of it. When the trust pod logs ``provisioning``, the
backend reaches it (``settings.trust_endpoint``, the ingress's TLS passthrough, or a port-forward
through the API server), verifies its evidence and sends the credential over that attested
channel (:mod:`.provision`); until then the service serves no one.

The model vault in a cluster: the owner's machine does not hold the volume, so the trust
service generates the volume's passphrase in its TD under the release policy the renderer
derived (ps0's measurements), seals it into its state on the trust-state PVC (under a key derived
from the owner's admin credential, as the local backend's service does), and ps0 creates the
LUKS volume in its pod with the passphrase released to it. After training,
:meth:`KubernetesBackend.collect_sealed_model` copies the volume and the sealed state to the
owner's run folder (``vault/``, ``trust/``), where notebook 05 opens them exactly as a local run's.
"""

from __future__ import annotations

import contextlib
import dataclasses
import queue
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from hfl_lab import owner
from hfl_lab._exceptions import ApiError, BackendError, HflLabError
from hfl_lab.backends.base import PreflightCheck, ProgressCallback
from hfl_lab.backends.kubernetes import bootstrap, provision, vault_copy
from hfl_lab.backends.kubernetes import render as rendering
from hfl_lab.backends.kubernetes.cluster_api import ClusterApi, object_path
from hfl_lab.backends.kubernetes.kustomize import Manifest
from hfl_lab.backends.kubernetes.measurements import SIGNED_OVERLAY
from hfl_lab.backends.kubernetes.port_forward import LocalForward
from hfl_lab.backends.kubernetes.preflight import check_vault, cluster_checks
from hfl_lab.backends.kubernetes.settings import KubernetesSettings
from hfl_lab.backends.kubernetes.workload_image import (
    cluster_release_policy,
    pinned_settings,
    publish_cluster_image,
)
from hfl_lab.events import KINDS, LabEvent
from hfl_lab.image import LayerKey, PublishedImage, missing_tools
from hfl_lab.image.container import tool_inventory, usable_builders
from hfl_lab.tee.policy import AttestationPolicy
from hfl_lab.tee.sim.platform import SimulatedPlatform
from hfl_lab.vault.attested_signers import AttestedSigners
from hfl_lab.vault.keyrelease import SealedBrokerState

SELECTOR = "app.kubernetes.io/part-of=hfl-lab"
PS_POD = "ps-0"
TRUST_POD = "trust-0"
#: the trust service's port in its pod (k8s/base/trust.yaml)
TRUST_PORT = 50060
#: ps0 stays up after training, so its own container serves the vault copy
VAULT_CONTAINER = "ps"
TRUST_CONTAINER = "trust"
#: the container of each StatefulSet whose logs are the participant's logs
MAIN_CONTAINER = {"trust": "trust", "ps": "ps", "worker": "worker"}
#: container waiting reasons that will not heal by waiting, and what to do about each
FATAL_REASONS = {
    "ErrImagePull": "check the image name and that the nodes (or, under CoCo, the TD) can "
    "reach the registry; see native/coco/coredns_hosts.sh.",
    "ImagePullBackOff": "check the image name and that the nodes (or, under CoCo, the TD) can "
    "reach the registry; see native/coco/coredns_hosts.sh.",
    "InvalidImageName": "fix the image reference in LabConfig.",
    "CrashLoopBackOff": "read the participant's log events; the process keeps exiting.",
    "CreateContainerConfigError": "a ConfigMap or volume is missing; re-run start().",
    "CreateContainerError": "the runtime could not create the container; for kata-qemu-tdx "
    "check the kata configuration (native/coco/kata_config.sh) and the node's TDX setup.",
    "RunContainerError": "the runtime could not start the container; check the node's kata "
    "and TDX setup.",
}
_APPLY_ORDER = [
    "Namespace",
    "ConfigMap",
    "Secret",
    "PersistentVolumeClaim",
    "Service",
    "NetworkPolicy",
    "StatefulSet",
    "Ingress",
]


def role_of_pod(pod_name: str) -> str:
    """``trust-0`` → ``trust``, ``ps-0`` → ``ps0``, ``worker-3`` → ``worker3``."""
    base, _, ordinal = pod_name.rpartition("-")
    if base == "trust":
        return "trust"
    return f"{base}{ordinal}" if base else pod_name


def event_from_line(source: str, line: str) -> LabEvent:
    """A participant's stdout line: its own ``LabEvent`` JSON, or a "log" event around it."""
    text = line.rstrip("\r")
    if text.startswith("{"):
        try:
            event = LabEvent.from_json(text)
        except (ValueError, KeyError, TypeError):
            pass
        else:
            if event.kind in KINDS:
                return event
    level = "info"
    for word in ("CRITICAL", "ERROR", "WARNING", "DEBUG"):
        if word in text[:40]:
            level = word.lower()
            break
    return LabEvent("log", source, {"level": level, "message": text})


def _pod_state(pod: dict[str, Any]) -> tuple[str, str]:
    """(lifecycle state, detail) of a pod: starting | ready | exited | failed."""
    status = pod.get("status") or {}
    phase = status.get("phase", "Pending")
    for cs in status.get("containerStatuses") or []:
        waiting = (cs.get("state") or {}).get("waiting") or {}
        if waiting.get("reason") in FATAL_REASONS:
            return (
                "failed",
                f"{cs['name']}: {waiting['reason']}: {waiting.get('message', '')}".strip(),
            )
    if phase == "Failed":
        return "failed", status.get("reason") or status.get("message") or "pod failed"
    if phase == "Succeeded":
        return "exited", "completed"
    ready = any(
        c.get("type") == "Ready" and c.get("status") == "True"
        for c in status.get("conditions") or []
    )
    if phase == "Running" and ready:
        return "ready", "running"
    return "starting", phase


class KubernetesBackend:
    """Deploys the lab with the manifests of k8s/ and follows it; see :mod:`.render`."""

    name = "kubernetes"

    def __init__(
        self,
        settings: KubernetesSettings,
        api: ClusterApi | None = None,
        k8s_dir: Path = rendering.K8S_DIR,
    ) -> None:
        self.settings = settings
        self.k8s_dir = k8s_dir
        self._api = api
        self._events: queue.Queue[LabEvent | None] = queue.Queue()
        self._lock = threading.Lock()
        self._states: dict[str, tuple[str, str]] = {}
        self._followed: set[tuple[str, str, str, int]] = set()
        self._stop = threading.Event()
        self._monitor: threading.Thread | None = None
        self.applied: list[Manifest] = []
        #: the owner's side of the run (public files only): the lab's run folder, which holds
        #: the kustomization folder ``k8s/``; a temporary folder without one
        self.owner_dir = settings.run_dir.parent if settings.run_dir is not None else None
        self._admin_token: bytes | None = None
        #: the simulated platform of a runc run (its keys reach the pods only through Secrets)
        self.platform: SimulatedPlatform | None = None
        self.policy: AttestationPolicy | None = None
        self.rendered: rendering.RenderedRun | None = None
        #: why the trust service could not be provisioned (wait_ready raises it)
        self.provision_problem: HflLabError | None = None
        #: the encrypted, signed image this backend published at start (the encrypted+signed
        #: overlay) and its layer key, in memory only, registered once the trust service is
        self.published_image: PublishedImage | None = None
        self.layer_key: LayerKey | None = None

    def __repr__(self) -> str:
        return (f"KubernetesBackend(namespace={self.settings.namespace!r}, "
                f"overlay={self.settings.overlay!r}, <secrets in memory>)")

    # -- the owner's side ------------------------------------------------------------------

    def _owner_path(self, *parts: str) -> Path:
        if self.owner_dir is None:
            self.owner_dir = Path(tempfile.mkdtemp(prefix="hfl-lab-owner-"))
        return self.owner_dir.joinpath(*parts)

    @property
    def trust_dir(self) -> Path:
        """``trust/``: the public salt, the platform's public root, the volume's release policy,
        and (after :meth:`collect_sealed_model`) the trust service's sealed state."""
        return self._owner_path("trust")

    @property
    def owner_salt_path(self) -> Path:
        return self.trust_dir / "owner.json"

    @property
    def trust_state_path(self) -> Path:
        return self.trust_dir / "state.sealed"

    @property
    def vault_path(self) -> Path:
        """Where :meth:`collect_sealed_model` puts the volume on the owner's side."""
        return self._owner_path("vault", "model.luks")

    @property
    def admin_token(self) -> bytes:
        """The owner's admin credential for this run's trust service, derived from the session's
        owner secret and the run's public salt (so notebook 05, in another kernel, derives the
        same key to unseal the service's state): in memory and the trust pod's Secret only."""
        if self._admin_token is None:
            self._admin_token = owner.admin_token(owner.run_salt(self.owner_salt_path))
        return self._admin_token

    def owner_credential(self) -> SealedBrokerState:
        """The owner's authorized way to the volume passphrase: the collected sealed state."""
        return SealedBrokerState(self.trust_state_path, owner.sealing_key(self.admin_token))

    def _write_public_trust_files(self) -> None:
        """What the owner's node needs to verify ps0's provenance signatures offline."""
        self.trust_dir.mkdir(parents=True, exist_ok=True)
        rendered = self.rendered
        if rendered is not None and rendered.volume_policy is not None:
            rendered.volume_policy.save(self.trust_dir / "volume_policy.yaml")
        if self.platform is not None:
            AttestedSigners.write_platform(self.trust_dir, self.platform.root_der,
                                           self.platform.collateral_json)

    # -- plumbing -----------------------------------------------------------------------

    @property
    def api(self) -> ClusterApi:
        if self._api is None:
            self._api = ClusterApi.connect(self.settings.kubeconfig, self.settings.context)
        return self._api

    def _emit(self, event: LabEvent) -> None:
        self._events.put(event)

    def _fail(self, what: str, exc: ApiError) -> BackendError:
        if exc.status == 403:
            fix = "grant the kubeconfig's user rights in the namespace (RBAC), or use another user."
        elif exc.status == 0:
            fix = "check that the cluster is reachable (kubectl get nodes)."
        else:
            fix = "see the API server's message; run preflight() for the usual causes."
        return BackendError(f"{what} failed: {exc}.", fix=fix)

    # -- Backend ------------------------------------------------------------------------

    def preflight(self) -> list[PreflightCheck]:
        try:
            api = self.api
        except BackendError as exc:
            return [PreflightCheck("credentials", False, exc.message, exc.fix or "")]
        checks = cluster_checks(api, self.settings)
        self.render()
        assert self.rendered is not None
        return [*checks, check_vault(self.rendered)]

    def render(self) -> list[Manifest]:
        """The objects this run applies (also written to ``settings.run_dir``); no Secrets."""
        self.rendered = rendering.render_run(
            self.settings, self.k8s_dir, signing_key=owner.policy_signing_key(self.admin_token))
        self.policy = self.rendered.policy
        return sorted(self.rendered.objects, key=lambda o: _APPLY_ORDER.index(o["kind"]))

    def _bootstrap_secrets(self) -> list[Manifest]:
        if not self.settings.uses_tdx and self.platform is None:
            self.platform = SimulatedPlatform.generate()
        return bootstrap.bootstrap_secrets(self.settings.namespace,
                                           None if self.settings.uses_tdx else self.platform)

    def wants_image(self) -> bool:
        """Whether start() publishes the participant image: the encrypted+signed overlay, an
        image not yet pinned by digest, and ``workload_image`` on, or auto with skopeo, gnupg
        and a builder here (``on`` without them is refused by :meth:`publish_image`)."""
        if self.settings.overlay != SIGNED_OVERLAY or self.settings.image_ref.digest:
            return False
        mode = str(self.settings.lab_config.get("workload_image", "auto"))
        if mode != "auto":
            return mode == "on"
        return not missing_tools(("skopeo", "gpg", "gpgconf")) and bool(
            usable_builders(tool_inventory()))

    def publish_image(self, builder: str | None = None) -> PublishedImage:
        """Build native/image/Dockerfile, encrypt, push to the user's registry and sign
        (:func:`.workload_image.publish_cluster_image`, into the run's ``image/``), then pin the
        run to the signed digest; the layer key stays in memory until the trust service is
        provisioned (:meth:`register_layer_key`)."""
        folder = self.settings.image_dir or self._owner_path("image")
        key = LayerKey()
        published = publish_cluster_image(self.settings, folder, key, builder=builder)
        self.settings = pinned_settings(dataclasses.replace(self.settings, image_dir=folder),
                                        published)
        self.published_image, self.layer_key = published, key
        self.rendered = None
        self._emit(LabEvent("log", "owner", {
            "level": "info",
            "message": f"participant image built, encrypted, pushed and signed: "
            f"{self.settings.image}",
        }))
        return published

    def start(self) -> None:
        if self.wants_image():
            self.publish_image()
        objects = self.render()
        assert self.rendered is not None
        if self.rendered.volume_policy_error:
            raise BackendError(
                f"model vault: {self.rendered.volume_policy_error}",
                fix=self.rendered.volume_policy_fix,
            )
        objects += self._bootstrap_secrets()
        self._write_public_trust_files()
        objects.sort(key=lambda o: _APPLY_ORDER.index(o["kind"]))
        for i, obj in enumerate(objects, 1):
            what = f"applying {obj['kind']} {obj['metadata']['name']}"
            try:
                self.api.apply(obj, self.settings.field_manager)
            except ApiError as exc:
                raise self._fail(what, exc) from None
            # a Secret's data stays out of what the backend keeps
            self.applied.append(bootstrap.reference(obj) if obj["kind"] == "Secret" else obj)
            self._emit(
                LabEvent(
                    "progress",
                    "kubernetes",
                    {"done": i, "total": len(objects), "unit": "objects", "label": what},
                )
            )
        self._stop.clear()
        self._monitor = threading.Thread(target=self._monitor_loop, name="k8s-monitor", daemon=True)
        self._monitor.start()

    def expected_pods(self) -> list[str]:
        return ["trust-0", PS_POD] + [f"worker-{i}" for i in range(self.settings.workers)]

    def wait_ready(self, timeout_s: float, progress: ProgressCallback | None = None) -> None:
        deadline = time.monotonic() + timeout_s
        expected = self.expected_pods()
        while True:
            pods = self._poll()
            states = {
                name: _pod_state(pods[name]) if name in pods else ("starting", "not created")
                for name in expected
            }
            if self.provision_problem is not None:
                raise self.provision_problem
            failed = {n: d for n, (s, d) in states.items() if s in ("failed", "exited")}
            if failed:
                name, detail = next(iter(failed.items()))
                reason = detail.split(": ")[1] if ": " in detail else ""
                raise BackendError(
                    f"pod {name} ({role_of_pod(name)}) failed to start: {detail}.",
                    fix=FATAL_REASONS.get(reason, "read its log events and pod description."),
                )
            done = sum(1 for s, _ in states.values() if s == "ready")
            if progress is not None:
                progress(done, len(expected), "pods ready")
            self._emit(
                LabEvent(
                    "progress",
                    "kubernetes",
                    {"done": done, "total": len(expected), "unit": "pods", "label": "pods ready"},
                )
            )
            if done == len(expected):
                return
            if time.monotonic() >= deadline:
                waiting = ", ".join(f"{n} ({d})" for n, (s, d) in states.items() if s != "ready")
                raise BackendError(
                    f"{done} of {len(expected)} pods ready after {timeout_s:.0f} s; "
                    f"still waiting for {waiting}.",
                    fix="give wait_ready more time (TDs boot slowly), or look at the pods' "
                    "lifecycle and log events.",
                )
            time.sleep(min(self.settings.poll_interval_s, max(0.0, deadline - time.monotonic())))

    def events(self, idle_timeout_s: float | None = None) -> Iterator[LabEvent]:
        """Events until teardown (or until none came for ``idle_timeout_s``)."""
        while True:
            try:
                event = self._events.get(timeout=idle_timeout_s)
            except queue.Empty:
                return
            if event is None:
                return
            yield event

    def fetch_vault(self, dest: Path) -> Path:
        """Copy ps0's LUKS volume (ciphertext) out of its pod to ``dest``, checked."""
        out = self._copy_out(PS_POD, VAULT_CONTAINER, rendering.VAULT_PATH, dest,
                             "wait until the PS has written its first checkpoint, then retry.",
                             claim=("vault", "/vault"))
        self._emit(
            LabEvent("lifecycle", "ps0", {"state": "exited", "detail": f"vault copied to {out}"})
        )
        return out

    def collect_sealed_model(self) -> None:
        """After training: the volume (ps0's pod) and the trust service's sealed state (the
        trust pod: the passphrase, sealed under the owner's key) to the owner's run folder,
        ``vault/model.luks`` and ``trust/state.sealed``, before teardown deletes their PVCs.
        A run without the vault has nothing to collect."""
        if self.rendered is None:  # a backend made for a run another process started
            self.render()
        assert self.rendered is not None
        if self.rendered.volume_policy is None:
            return
        self.fetch_vault(self.vault_path)
        self._copy_out(TRUST_POD, TRUST_CONTAINER, rendering.TRUST_STATE_FILE,
                       self.trust_state_path,
                       "check that the trust service runs with --state on its PVC, then retry.",
                       claim=("trust-state", "/var/lib/hfl-lab/trust"))
        self._emit(LabEvent("log", "owner", {
            "level": "info",
            "message": f"sealed model collected: {self.vault_path} and the trust service's "
            f"sealed state {self.trust_state_path.name} (opened with the owner key only)",
        }))

    def _copy_out(self, pod: str, container: str, in_pod: str, dest: Path, fix: str,
                  claim: tuple[str, str]) -> Path:
        """One file out of ``pod`` (see :class:`~.vault_copy.CopyOut`), API errors named."""
        try:
            return vault_copy.CopyOut(self.api, self.settings).copy(pod, container, in_pod, dest,
                                                                    fix, claim)
        except ApiError as exc:
            raise self._fail(f"copying {in_pod} out of {pod}", exc) from None

    def teardown(self) -> None:
        self._stop.set()
        if self._monitor is not None:
            self._monitor.join(timeout=5)
            self._monitor = None
        objects = self.applied or sorted(
            self.render()
            + bootstrap.secret_references(self.settings.namespace),
            key=lambda o: _APPLY_ORDER.index(o["kind"]),
        )
        for obj in reversed(objects):
            try:
                self.api.delete(object_path(obj))
            except ApiError as exc:
                raise self._fail(f"deleting {obj['kind']} {obj['metadata']['name']}", exc) from None
        self.applied = []
        self._emit(LabEvent("lifecycle", "kubernetes", {"state": "exited", "detail": "torn down"}))
        self._events.put(None)

    # -- watching -----------------------------------------------------------------------

    def _poll(self) -> dict[str, dict[str, Any]]:
        """List the lab's pods; emit lifecycle changes; follow the logs of new containers."""
        path = f"/api/v1/namespaces/{self.settings.namespace}/pods"
        try:
            items = self.api.get(path, [("labelSelector", SELECTOR)]).get("items", [])
        except ApiError as exc:
            raise self._fail("listing the lab's pods", exc) from None
        pods = {p["metadata"]["name"]: p for p in items}
        with self._lock:
            for name, pod in pods.items():
                state = _pod_state(pod)
                if self._states.get(name) != state:
                    self._states[name] = state
                    self._emit(
                        LabEvent(
                            "lifecycle",
                            role_of_pod(name),
                            {"state": state[0], "detail": state[1], "pod": name},
                        )
                    )
                self._follow_new_containers(pod)
        return pods

    def _follow_new_containers(self, pod: dict[str, Any]) -> None:
        name = pod["metadata"]["name"]
        base = name.rpartition("-")[0]
        main = MAIN_CONTAINER.get(base)
        if main is None:
            return
        for cs in (pod.get("status") or {}).get("containerStatuses") or []:
            state = cs.get("state") or {}
            if cs.get("name") != main or not ("running" in state or "terminated" in state):
                continue
            key = (pod["metadata"].get("uid", name), name, main, int(cs.get("restartCount", 0)))
            if key in self._followed:
                continue
            self._followed.add(key)
            threading.Thread(
                target=self._follow_log, args=(name, main), name=f"log-{name}", daemon=True
            ).start()

    def _follow_log(self, pod: str, container: str) -> None:
        source = role_of_pod(pod)
        path = f"/api/v1/namespaces/{self.settings.namespace}/pods/{pod}/log"
        try:
            for line in self.api.stream_lines(path, [("container", container), ("follow", "true")]):
                if self._stop.is_set():
                    return
                if line:
                    event = event_from_line(source, line)
                    self._emit(event)
                    if (source == "trust" and event.kind == "lifecycle"
                            and event.data.get("state") == "provisioning"):
                        threading.Thread(target=self._provision_in_background,
                                         name="trust-provision", daemon=True).start()
        except ApiError as exc:
            self._emit(
                LabEvent("log", source, {"level": "warning", "message": f"log stream ended: {exc}"})
            )

    # -- provisioning the trust service ----------------------------------------------------

    @contextlib.contextmanager
    def trust_endpoint(self) -> Iterator[str]:
        """An address on this machine that reaches the trust service's TLS port: the ingress
        (``settings.trust_endpoint``) or a port-forward through the API server for the block.
        Either path is untrusted; the attested TLS session is end to end."""
        if self.settings.trust_endpoint:
            yield self.settings.trust_endpoint
            return
        namespace = self.settings.namespace

        def open_stream() -> Any:
            return self.api.port_forward(namespace, TRUST_POD, TRUST_PORT)

        with LocalForward(open_stream, what=f"pod {TRUST_POD}") as address:
            yield address

    def provision_trust(self, timeout_s: float | None = None) -> str:
        """Verify the run's trust service and send it the owner's credential (done by itself
        when the trust pod asks; call it again after restarting the pod by hand)."""
        if self.policy is None:
            self.render()
        assert self.policy is not None
        with self.trust_endpoint() as address:
            detail = provision.provision_trust(
                address, self.policy, self.admin_token,
                lab_root_der=self.platform.root_der if self.platform else None,
                timeout_s=timeout_s or min(self.settings.connect_timeout_s, 300.0),
            )
        self._emit(LabEvent("log", "owner", {
            "level": "info",
            "message": f"trust service attested; owner's credential sent over its attested "
            f"channel ({detail})",
        }))
        return detail

    def register_layer_key(self, key: LayerKey) -> AttestationPolicy:
        """Register the workload image's layer key (:func:`.workload_image.
        publish_cluster_image` encrypted the image for its public half) in the run's
        provisioned trust service, releasable to ps0 and the workers only, each held to its own
        measurements (:func:`.workload_image.cluster_release_policy`); the release policy."""
        if self.rendered is None:
            self.render()
        assert self.rendered is not None and self.policy is not None
        release = cluster_release_policy(self.rendered)
        with self.trust_endpoint() as address:
            provision.register_layer_key(
                address, self.policy, self.admin_token, key, release,
                lab_root_der=self.platform.root_der if self.platform else None)
        self._emit(LabEvent("log", "owner", {
            "level": "info",
            "message": "the workload image's layer key is registered in the trust service, "
            f"releasable to {', '.join(sorted(release.roles))} after attestation",
        }))
        return release

    def _provision_in_background(self) -> None:
        try:
            self.provision_trust()
        except HflLabError as error:  # unreachable (BackendError) or refused (its own type)
            self.provision_problem = error
            self._emit(LabEvent("log", "owner", {"level": "error", "message": str(error)}))
            return
        self.provision_problem = None
        if self.layer_key is None:
            return
        try:
            self.register_layer_key(self.layer_key)
        except HflLabError as error:
            # the guests of a TDX run take their image key from Trustee (k8s/README.md); the
            # trust service's copy needs a policy that pins every participant's MR_TD
            self._emit(LabEvent("log", "owner", {
                "level": "warning",
                "message": f"the layer key stays with the owner: {error}"}))

    def _monitor_loop(self) -> None:
        while not self._stop.wait(self.settings.poll_interval_s):
            try:
                self._poll()
            except BackendError as exc:
                self._emit(LabEvent("log", "kubernetes", {"level": "warning", "message": str(exc)}))

