"""P7: how ps0's cost grows with workers, against perfect linear scaling from one worker.

For each N, the real trust service and ps0 run as the local backend launches them (``python -m
trainer trust`` / ``python -m trainer ps``, sync mode, ResNet-20) and N simulated worker TDs in
this process run the real Worker loop, each with its own attestation and its own RA-TLS
channel, replaying one real ResNet-20 gradient (:mod:`bench.simulated_workers`, as the R7 load
test does). The figure is ps0's sustained pushes per second by its own clock (its progress
reports); the baseline is N times the same figure measured with one worker in the same run,
so the ratio is the scaling efficiency (1.0: linear). Each P7-<N>w record adds its point to
the curve: the report prints it, says where it stops being linear and why (ps0's and the
workers' CPU, ps0's CPU per push split by the PS's own timings) and writes ``bench/scaling.png``
and ``bench/scaling.json``. Every TD here is SIMULATED (lab-local attestation keys).

The workers' client side (encode, TLS, gRPC; no TensorFlow) runs on the same machine as ps0,
as in R7: on 2 cores it takes a share that a real deployment's worker TDs, on their own hosts,
would not, so the report gives ps0's CPU per push and its one-core ceiling apart from it.
"""

from __future__ import annotations

import json
import math
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from bench.registry import BenchContext, Measurement, benchmark
from bench.report import describe_machine
from bench.simulated_workers import (
    GradientReplays,
    NoBatches,
    RpcTally,
    attest_all,
    cpu_seconds,
    drain,
    launch_servers,
    machine_busy_seconds,
    mean_bytes,
    ps_step_rate,
    ps_window_rates,
    run_round,
    wait_servers,
    worker_tds,
)
from bench.support import LabMesh
from hfl_lab.backends.local import LocalBackend
from hfl_lab.config import LabConfig
from hfl_lab.events import LabEvent
from trainer.ps_server import serve_ps, worker_peers
from trainer.serving import channel_factory, parameter_server
from trainer.worker import StepRecord, Worker

WORKER_COUNTS = (2, 4, 8, 16, 32)
HERE = Path(__file__).resolve().parent
PLOT = HERE / "scaling.png"
CURVE = HERE / "scaling.json"
#: scaling efficiency (pushes/s ÷ N × the one-worker rate) below which the curve is not linear
LINEAR = 0.8
#: within this share of its highest pushes/s the curve counts as saturated (noise-proof: one
#: low point on a shared machine does not end it, as "doubling N adds < x" would)
NEAR_PEAK = 0.9


@dataclass(frozen=True)
class Plan:
    """How much each point measures: ``pushes`` in the timed round, at least ``min_steps``."""

    depth: int = 20
    batch_size: int = 32  # of the replayed gradients only: ps0's work does not depend on it
    warmup_steps: int = 3
    pushes: int = 640
    min_steps: int = 20
    windows: int = 5  # the rate is the median over this many spans of the timed round
    split_pushes: int = 40

    def steps(self, workers: int) -> int:
        return max(self.min_steps, math.ceil(self.pushes / workers))


FULL = Plan()
QUICK = Plan(warmup_steps=2, pushes=96, min_steps=4, windows=3, split_pushes=12)


