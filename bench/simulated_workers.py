"""Many simulated worker TDs in one process, each a real ``trainer.worker.Worker`` loop with
its own attested identity, against the real ps0 process; a tally of their RPCs. The R7 load
test (tests/reliability/test_load.py) and the P7 scaling figure (bench/scaling.py) use it.

A simulated worker TD here is what ``python -m trainer worker --index N`` would be, minus the
process: its evidence comes from a :class:`SimulatedTdProvider` with the lab platform's keys
and the measurements the backend derived for role ``workerN`` (the same as the process would
present), it attests to the run's real trust service for its mesh certificate, and its own
mutual-TLS channel to ps0 checks ps0's evidence first. Only the model is a stand-in: it replays
one real ResNet gradient per worker (computed on a batch of the worker's own shard) instead of
running TensorFlow every step, so that the load on 2 cores is the PS's, not 32 workers' compute.
"""

from __future__ import annotations

import itertools
import os
import threading
import time
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import numpy as np

from hfl_lab.backends.local import LocalBackend
from hfl_lab.events import LabEvent
from hfl_lab.tee import Collateral, SimulatedTdProvider, Verifier
from hfl_lab.trust.client import MeshCredentials, TrustClient
from trainer.data import BatchStream, load_cifar10, partition
from trainer.model import GradientResult, ResNet, VariableSpec, build_resnet
from trainer.serving import channel_factory
from trainer.worker import Worker, WorkerSummary

#: the status by which the PS tells a worker that training is over (not an error)
FINISHED = grpc.StatusCode.OUT_OF_RANGE


class ReplayedGradients:
    """A worker's model that hands back one precomputed :class:`GradientResult` every step.

    It has the real model's tensors (names, shapes, trainable or not), so the Worker checks it
    against the PS's announcement as it would a ResNet, and it pushes real gradient values.
    """

    def __init__(self, depth: int, specs: Sequence[VariableSpec], result: GradientResult) -> None:
        self.depth = depth
        self.variable_specs = list(specs)
        self.result = result
        self.pulled = 0

    def set_weights(self, weights: Mapping[str, Any], *, partial: bool = False) -> None:
        self.pulled += 1

    def compute_gradients(self, x: Any, y: Any) -> GradientResult:
        return self.result


class NoBatches:
    """The batch stream of a :class:`ReplayedGradients` worker: nothing to read."""

    def batch(self, step: int) -> tuple[None, None]:
        return None, None


class GradientReplays:
    """Stand-in models for up to ``lab.workers`` workers, made on demand: worker ``i``'s
    replays a real gradient of ResNet-``lab.depth`` on the first batch of its own partition
    of the training set (computed once, when first asked for)."""

    def __init__(self, lab: Any) -> None:
        self.lab = lab
        self.data = load_cifar10(lab.require_data_path(), sha256=lab.data_sha256)
        self.parts = partition(self.data.train_labels, lab.workers, lab.partition,
                               alpha=lab.dirichlet_alpha, seed=lab.seed)
        self.model: ResNet = build_resnet(lab.depth, seed=lab.seed,
                                          num_threads=lab.threads or None,
                                          bn_momentum=lab.bn_momentum)
        self._models: list[ReplayedGradients] = []

    def models(self, count: int) -> list[ReplayedGradients]:
        """The first ``count`` workers' models."""
        if count > len(self.parts):
            raise ValueError(f"{count} workers asked for; the partition has {len(self.parts)}")
        lab, data = self.lab, self.data
        for index in range(len(self._models), count):
            stream = BatchStream(data.train_images, data.train_labels, self.parts[index],
                                 lab.batch_size, seed=lab.seed * 1_000 + index,
                                 augmented=lab.augment)
            result = self.model.compute_gradients(*stream.batch(0))
            self._models.append(ReplayedGradients(lab.depth, self.model.variable_specs, result))
        return self._models[:count]


def replayed_models(lab: Any) -> list[ReplayedGradients]:
    """One stand-in model per worker of ``lab`` (see :class:`GradientReplays`)."""
    return GradientReplays(lab).models(lab.workers)


SERVERS = ("trust", "ps0")


def launch_servers(backend: LocalBackend) -> None:
    """``backend.start()`` without the worker processes: the trust service and ps0 only, for
    workers simulated in this process (wait for them with :func:`wait_servers`). Only for a
    run without a vault or image pull, which start() would provision first."""
    backend.prepare()
    for role in SERVERS:
        backend._launch(backend.participants[role])


def wait_servers(backend: LocalBackend, timeout_s: float = 180.0) -> None:
    """Until the trust service and ps0 that :func:`launch_servers` started are ready."""
    backend._wait_roles(list(SERVERS), timeout_s, None)


