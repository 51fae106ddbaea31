"""What every participant process shares: bootstrap, events on stdout, evidence, attestation.

A participant (trust service, ps0, a worker) is one process in one TD. It

1. reads its bootstrap from stdin when its launcher gives one (the local backend hands each
   simulated TD the lab platform's keys this way, never through a file or the environment, and
   keeps the pipe open: when the launcher dies, stdin reaches EOF and the participant exits, so no
   process outlives the lab); in a pod, which has no launcher on stdin, from the file that
   ``$HFL_LAB_BOOTSTRAP_FILE`` names: a Kubernetes Secret volume (tmpfs) that the Kubernetes
   backend created from memory (see ``hfl_lab.backends.kubernetes.bootstrap``);
2. measures itself and obtains evidence from the configured source;
3. attests to the trust service (retrying while it is not up yet) and gets its mesh identity;
4. prints one JSON :class:`~hfl_lab.events.LabEvent` per line on stdout (the backend's event
   stream) and human log lines on stderr.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

import grpc

from hfl_lab._exceptions import AttestationError, ConfigError, HflLabError
from hfl_lab.events import LabEvent
from hfl_lab.ratls.certificate import RaTlsIdentity
from hfl_lab.tee.collateral import Collateral
from hfl_lab.tee.evidence import EvidenceProvider
from hfl_lab.tee.policy import AttestationPolicy, baseline_policy
from hfl_lab.tee.providers.coco_agent import CocoAgentProvider
from hfl_lab.tee.providers.configfs_tsm import ConfigfsTsmProvider
from hfl_lab.tee.providers.detect import choose_provider, detect
from hfl_lab.tee.providers.simulated import SimulatedTdProvider
from hfl_lab.tee.sim.measure import TdMeasurements, measure_workload
from hfl_lab.tee.sim.platform import SimulatedPlatform
from hfl_lab.tee.verdict import Verdict
from hfl_lab.tee.verifier import Verifier
from hfl_lab.trust.client import MeshCredentials, TrustClient
from hfl_lab.trust.service import event_for
from trainer.participant_config import ParticipantConfig

__all__ = [
    "BOOTSTRAP_FD_ENV",
    "BOOTSTRAP_FILE_ENV",
    "Bootstrap",
    "Emitter",
    "Participant",
    "StopFlag",
    "configure_logging",
    "load_run_policy",
    "measured_argv",
    "read_bootstrap",
]

log = logging.getLogger("hfl_lab.participant")

#: evidence sources that only real TDX hardware provides
HARDWARE_EVIDENCE = ("configfs-tsm", "coco-agent")
#: exit status of a participant whose launcher went away (stdin closed)
EXIT_ORPHANED = 3
#: set to 1 in a participant's environment to launch it as a DEBUG TD (attack demonstrations)
DEBUG_TD_ENV = "HFL_LAB_SIM_DEBUG"
#: in a pod: the file (a tmpfs Secret volume) that holds the bootstrap line instead of stdin
BOOTSTRAP_FILE_ENV = "HFL_LAB_BOOTSTRAP_FILE"
#: set by a participant's image stage (:mod:`trainer.image_boot`) when it execs the workload it
#: pulled: the file descriptor (in memory) holding the bootstrap line it read from the launcher;
#: stdin is still the launcher's pipe, and is watched for EOF as usual
BOOTSTRAP_FD_ENV = "HFL_LAB_BOOTSTRAP_FD"


@dataclass(frozen=True)
class Bootstrap:
    """What the launcher hands a participant over stdin: for a simulated TD, the lab
    platform's keys (held in memory only). The owner's admin credential is never part of it:
    the trust service receives that by ``Provision`` over its attested channel; a bootstrap
    that carries one anyway is not read for it."""

    platform: SimulatedPlatform | None = None

    def __repr__(self) -> str:
        return "Bootstrap(<secrets in memory>)"


def read_bootstrap(stream: TextIO | None = None, *, watch: bool = True) -> Bootstrap:
    """Read the one-line JSON bootstrap from stdin; then watch stdin for EOF (launcher gone).

    With no launcher (stdin a terminal or /dev/null) the bootstrap is empty. When no ``stream``
    is given and ``$HFL_LAB_BOOTSTRAP_FILE`` is set (a pod), the bootstrap comes from that file
    instead, and nothing watches stdin: the pod's lifetime is Kubernetes' business. When
    ``$HFL_LAB_BOOTSTRAP_FD`` is set (the workload exec'd by its image stage), the line comes from
    that descriptor, which is then closed, and stdin (the launcher's pipe) is watched.
    """
    path = os.environ.get(BOOTSTRAP_FILE_ENV, "") if stream is None else ""
    if path:
        return _read_bootstrap_file(Path(path))
    handed = os.environ.pop(BOOTSTRAP_FD_ENV, "") if stream is None else ""
    stream = stream or sys.stdin
    if stream is None or stream.closed or stream.isatty():
        return Bootstrap()
    line = _handed_line(handed) if handed else stream.readline()
    if not line.strip():
        return Bootstrap()
    try:
        boot = _parse_bootstrap(line, "the bootstrap line on stdin",
                                "start participants through a backend (hfl_lab.backends.local).")
    finally:
        del line
    if watch:
        threading.Thread(target=_exit_on_eof, args=(stream,), daemon=True,
                         name="launcher-watch").start()
    return boot


def _handed_line(fd_text: str) -> str:
    try:
        with open(int(fd_text), encoding="utf-8", closefd=True) as handed:
            return handed.readline()
    except (OSError, ValueError) as e:
        raise ConfigError(
            f"the bootstrap descriptor {BOOTSTRAP_FD_ENV}={fd_text!r} cannot be read "
            f"({type(e).__name__}).",
            fix="start participants through a backend (hfl_lab.backends.local).") from None


def _read_bootstrap_file(path: Path) -> Bootstrap:
    fix = ("let the Kubernetes backend create the run's bootstrap Secret (it does so in start()), "
           f"or unset {BOOTSTRAP_FILE_ENV}.")
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise ConfigError(
            f"cannot read the bootstrap file {path} named by {BOOTSTRAP_FILE_ENV}: "
            f"{e.strerror or type(e).__name__}.",
            fix=fix,
        ) from None
    try:
        if not text.strip():
            return Bootstrap()
        return _parse_bootstrap(text, f"the bootstrap file {path}", fix)
    finally:
        del text


def _parse_bootstrap(text: str, what: str, fix: str) -> Bootstrap:
    """The secrets of a bootstrap JSON object; the message never quotes them."""
    try:
        raw = json.loads(text)
        platform = raw.get("platform")
        return Bootstrap(
            platform=SimulatedPlatform.from_secret(bytes.fromhex(platform)) if platform else None,
        )
    except (ValueError, AttributeError, TypeError, HflLabError) as e:
        raise ConfigError(f"{what} is not valid ({type(e).__name__}).", fix=fix) from None


def _exit_on_eof(stream: TextIO) -> None:
    while stream.readline():
        pass
    # The launcher is gone (crash, kill -9, closed notebook): do not outlive it.
    os._exit(EXIT_ORPHANED)


class Emitter:
    """Writes events as JSON lines to stdout (thread-safe) and passes them to listeners."""

    def __init__(self, source: str, stream: TextIO | None = None) -> None:
        self.source = source
        self._stream = stream or sys.stdout
        self._lock = threading.Lock()
        self.listeners: list[Callable[[LabEvent], None]] = []

    def emit(self, event: LabEvent) -> None:
        line = event.to_json()
        with self._lock:
            try:
                self._stream.write(line + "\n")
                self._stream.flush()
            except (OSError, ValueError):
                pass  # stdout gone: the launcher is gone too
        for listener in list(self.listeners):
            listener(event)

    def __call__(self, kind: str, **data: Any) -> None:
        self.emit(LabEvent(kind, self.source, data))

    def lifecycle(self, state: str, detail: str = "", **data: Any) -> None:
        self("lifecycle", state=state, pid=os.getpid(), detail=detail, **data)

    def log(self, message: str, level: str = "info") -> None:
        getattr(log, level if level in ("debug", "info", "warning", "error") else "info")(message)
        self("log", level=level, message=message)

    def attestation(self, verdict: Verdict) -> None:
        self.emit(event_for(verdict))


def configure_logging() -> None:
    """Human log lines on stderr (stdout carries only JSON events)."""
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")


def measured_argv(module: str, args: Sequence[str]) -> list[str]:
    """The command line a participant's RTMR2 measures: ``python -m <module> <args>``."""
    return ["python", "-m", module, *args]


def workload_root() -> Path:
    """The folder holding the ``trainer`` and ``hfl_lab`` packages this process runs."""
    return Path(__file__).resolve().parents[1]


def load_run_policy(config: ParticipantConfig, path: str | Path) -> AttestationPolicy:
    """A policy file of this run: only as the owner signed it when the (measured) config names
    the owner's key, which a run with hardware evidence must (a ConfigMap is not measured)."""
    deployment = config.deployment
    if deployment.policy_key:
        return AttestationPolicy.load_signed(path, deployment.policy_key)
    if deployment.evidence in HARDWARE_EVIDENCE or deployment.overlay.startswith("kata-"):
        raise ConfigError(
            f"the config of this TDX run names no owner policy key, so the policy {path} (a "
            "file anyone with access to the cluster could swap) cannot be checked.",
            fix="let the kubernetes backend render the run: it puts the owner's policy key in "
            "the measured config and signs the policies.",
        )
    return AttestationPolicy.load(path)


class Participant:
    """One TD's identity: its evidence source, its verifier, its attestation to the service."""

    def __init__(
        self,
        role: str,
        config: ParticipantConfig,
        argv: Sequence[str],
        bootstrap: Bootstrap,
        emitter: Emitter,
        *,
        policy: AttestationPolicy | None = None,
    ) -> None:
        self.role = role
        self.config = config
        self.argv = list(argv)
        self.bootstrap = bootstrap
        self.emit = emitter
        self.policy = policy or self._load_policy()
        self._refuse_lab_trust_on_tdx()
        self.measurements: TdMeasurements | None = None
        self.provider = self._provider()
        self.identity = RaTlsIdentity()
        self.verifier = self.make_verifier()

    # -- evidence ------------------------------------------------------------------------

    def _load_policy(self) -> AttestationPolicy:
        path = self.config.deployment.policy_path
        if path:
            return load_run_policy(self.config, path)
        policy = baseline_policy()
        if self.config.deployment.evidence == "simulated":
            policy = policy.replace(allow_simulated=True)
        return policy

    def _refuse_lab_trust_on_tdx(self) -> None:
        """On a run with hardware evidence only Intel's root is trusted: a lab platform in the
        bootstrap, or ``allow_simulated`` in the policy, is what someone who can write the
        cluster's Secrets or ConfigMaps would add to have simulated evidence accepted."""
        deployment = self.config.deployment
        if deployment.evidence not in HARDWARE_EVIDENCE and not deployment.overlay.startswith(
                "kata-"):
            return
        run = f"a TDX run ({deployment.evidence} evidence, overlay {deployment.overlay})"
        if self.bootstrap.platform is not None:
            raise ConfigError(
                f"{self.role}: the bootstrap of {run} holds a lab platform (a simulated root "
                "and its keys); under TDX only Intel's root is trusted, so it is refused.",
                fix="remove the 'platform' field from the run's bootstrap Secret (the Kubernetes "
                "backend never writes one for the kata overlays) and find who added it.",
            )
        if self.policy.allow_simulated:
            raise ConfigError(
                f"{self.role}: the policy of {run} says allow_simulated: true; simulated "
                "evidence proves no hardware, so a TDX run refuses it.",
                fix="set allow_simulated: false in the policy (the derived policy of the kata "
                "overlays does), or run the simulated TDs under the runc overlay.",
            )

    def _provider(self) -> EvidenceProvider:
        source = self.config.deployment.evidence
        if source == "configfs-tsm":
            return ConfigfsTsmProvider()
        if source == "coco-agent":
            return CocoAgentProvider()
        simulated = self._simulated() if self.bootstrap.platform is not None else None
        if source == "simulated":
            if simulated is None:
                raise ConfigError(
                    f"{self.role}: evidence 'simulated' needs the lab platform's keys, and no "
                    "bootstrap came on stdin.",
                    fix="start participants through a backend, or set deployment.evidence to "
                    "configfs-tsm inside a TD.",
                )
            return simulated
        allowed = self.config.lab.allow_simulated and simulated is not None
        return choose_provider(detect(allow_simulated=allowed), simulated)

    def _simulated(self) -> SimulatedTdProvider:
        assert self.bootstrap.platform is not None
        self.measurements = measure_workload(
            role=self.role, config=self.config.measured(), argv=self.argv, root=workload_root()
        )
        debug = os.environ.get(DEBUG_TD_ENV, "") == "1"
        return SimulatedTdProvider(self.bootstrap.platform, self.measurements, debug=debug)

    def make_verifier(self, policy: AttestationPolicy | None = None) -> Verifier:
        """This participant's own verifier: every verdict becomes an attestation event."""
        platform = self.bootstrap.platform
        return Verifier(
            policy or self.policy,
            lab_root_der=platform.root_der if platform else None,
            lab_collateral=Collateral(platform.collateral_json, "lab platform")
            if platform
            else None,
            name=self.role,
            on_verdict=self.emit.attestation,
        )

    # -- attestation -----------------------------------------------------------------------

    def connect_trust(self, deadline_s: float | None = None) -> TrustClient:
        """Verify the trust service's own attestation, retrying while it is not up yet or not
        yet provisioned by its owner."""
        address = self.config.deployment.trust_address
        platform = self.bootstrap.platform

        def connect() -> TrustClient:
            client = TrustClient.connect(
                address,
                self.policy,
                lab_root_der=platform.root_der if platform else None,
                role="trust",
                verifier_name=self.role,
                on_verdict=self.emit.attestation,
            )
            try:
                client.check_open()
            except BaseException:
                client.close()
                raise
            return client

        client: TrustClient = retry_until(
            connect,
            what=f"the trust service at {address}",
            timeout_s=deadline_s or self.config.deployment.connect_timeout_s,
        )
        return client

    def attest(self, client: TrustClient) -> MeshCredentials:
        """Prove this TD to the trust service; its mesh certificate for this role."""
        creds = client.attest(self.role, self.provider, self.identity)
        self.emit.log(
            f"{self.role}: attested, mesh certificate valid until "
            f"{time.strftime('%H:%M:%S', time.localtime(creds.not_after))}"
        )
        return creds


class StopFlag:
    """"Stop" as the SIGTERM handler sets it: a plain flag, no lock. A signal handler runs in
    the main thread between two bytecodes, possibly while that thread holds the lock of the
    very ``threading.Event`` it waits on (``Event.wait`` holds it around its wait): ``set()``
    from the handler then blocked forever, and ps0, idle in ``while not stop.wait(1.0)``, hung
    at its stop until it was killed. ``wait`` polls instead (a serve loop's pace)."""

    def __init__(self) -> None:
        self._set = False

    def set(self) -> None:
        self._set = True

    def is_set(self) -> bool:
        return self._set

    def wait(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while not self._set:
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            time.sleep(min(0.05, left))
        return True


class MeshSession:
    """A participant's current mesh credentials, renewed by re-attesting every ``every_s``.

    Each renewal makes a fresh key in memory, obtains fresh evidence bound to it and a new
    certificate. If the fresh evidence fails (changed code, DEBUG, a revoked TCB...), the old
    certificate is not replaced: when it expires, peers refuse this participant on every call.
    """

    def __init__(
        self,
        participant: Participant,
        client: TrustClient,
        creds: MeshCredentials,
        *,
        every_s: float = 0.0,
    ) -> None:
        self.participant = participant
        self.client = client
        self._creds = creds
        self.every_s = every_s
        self.generation = 0
        self.failures = 0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def creds(self) -> MeshCredentials:
        with self._lock:
            return self._creds

    def renew(self) -> bool:
        """Re-attest now; True if a new certificate replaced the old one."""
        p = self.participant
        identity = RaTlsIdentity()
        try:
            creds = self.client.attest(p.role, p.provider, identity)
        except HflLabError as e:
            self.failures += 1
            until = time.strftime("%H:%M:%S", time.localtime(self.creds.not_after))
            p.emit.log(f"{p.role}: re-attestation failed; no new certificate (the current one "
                       f"expires at {until}, then peers refuse this TD): {e}", level="error")
            return False
        with self._lock:
            self._creds = creds
            self.generation += 1
        p.identity = identity
        p.emit.log(f"{p.role}: re-attested; new mesh certificate until "
                   f"{time.strftime('%H:%M:%S', time.localtime(creds.not_after))}")
        return True

    def reconnect(self, deadline_s: float = 120.0) -> bool:
        """The trust service came back as a new process (a new key, a new mesh CA: peers it
        certified since refuse this participant's certificate): verify it again, then attest
        to it; True if a new certificate replaced the old one."""
        p = self.participant
        try:
            client = p.connect_trust(deadline_s=deadline_s)
        except HflLabError as e:
            p.emit.log(f"{p.role}: the trust service did not come back verified: {e}",
                       level="error")
            return False
        old, self.client = self.client, client
        old.close()
        return self.renew()

    def start(self) -> None:
        """Renew in the background every ``every_s`` seconds (0: never)."""
        if self.every_s <= 0 or self._thread is not None:
            return
        self._thread = threading.Thread(target=self._loop, daemon=True, name="re-attest")
        self._thread.start()

    def _loop(self) -> None:
        while not self._stop.wait(self.every_s):
            self.renew()

    def stop(self) -> None:
        self._stop.set()


def retry_until(
    action: Callable[[], Any],
    *,
    what: str,
    timeout_s: float,
    first_delay_s: float = 0.1,
    max_delay_s: float = 2.0,
    on_retry: Callable[[str], None] | None = None,
) -> Any:
    """Run ``action`` until it stops failing with a connection error; back off in between.

    Attestation refusals and configuration errors are not retried: they will not heal.
    """
    deadline = time.monotonic() + timeout_s
    delay = first_delay_s
    while True:
        try:
            return action()
        except AttestationError as e:
            if e.check != "connection":
                raise
            if time.monotonic() + delay > deadline:
                raise HflLabError(
                    f"cannot reach {what} after {timeout_s:.0f} s: {e.message}",
                    fix="check that it runs and that the address in the config file is right.",
                ) from None
            time.sleep(delay)
            delay = min(max_delay_s, delay * 2)
        except (OSError, grpc.RpcError, ConnectionError) as e:
            code = e.code() if isinstance(e, grpc.RpcError) else None
            if code is not None and code not in (
                grpc.StatusCode.UNAVAILABLE,
                grpc.StatusCode.DEADLINE_EXCEEDED,
            ):
                raise
            if time.monotonic() + delay > deadline:
                reason = e.details() if isinstance(e, grpc.RpcError) else str(e)
                raise HflLabError(
                    f"cannot reach {what} after {timeout_s:.0f} s: {reason}",
                    fix="check that it runs and that the address in the config file is right.",
                ) from None
            if on_retry is not None:
                on_retry(str(e))
            time.sleep(delay)
            delay = min(max_delay_s, delay * 2)