@dataclass(frozen=True)
class Point:
    """One N: the timed round's figures (CPU times over the round's wall time)."""

    workers: int
    steps: int  # steps between ps0's first and last progress report in the round
    ps_seconds: float  # ps0's own span for them
    window_steps_per_s: tuple[float, ...]  # ps0's rate in consecutive spans of the round
    round_seconds: float  # the round's wall time (every worker's threads)
    ps_cpu_s: float  # ps0's CPU time (user + system) during the round
    client_cpu_s: float  # this process's CPU time then: the N workers' client side
    machine_busy_s: float  # every process's CPU time then (other users of the machine too)
    pushes: int
    push_bytes: int
    pull_bytes: int
    worker_push_ms: float  # medians over the round's steps of every worker
    worker_wait_ms: float
    worker_pull_ms: float

    @property
    def steps_per_s(self) -> float:
        """The median of the round's spans: a burst of other work on a shared machine moves
        one span, not the figure."""
        if self.window_steps_per_s:
            return statistics.median(self.window_steps_per_s)
        return self.steps / self.ps_seconds if self.ps_seconds > 0 else 0.0

    @property
    def pushes_per_s(self) -> float:
        return self.steps_per_s * self.workers

    @property
    def step_ms(self) -> float:
        return 1e3 / self.steps_per_s if self.steps_per_s else math.inf

    @property
    def ps_cpu_ms_per_push(self) -> float:
        return 1e3 * self.ps_cpu_s / max(1, self.pushes)

    @property
    def client_cpu_ms_per_push(self) -> float:
        return 1e3 * self.client_cpu_s / max(1, self.pushes)

    @property
    def ps_cores(self) -> float:
        return self.ps_cpu_s / self.round_seconds

    @property
    def client_cores(self) -> float:
        return self.client_cpu_s / self.round_seconds

    @property
    def other_cores(self) -> float:
        """Cores busy with neither ps0 nor the workers: the trust service, other users."""
        return max(0.0, self.machine_busy_s / self.round_seconds - self.ps_cores
                   - self.client_cores)


@dataclass(frozen=True)
class Knee:
    """Where the curve leaves the linear ideal, where it goes flat, and the measured why."""

    linear_until: int  # the largest N (1: only the baseline) before efficiency < LINEAR
    not_linear_at: int | None  # the first N with efficiency < LINEAR
    peak_at: int  # the N with the highest pushes/s (the baseline's 1 among them)
    peak_pushes_per_s: float
    saturated_from: int  # the smallest N within NEAR_PEAK of the peak
    reason: str


def efficiency(point: Point, baseline: Point) -> float:
    return point.pushes_per_s / (point.workers * baseline.pushes_per_s)


def find_knee(baseline: Point, points: Sequence[Point], cores: int,
              split_ms: Mapping[str, float] | None = None) -> Knee:
    """The knee of ``points`` (any order) against linear scaling from ``baseline``, and why."""
    ordered = sorted(points, key=lambda p: p.workers)
    linear_until, off = baseline.workers, None
    for point in ordered:
        if efficiency(point, baseline) < LINEAR:
            off = point
            break
        linear_until = point.workers
    everything = [baseline, *ordered]
    peak = max(everything, key=lambda p: p.pushes_per_s)
    saturated = next(p for p in everything if p.pushes_per_s >= NEAR_PEAK * peak.pushes_per_s)
    return Knee(linear_until, off.workers if off else None, peak.workers, peak.pushes_per_s,
                saturated.workers,
                explain(off or (ordered[-1] if ordered else baseline), cores, split_ms,
                        baseline))


def explain(point: Point, cores: int, split_ms: Mapping[str, float] | None = None,
            baseline: Point | None = None) -> str:
    """Why ``point`` is where it is, from what was measured there (and at N=1)."""
    ceiling = 1e3 / point.ps_cpu_ms_per_push if point.ps_cpu_ms_per_push else math.inf
    machine = point.ps_cores + point.client_cores + point.other_cores
    busy = (f"cores busy: ps0 {point.ps_cores:.2f}, the {point.workers} simulated workers' "
            f"client side (TLS, gRPC, encode; one thread each in one process) "
            f"{point.client_cores:.2f}, everything else {point.other_cores:.2f}; "
            f"{machine:.2f} of {cores}")
    cpu = (f"ps0 spends {point.ps_cpu_ms_per_push:.1f} ms of CPU per push, so ps0 on one core "
           f"serves at most {ceiling:.0f} pushes/s")
    if split_ms:
        cpu += f" ({split_text(split_ms)})"
    both = point.ps_cpu_ms_per_push + point.client_cpu_ms_per_push
    if both > 0:
        cpu += (f"; with the workers' client side on the same machine "
                f"({point.client_cpu_ms_per_push:.1f} ms per push) its {cores} cores allow at "
                f"most {cores * 1e3 / both:.0f} pushes/s")
    if baseline is not None and baseline.ps_cores > 0:
        cpu += (f"; with one worker ps0 is already busy {baseline.ps_cores:.2f} of the time, "
                f"so even without contention linear scaling ends near N = "
                f"1/{baseline.ps_cores:.2f} = {1 / baseline.ps_cores:.1f}")
    head = f"at N={point.workers}"
    if point.ps_cores >= 0.85:
        why = (f"{head} ps0 is CPU-bound: its handlers (decode, screening, aggregation, the "
               "optimizer step, the pull's serialization) are Python that holds the GIL, so "
               "they run one at a time whatever the thread count")
    elif machine >= 0.9 * cores:
        why = (f"{head} the machine's {cores} cores are saturated, so ps0 gets only its share "
               "of them")
    else:
        why = (f"{head} no CPU is saturated: the sync barrier waits for the last of N pushes "
               f"before any worker may pull (median worker wait {point.worker_wait_ms:.0f} ms), "
               "and that wait grows with N")
    return f"{why} ({busy}); {cpu}"