class RpcTally(
    grpc.UnaryUnaryClientInterceptor,  # type: ignore[type-arg]
    grpc.UnaryStreamClientInterceptor,  # type: ignore[type-arg]
    grpc.StreamUnaryClientInterceptor,  # type: ignore[type-arg]
):
    """Counts the status of every RPC the workers make, by method and code (thread-safe)."""

    def __init__(self) -> None:
        self.codes: Counter[tuple[str, str]] = Counter()
        self.errors: list[str] = []
        self._lock = threading.Lock()

    def _watch(self, method: str, call: Any) -> Any:
        def done(future: Any) -> None:
            code = future.code()
            name = method.rsplit("/", 1)[-1]
            with self._lock:
                self.codes[(name, code.name)] += 1
                if code not in (grpc.StatusCode.OK, FINISHED):
                    self.errors.append(f"{name}: {code.name}: {future.details()}")

        call.add_done_callback(done)
        return call

    def intercept_unary_unary(self, continuation: Any, details: Any, request: Any) -> Any:
        return self._watch(details.method, continuation(details, request))

    def intercept_unary_stream(self, continuation: Any, details: Any, request: Any) -> Any:
        return self._watch(details.method, continuation(details, request))

    def intercept_stream_unary(self, continuation: Any, details: Any, requests: Any) -> Any:
        return self._watch(details.method, continuation(details, requests))

    def count(self, method: str, code: str = "OK") -> int:
        with self._lock:
            return self.codes[(method, code)]


@dataclass
class WorkerTd:
    """One simulated worker TD: its evidence source and the verifier it checks ps0 with."""

    index: int
    provider: SimulatedTdProvider
    verifier: Verifier
    model: ReplayedGradients

    @property
    def role(self) -> str:
        return f"worker{self.index}"


def worker_tds(backend: LocalBackend, models: Sequence[ReplayedGradients]) -> list[WorkerTd]:
    """The run's worker TDs, simulated with the backend's platform and reference measurements."""
    platform, policy = backend.platform, backend.policy
    assert platform is not None and policy is not None, "prepare() the backend first"
    tds = []
    for index, model in enumerate(models):
        role = f"worker{index}"
        verifier = Verifier(policy, lab_root_der=platform.root_der, name=role,
                            lab_collateral=Collateral(platform.collateral_json, "lab platform"))
        tds.append(WorkerTd(index, SimulatedTdProvider(platform, backend.measurements[role]),
                            verifier, model))
    return tds


@dataclass
class Round:
    """One round of every worker: what they did and what went wrong."""

    summaries: dict[str, WorkerSummary] = field(default_factory=dict)
    failures: dict[str, str] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    seconds: float = 0.0
    attested_at: float = 0.0
    started_at: float = 0.0  # wall clock, when the workers' threads started

    @property
    def pushes(self) -> int:
        return sum(len(s.steps) for s in self.summaries.values())

    @property
    def refused_pushes(self) -> int:
        return sum(1 for s in self.summaries.values() for r in s.steps if not r.accepted)


def attest_all(backend: LocalBackend, tds: Sequence[WorkerTd],
               not_before: float = 0.0) -> dict[str, MeshCredentials]:
    """A fresh mesh certificate for every worker TD from the run's trust service.

    The PS hands a role's session to a certificate only if the trust service attested it in a
    later second than the one holding it (notBefore has whole seconds), so a new round's
    attestation waits for the second after ``not_before`` (the previous round's).
    """
    time.sleep(max(0.0, int(not_before) + 1.01 - time.time()))
    assert backend.policy is not None and backend.platform is not None
    creds = {}
    with TrustClient.connect(backend.trust_address, backend.policy,
                             lab_root_der=backend.platform.root_der, role="trust",
                             verifier_name="load-test") as client:
        for td in tds:
            creds[td.role] = client.attest(td.role, td.provider)
    return creds