#: ParameterServer.timings keys as the report names them
SPLIT_NAMES = {"decode": "receive+decode", "aggregate": "screen+aggregate",
               "update": "optimizer update", "encode": "pull serialization"}


def split_text(split_ms: Mapping[str, float]) -> str:
    """ps0's timings per push at N=1; update and pull serialization happen once per step."""
    per_step = {"update", "encode"}

    def listed(keep: Callable[[str], bool]) -> str:
        return ", ".join(f"{SPLIT_NAMES.get(k, k)} {v:.2f}" for k, v in split_ms.items()
                         if keep(k)) or "-"

    return (f"wall time in ps0's handlers with 1 worker in-process, ms per push: "
            f"{listed(lambda k: k not in per_step)}; per step, shared by its N pushes: "
            f"{listed(lambda k: k in per_step)}")


# ------------------------------------------------------------------------------ measuring


def measure_point(lab: LabConfig, replays: GradientReplays, workers: int, plan: Plan,
                  run_dir: Path) -> Point:
    """ps0 (a real process, sync, ``workers`` workers) under ``workers`` simulated worker TDs:
    a warm-up round, then the timed round (each with fresh attestations, as R7 does)."""
    steps = plan.steps(workers)
    warmup = plan.warmup_steps
    # never reaches its last step: the backend stops ps0 when the point is measured
    config = lab.replace(workers=workers, steps=warmup + steps + 10, run_dir=str(run_dir))
    tally = RpcTally()
    seen: list[LabEvent] = []
    with LocalBackend(config) as backend:
        launch_servers(backend)
        tds = worker_tds(backend, replays.models(workers))  # meanwhile the servers start
        wait_servers(backend)
        pid = backend.participants["ps0"].pid
        assert pid is not None
        warm = run_round(backend, tds, tally, max_steps=warmup)
        creds = attest_all(backend, tds, not_before=warm.attested_at)
        before = cpu_seconds(pid), time.process_time(), machine_busy_seconds()
        load = run_round(backend, tds, tally, max_steps=steps, creds=creds)
        after = cpu_seconds(pid), time.process_time(), machine_busy_seconds()
        drain(backend, seen)
    problems = [*tally.errors, *warm.failures.values(), *load.failures.values(),
                *warm.warnings, *load.warnings]
    if problems or load.pushes != workers * steps or load.refused_pushes:
        raise AssertionError(f"P7 with {workers} workers: {load.pushes} pushes of "
                             f"{workers * steps}, {load.refused_pushes} refused; {problems[:5]}")
    steps_per_s, ps_seconds = ps_step_rate(seen, load.started_at, warmup, warmup + steps)
    windows = ps_window_rates(seen, load.started_at, warmup, warmup + steps, plan.windows)
    if steps_per_s <= 0:  # a round shorter than ps0's reporting interval (0.2 s)
        print(f"  P7 N={workers}: ps0 reported under 2 progress points in the round; its "
              "rate is the round's wall clock", file=sys.stderr)
        steps_per_s, ps_seconds = steps / load.seconds, load.seconds
    records = [r for s in load.summaries.values() for r in s.steps]
    sent, received = mean_bytes(load.summaries)

    def median_ms(part: Callable[[StepRecord], float]) -> float:
        return 1e3 * statistics.median(part(r) for r in records)

    return Point(
        workers=workers, steps=round(steps_per_s * ps_seconds), ps_seconds=ps_seconds,
        window_steps_per_s=tuple(windows), round_seconds=load.seconds,
        ps_cpu_s=after[0] - before[0], client_cpu_s=after[1] - before[1],
        machine_busy_s=after[2] - before[2],
        pushes=load.pushes, push_bytes=int(sent), pull_bytes=int(received),
        worker_push_ms=median_ms(lambda r: r.push_s),
        worker_wait_ms=median_ms(lambda r: r.wait_s),
        worker_pull_ms=median_ms(lambda r: r.pull_s),
    )


def measure_split(lab: LabConfig, replays: GradientReplays, pushes: int) -> dict[str, float]:
    """ps0's own timings per push (ms), from a ParameterServer in this process serving one
    simulated worker over the attested mesh, one push at a time (nothing else contends): the
    PS's ``timings`` (receive+decode, aggregate, update, pull serialization) ÷ pushes."""
    model = replays.model
    one = lab.replace(workers=1, steps=pushes + 10)
    with LabMesh(("ps0", "worker0")) as mesh:
        servicer = parameter_server(one, num_train=len(replays.data.train_labels),
                                    model=model, initial_weights=model.get_weights())
        ps = mesh.attest("ps0")
        server, port = serve_ps(servicer, ps, mesh.peer_check(ps, "ps0", worker_peers(1)))
        try:
            connect = channel_factory(f"127.0.0.1:{port}", mesh.attest("worker0"),
                                      mesh.verifier("worker0"))
            worker = Worker(0, replays.models(1)[0], NoBatches(), connect,  # type: ignore[arg-type]
                            max_steps=pushes)
            summary = worker.run()
        finally:
            server.stop(0).wait()
            servicer.close()
    done = servicer.timings.get("pushes", 0.0)
    if len(summary.steps) != pushes or done != pushes:
        raise AssertionError(f"the split's worker did {len(summary.steps)} steps, ps0 counted "
                             f"{done} pushes, of {pushes}")
    return {name.removesuffix("_s"): 1e3 * value / done
            for name, value in sorted(servicer.timings.items()) if name.endswith("_s")}


# ------------------------------------------------------------------------------ the curve