def run_round(
    backend: LocalBackend,
    tds: Sequence[WorkerTd],
    tally: RpcTally,
    *,
    max_steps: int | None,
    not_before: float = 0.0,
    timeout_s: float = 300.0,
    creds: Mapping[str, MeshCredentials] | None = None,
) -> Round:
    """Every worker TD attests afresh (unless ``creds`` from :func:`attest_all` are given),
    connects, and runs the real Worker loop in its own thread for ``max_steps`` steps (None:
    until the PS says training is over), then disconnects."""
    if creds is None:
        creds = attest_all(backend, tds, not_before)
    done = Round(attested_at=time.time())
    lock = threading.Lock()

    def emit(event: LabEvent) -> None:
        if event.kind == "log" and event.data.get("level") != "info":
            with lock:
                done.warnings.append(f"{event.source}: {event.data.get('message')}")

    def connect_for(td: WorkerTd) -> Callable[[], grpc.Channel]:
        attested = channel_factory(backend.ps_address, creds[td.role], td.verifier)
        return lambda: grpc.intercept_channel(attested(), tally)

    def work(td: WorkerTd) -> None:
        worker = Worker(td.index, td.model, NoBatches(), connect_for(td),  # type: ignore[arg-type]
                        emit=emit, max_steps=max_steps, reconnect_timeout_s=60.0)
        try:
            summary = worker.run()
        except Exception as e:  # every failure is reported by the test
            with lock:
                done.failures[td.role] = f"{type(e).__name__}: {e}"
            return
        with lock:
            done.summaries[td.role] = summary

    threads = [threading.Thread(target=work, args=(td,), name=f"load-{td.role}", daemon=True)
               for td in tds]
    started = time.monotonic()
    done.started_at = time.time()
    for t in threads:
        t.start()
    deadline = started + timeout_s
    for t in threads:
        t.join(timeout=max(0.1, deadline - time.monotonic()))
    done.seconds = time.monotonic() - started
    stuck = [t.name for t in threads if t.is_alive()]
    for name in stuck:
        done.failures[name.removeprefix("load-")] = f"still running after {timeout_s:.0f} s"
    return done


def settled(measure: Callable[[], int], at_most: int | None = None,
            timeout_s: float = 30.0, quiet_s: float = 1.0) -> int:
    """``measure()`` once it has not changed for ``quiet_s`` and is at most ``at_most`` (when
    given); its last value when ``timeout_s`` ran out first."""
    deadline = time.monotonic() + timeout_s
    value = measure()
    since = time.monotonic()
    while time.monotonic() < deadline:
        quiet = time.monotonic() - since >= quiet_s
        if quiet and (at_most is None or value <= at_most):
            return value
        time.sleep(0.1)
        now = measure()
        if now != value:
            value, since = now, time.monotonic()
    return value


def ps_step_rate(events: Sequence[LabEvent], since: float, first: int,
                 last: int) -> tuple[float, float]:
    """(steps per second, seconds) of ps0 from version ``first`` to ``last``, by the times ps0
    stamped on its own progress events (it reports at most every 0.2 s; the ends are exact
    when a report lands on them, otherwise the span is the nearest reports inside it)."""
    points = sorted(
        (int(e.data["done"]), e.time) for e in events
        if e.kind == "progress" and e.source == "ps0" and e.time >= since
        and first <= int(e.data["done"]) <= last
    )
    if len(points) < 2:
        return 0.0, 0.0
    (v0, t0), (v1, t1) = points[0], points[-1]
    return (v1 - v0) / max(t1 - t0, 1e-9), t1 - t0


def ps_window_rates(events: Sequence[LabEvent], since: float, first: int, last: int,
                    windows: int) -> list[float]:
    """ps0's steps per second in each of ``windows`` consecutive spans of its progress reports
    from version ``first`` to ``last`` (fewer where it reported fewer points)."""
    points = sorted(
        (int(e.data["done"]), e.time) for e in events
        if e.kind == "progress" and e.source == "ps0" and e.time >= since
        and first <= int(e.data["done"]) <= last
    )
    if len(points) < 2:
        return []
    count = min(windows, len(points) - 1)
    edges = [round(i * (len(points) - 1) / count) for i in range(count + 1)]
    rates = []
    for a, b in itertools.pairwise(edges):
        (v0, t0), (v1, t1) = points[a], points[b]
        rates.append((v1 - v0) / max(t1 - t0, 1e-9))
    return rates


def machine_busy_seconds() -> float:
    """CPU time every process of this machine has used so far (all cores), from /proc/stat."""
    fields = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
    # user nice system idle iowait irq softirq steal: all but idle and iowait are busy
    busy = sum(int(v) for i, v in enumerate(fields[:8]) if i not in (3, 4))
    return busy / os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """CPU time (user + system) process ``pid`` has used so far, from /proc/<pid>/stat."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def drain(backend: LocalBackend, into: list[LabEvent]) -> None:
    """Move the events the backend has queued so far into ``into`` (without waiting)."""
    into.extend(backend.events(idle_timeout_s=0.05))


def mean_bytes(summaries: Mapping[str, WorkerSummary]) -> tuple[float, float]:
    sent = [r.bytes_sent for s in summaries.values() for r in s.steps]
    received = [r.bytes_received for s in summaries.values() for r in s.steps]
    return (float(np.mean(sent)) if sent else 0.0, float(np.mean(received)) if received else 0.0)