@dataclass
class ScalingCurve:
    """The points measured in this run, the baseline (N = 1) and the split; the report."""

    baseline: Point | None = None
    points: dict[int, Point] = field(default_factory=dict)
    split_ms: dict[str, float] = field(default_factory=dict)
    cores: int = 2

    def knee(self) -> Knee:
        assert self.baseline is not None
        return find_knee(self.baseline, list(self.points.values()), self.cores, self.split_ms)

    def table(self) -> str:
        assert self.baseline is not None
        base = self.baseline
        rows = [["N", "pushes/s", "linear", "eff.", "step ms", "linear ms", "ps0 CPU ms/push",
                 "workers' CPU ms/push", "ps0 cores", "workers' cores", "other cores",
                 "worker push/wait/pull ms"]]
        for p in [base, *sorted(self.points.values(), key=lambda p: p.workers)]:
            rows.append([
                str(p.workers), f"{p.pushes_per_s:.1f}", f"{p.workers * base.pushes_per_s:.1f}",
                f"{efficiency(p, base):.2f}", f"{p.step_ms:.1f}", f"{base.step_ms:.1f}",
                f"{p.ps_cpu_ms_per_push:.2f}", f"{p.client_cpu_ms_per_push:.2f}",
                f"{p.ps_cores:.2f}", f"{p.client_cores:.2f}",
                f"{p.other_cores:.2f}",
                f"{p.worker_push_ms:.1f}/{p.worker_wait_ms:.1f}/{p.worker_pull_ms:.1f}",
            ])
        widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
        return "\n".join("  ".join(c.rjust(w) for c, w in zip(row, widths, strict=True))
                         for row in rows)

    def summary(self) -> str:
        knee = self.knee()
        if knee.not_linear_at is None:
            where = (f"linear (efficiency >= {LINEAR}) up to N={knee.linear_until}, the "
                     "largest N measured")
        else:
            where = (f"linear (efficiency >= {LINEAR}) up to N={knee.linear_until}; below it "
                     f"from N={knee.not_linear_at}")
        where += (f"; the highest rate, {knee.peak_pushes_per_s:.0f} pushes/s, at "
                  f"N={knee.peak_at}; within {1 - NEAR_PEAK:.0%} of it from "
                  f"N={knee.saturated_from}")
        return f"{where}. Why: {knee.reason}."

    def report(self) -> str:
        return (f"P7 curve (ps0's clock, median of the round's spans; SIMULATED TDs; linear = "
                f"N x pushes/s at N=1):\n{self.table()}\n{split_text(self.split_ms)}\n"
                f"{self.summary()}")

    def to_json(self) -> dict[str, object]:
        assert self.baseline is not None
        knee = self.knee()

        def row(p: Point) -> dict[str, object]:
            return {**asdict(p), "pushes_per_s": p.pushes_per_s, "step_ms": p.step_ms,
                    "efficiency": efficiency(p, self.baseline or p),
                    "ps_cpu_ms_per_push": p.ps_cpu_ms_per_push,
                    "client_cpu_ms_per_push": p.client_cpu_ms_per_push, "ps_cores": p.ps_cores,
                    "client_cores": p.client_cores, "other_cores": p.other_cores}

        return {
            "what": "ps0's sustained pushes/s and step time with N simulated worker TDs "
                    "(ResNet-20, sync); baseline N x the N=1 rate",
            "evidence": "SIMULATED TDs", "machine": describe_machine(),
            "when": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
            "baseline": row(self.baseline),
            "points": [row(p) for p in sorted(self.points.values(), key=lambda p: p.workers)],
            "ps0_ms_per_push_in_process": self.split_ms,
            "knee": asdict(knee), "summary": self.summary(),
        }

    def plot(self, path: Path) -> None:
        """pushes/s and step time against N, each with its linear ideal, in a PNG."""
        import matplotlib

        matplotlib.use("agg")
        from matplotlib import pyplot as plt

        assert self.baseline is not None
        base = self.baseline
        points = [base, *sorted(self.points.values(), key=lambda p: p.workers)]
        n = [p.workers for p in points]
        knee = self.knee()
        fig, (rate, step) = plt.subplots(1, 2, figsize=(11, 4.2))
        rate.plot(n, [p.pushes_per_s for p in points], "o-", label="measured (ps0's clock)")
        rate.plot(n, [k * base.pushes_per_s for k in n], "--", color="grey",
                  label="linear: N x rate at N=1")
        cpu_ms = base.ps_cpu_ms_per_push
        if cpu_ms > 0:  # what ps0's CPU alone allows, one push at a time (the GIL)
            rate.plot(n, [1e3 / cpu_ms] * len(n), ":", color="tab:orange",
                      label=f"ps0 on one core: 1 / {cpu_ms:.1f} ms CPU per push")
        rate.set_ylabel("pushes / s")
        step.plot(n, [p.step_ms for p in points], "o-", label="measured (ps0's clock)")
        step.plot(n, [base.step_ms] * len(n), "--", color="grey", label="linear: step at N=1")
        if cpu_ms > 0:
            step.plot(n, [k * cpu_ms for k in n], ":", color="tab:orange",
                      label="ps0 on one core: N x CPU per push")
        step.set_ylabel("sync step time (ms)")
        for ax in (rate, step):
            ax.set_xscale("log", base=2)
            ax.set_xticks(n, [str(k) for k in n])
            ax.set_xlabel("workers N (simulated attested TDs)")
            ax.grid(True, alpha=0.3)
            if knee.not_linear_at is not None:
                ax.axvline(knee.not_linear_at, color="tab:red", alpha=0.4, linestyle=":",
                           label=f"efficiency < {LINEAR} from N={knee.not_linear_at}")
            ax.legend(fontsize=8)
        rate.set_yscale("log")
        step.set_yscale("log")
        fig.suptitle("P7: ps0 under N workers, ResNet-20, sync, RA-TLS gRPC "
                     f"(SIMULATED TDs; {describe_machine()})", fontsize=9)
        fig.tight_layout()
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=110)
        plt.close(fig)


class ScalingSession:
    """Measures the points of one run on demand, each once, and keeps the curve's files up to
    date: the N=1 baseline and the in-process split come with the first point asked for."""

    def __init__(self, plan: Plan, *, lab: LabConfig | None = None, plot: Path = PLOT,
                 curve_json: Path = CURVE, max_workers: int = max(WORKER_COUNTS)) -> None:
        self.plan = plan
        self.lab = lab or LabConfig.profile(
            "quick", depth=plan.depth, batch_size=plan.batch_size, workers=max_workers,
            aggregation="sync", eval_every=0, checkpoint_every=0, vault=False,
            workload_image="off", timeout_s=600.0,
        )
        self.plot_path, self.json_path = plot, curve_json
        self.max_workers = max_workers
        self._tmp = tempfile.TemporaryDirectory(prefix="bench-scaling-")
        self._replays: GradientReplays | None = None
        self.curve = ScalingCurve(cores=_cores())

    @property
    def replays(self) -> GradientReplays:
        if self._replays is None:
            self._replays = GradientReplays(self.lab.replace(workers=self.max_workers))
        return self._replays

    def _point(self, workers: int) -> Point:
        run_dir = Path(self._tmp.name) / f"n{workers}"
        started = time.monotonic()
        point = measure_point(self.lab, self.replays, workers, self.plan, run_dir)
        print(f"  P7 N={workers}: {point.pushes_per_s:.1f} pushes/s, step "
              f"{point.step_ms:.1f} ms, ps0 {point.ps_cpu_ms_per_push:.2f} ms CPU/push, "
              f"{point.ps_cores:.2f} cores, workers' side {point.client_cores:.2f} cores "
              f"({time.monotonic() - started:.0f} s)", file=sys.stderr, flush=True)
        return point

    def measure(self, workers: int) -> Measurement:
        """The P7-<workers>w figure: pushes/s ÷ (workers × pushes/s at N=1)."""
        if self.curve.baseline is None:
            self.curve.baseline = self._point(1)
            self.curve.split_ms = measure_split(self.lab, self.replays, self.plan.split_pushes)
        if workers not in self.curve.points:
            self.curve.points[workers] = self._point(workers)
        print(self.curve.report(), file=sys.stderr, flush=True)
        self.curve.plot(self.plot_path)
        self.json_path.write_text(json.dumps(self.curve.to_json(), indent=2) + "\n")
        point, base = self.curve.points[workers], self.curve.baseline
        return Measurement(point.pushes_per_s, workers * base.pushes_per_s)

    def close(self) -> None:
        self._tmp.cleanup()


def _cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


_SESSIONS: dict[bool, ScalingSession] = {}


def session(ctx: BenchContext) -> ScalingSession:
    """This process's session for ``ctx`` (one per quick/full: every point shares N=1)."""
    if ctx.quick not in _SESSIONS:
        _SESSIONS[ctx.quick] = ScalingSession(QUICK if ctx.quick else FULL)
    return _SESSIONS[ctx.quick]


_P7 = ("ps0's sustained pushes/s with {n} simulated attested worker TDs (ResNet-20 shapes, "
       "sync; real trust service and ps0 processes as the local backend launches them; the "
       "workers run the real Worker loop in one process, one thread each, each with its own "
       "attestation and RA-TLS channel, replaying a real gradient; their client side shares "
       "the machine with ps0), by ps0's own clock (median of 5 spans) over "
       "the timed round after a warm-up round; baseline: {n} x the same figure with 1 worker "
       "in the same run (ratio = scaling efficiency, 1.0 = linear); the curve, step times and "
       "the knee: bench/scaling.png and bench/scaling.json")


def _scaling(ctx: BenchContext, *, workers: int) -> Measurement:
    return session(ctx).measure(workers)


for _n in WORKER_COUNTS:
    benchmark(f"P7-{_n}w", what=_P7.format(n=_n), unit="pushes/s", goal="report",
              workers=_n)(_scaling)
