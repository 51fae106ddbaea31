"""X-join: 20 joiners against one hosted run (issue 23, "must show"): how fast they join, the
step time with all of them, and what happens when 5 leave at once.

One host: ``HostedRun`` starts the real trust service and ps0 processes (sync, ``quorum_rule:
live``, ResNet-20) on a loopback address and issues one join link per slot. 20 joiners in this
process (:mod:`bench.simulated_joiners`) each take their link and do what ``hfl-lab join`` does:
verify the host's trust service against the link, enroll, measure their worker TD, attest,
register with ps0 over RA-TLS; then they run the real Worker loop replaying a real ResNet-20
gradient of their own shard. Every TD here is SIMULATED (lab-local attestation keys).

The run, in order:

1. 3 joiners join one at a time (their median time is the baseline), then the other 17 at
   once; a joiner that registered holds its first step at a start gate, so the joins meet a
   PS that does not train;
2. the gate opens: ``warmup_steps``, then ``timed_steps`` with every joiner (the step time by
   ps0's own clock, median of its progress spans);
3. 5 joiners leave at once after the same step (their Worker loop returns, as a joiner's does
   on Ctrl-C); the other 15 go on. ps0 must not stall: the figure is the time from the leave
   until the first step at the new quorum is done, then the step time with the 15.

Figures (``python -m bench --only X-join`` writes all four):

- ``X-join``: joins per second of the 17 that joined at once (first start to last
  registration; a join is verify host + enroll + attest + register), baseline 1 ÷ the median
  join time of the 3 that joined one at a time: the ratio is what joining together gains;
- ``X-join-step``: the sync step time with 20 joined workers (s);
- ``X-join-resume``: seconds from the 5 leaving until ps0 completed its first step without them;
- ``X-join-after``: the step time with the 15 left, baseline the step time with 20.

The joiners' client side (TLS, gRPC, the Worker loop) runs on the same cores as the host.
"""

from __future__ import annotations

import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from bench.registry import BenchContext, Measurement, benchmark
from bench.simulated_joiners import GatedReplay, JoinTimes, SimulatedJoiner, join_host, rpc_failure
from bench.simulated_workers import GradientReplays, ps_window_rates
from hfl_lab.config import LabConfig
from hfl_lab.events import LabEvent
from hfl_lab.lab.workshop import HostedRun

__all__ = ["FULL", "QUICK", "Plan", "XJoinResult", "run_xjoin"]


@dataclass(frozen=True)
class Plan:
    """The run's size: ``joiners`` join, ``leavers`` of them leave after the timed steps."""

    joiners: int = 20
    leavers: int = 5
    alone: int = 3  # the first joiners join one at a time (the baseline), the others at once
    depth: int = 20
    batch_size: int = 32  # of the replayed gradients only
    warmup_steps: int = 5
    timed_steps: int = 40
    after_steps: int = 20
    windows: int = 5
    host: str = "127.0.0.42"
    timeout_s: float = 300.0

    @property
    def leave_step(self) -> int:
        """The leavers' last step: they push steps 0 .. leave_step - 1."""
        return self.warmup_steps + self.timed_steps

    @property
    def last_step(self) -> int:
        return self.leave_step + self.after_steps


FULL = Plan()
QUICK = Plan(alone=2, warmup_steps=2, timed_steps=12, after_steps=8, windows=3)


@dataclass
class XJoinResult:
    """What one X-join run measured, and what went wrong in it."""

    plan: Plan
    joiners: dict[str, SimulatedJoiner] = field(default_factory=dict)
    solo: list[JoinTimes] = field(default_factory=list)  # the joiners that joined one by one
    burst_s: float = 0.0  # the simultaneous joiners: first start to last registration
    attested: set[str] = field(default_factory=set)  # slots the trust service accepted
    step_windows: list[float] = field(default_factory=list)  # steps/s, all joined
    after_windows: list[float] = field(default_factory=list)  # steps/s, after the leave
    left_at: float = 0.0
    resumed_at: float = 0.0
    quorum_log: list[tuple[float, str]] = field(default_factory=list)  # ps0's "quorum K=" lines
    final_version: int = 0  # the highest step ps0 reported
    failures: dict[str, str] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)

    @property
    def burst(self) -> list[JoinTimes]:
        return [j.times for j in self.joiners.values() if j.index >= self.plan.alone]

    @property
    def joins_per_s(self) -> float:
        return len(self.burst) / self.burst_s if self.burst_s > 0 else 0.0

    @property
    def solo_join_s(self) -> float:
        """The median join time of the joiners that joined one at a time."""
        times = [t.total for t in self.solo if t.total > 0]
        return statistics.median(times) if times else 0.0

    @property
    def solo_joins_per_s(self) -> float:
        return 1.0 / self.solo_join_s if self.solo_join_s > 0 else 0.0

    @property
    def step_s(self) -> float:
        return 1.0 / statistics.median(self.step_windows) if self.step_windows else 0.0

    @property
    def after_step_s(self) -> float:
        return 1.0 / statistics.median(self.after_windows) if self.after_windows else 0.0

    @property
    def resume_s(self) -> float:
        return self.resumed_at - self.left_at if self.resumed_at and self.left_at else 0.0

    @property
    def registered(self) -> int:
        return sum(1 for j in self.joiners.values() if j.times.registered)

    def stage_medians(self) -> dict[str, float]:
        """Median seconds of each join stage over the simultaneous joiners."""
        stages = [t.stages() for t in self.burst if t.registered]
        if not stages:
            return {}
        return {name: statistics.median(s[name] for s in stages) for name in stages[0]}

    def problems(self) -> list[str]:
        """Everything that makes the figures meaningless: a joiner that failed, was not
        attested or did not register, a step that never came."""
        plan = self.plan
        found = [f"{slot}: {why}" for slot, why in sorted(self.failures.items())]
        missing = sorted({f"worker{i}" for i in range(plan.joiners)} - self.attested)
        if missing:
            found.append(f"not attested by the trust service: {', '.join(missing)}")
        if self.registered != plan.joiners:
            found.append(f"{self.registered} of {plan.joiners} joiners registered with ps0")
        if not self.resumed_at:
            found.append(f"no step after the {plan.leavers} left (ps0 reached step "
                         f"{self.final_version} of {plan.last_step})")
        return found

    def report(self) -> str:
        plan, stages = self.plan, self.stage_medians()
        quorum = "; ".join(f"+{t - self.left_at:.1f} s {line}" if self.left_at and
                           t >= self.left_at else line for t, line in self.quorum_log[-4:])
        return (
            f"X-join (SIMULATED TDs): {self.registered} of {plan.joiners} joiners registered, "
            f"{len(self.attested)} attested; {len(self.solo)} one at a time in "
            f"{self.solo_join_s:.2f} s each (median), {len(self.burst)} at once in "
            f"{self.burst_s:.2f} s = "
            f"{self.joins_per_s:.2f} joins/s (median stages: "
            + ", ".join(f"{k} {1e3 * v:.0f} ms" for k, v in stages.items())
            + f"); step with {plan.joiners}: {1e3 * self.step_s:.1f} ms; {plan.leavers} left "
            f"after step {plan.leave_step - 1}, steps resumed {self.resume_s:.2f} s later; step "
            f"with {plan.joiners - plan.leavers}: {1e3 * self.after_step_s:.1f} ms; ps0's "
            f"quorum: {quorum}")


class _Collector:
    """The host's events, read on a thread of their own while the joiners run."""

    def __init__(self, run: HostedRun) -> None:
        self.run = run
        self.events: list[LabEvent] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._read, name="xjoin-host-events",
                                        daemon=True)
        self._thread.start()

    def _read(self) -> None:
        while not self._stop.is_set():
            for event, _ in self.run.events(idle_timeout_s=0.2):
                self.events.append(event)
                if self._stop.is_set():
                    break
            self._stop.wait(0.05)

    def stop(self) -> list[LabEvent]:
        self._stop.set()
        self._thread.join(timeout=10)
        return self.events


def run_xjoin(lab: LabConfig, plan: Plan, run_dir: Path,
              say: Callable[[str], None] = lambda line: None) -> XJoinResult:
    """One X-join run (see the module doc) on ``lab``'s data, model and aggregation; ``say``
    gets a line at each stage."""
    config = lab.replace(workers=plan.joiners, steps=plan.last_step + 50, run_dir=str(run_dir))
    replays = GradientReplays(config).models(plan.joiners)
    result = XJoinResult(plan)
    gate = threading.Event()
    lock = threading.Lock()
    registered = threading.Condition(lock)
    leavers = range(plan.joiners - plan.leavers, plan.joiners)

    def on_registered() -> None:
        with registered:
            registered.notify_all()

    def warn(event: LabEvent) -> None:
        if event.kind == "log" and event.data.get("level") != "info":
            with lock:
                result.warnings.append(f"{event.source}: {event.data.get('message')}")

    def life(index: int, link: str) -> None:
        slot = f"worker{index}"
        try:
            joiner = join_host(link, run_dir / "joiners" / slot, timeout_s=plan.timeout_s)
        except Exception as e:  # every failure is reported by problems()
            with registered:
                result.failures[slot] = f"join: {rpc_failure(e)}"
                registered.notify_all()
            return
        with lock:
            result.joiners[slot] = joiner
        steps = plan.leave_step if index in leavers else plan.last_step
        try:
            joiner.train(GatedReplay(replays[index], gate, plan.timeout_s), max_steps=steps,
                         on_registered=on_registered, emit=warn)
        except Exception as e:
            with registered:
                result.failures[slot] = f"train: {rpc_failure(e)}"
                registered.notify_all()

    def wait_registered(count: int) -> None:
        deadline = time.monotonic() + plan.timeout_s
        with registered:
            while (sum(1 for j in result.joiners.values() if j.times.registered)
                   + len(result.failures) < count):
                left = deadline - time.monotonic()
                if left <= 0:
                    return
                registered.wait(timeout=left)

    opened = time.time()
    with HostedRun(config, address=plan.host, slots=plan.joiners) as run:
        links = [link.encode() for link in run.start(timeout_s=plan.timeout_s)]
        say(f"host ready at {run.backend.trust_address}: {len(links)} join links")
        collector = _Collector(run)
        threads = [threading.Thread(target=life, args=(i, link), name=f"joiner-{i}",
                                    daemon=True) for i, link in enumerate(links)]
        try:
            for count, t in enumerate(threads[:plan.alone], start=1):
                t.start()
                wait_registered(count)
            say(f"{plan.alone} joined one at a time; the other {plan.joiners - plan.alone} "
                "join at once")
            for t in threads[plan.alone:]:
                t.start()
            wait_registered(plan.joiners)
            say(f"{sum(1 for j in result.joiners.values() if j.times.registered)} joined, "
                f"{len(result.failures)} failed; training, {plan.leavers} leave after step "
                f"{plan.leave_step - 1}")
            opened = time.time()
            gate.set()
            deadline = time.monotonic() + plan.timeout_s
            for t in threads:
                t.join(timeout=max(0.1, deadline - time.monotonic()))
            result.failures.update({t.name.replace("joiner-", "worker"): "still running"
                                    for t in threads if t.is_alive()})
        finally:
            gate.set()
            time.sleep(0.5)  # ps0's last progress report (every 0.2 s at most)
            events = collector.stop()
    _measure(result, events, opened, leavers)
    return result


def _measure(result: XJoinResult, events: Sequence[LabEvent], opened: float,
             leavers: range) -> None:
    plan = result.plan
    result.solo = [j.times for j in result.joiners.values() if j.index < plan.alone]
    starts = [t.started for t in result.burst]
    ends = [t.registered for t in result.burst if t.registered]
    if starts and ends:
        result.burst_s = max(ends) - min(starts)
    for event in events:
        data = event.data
        if (event.kind == "attestation" and event.source == "trust" and data.get("accepted")
                and str(data.get("subject", "")).startswith("worker")):
            result.attested.add(str(data["subject"]))
        elif event.kind == "log" and event.source == "ps0":
            message = str(data.get("message", ""))
            if message.startswith("quorum K="):
                result.quorum_log.append((event.time, message))
        elif event.kind == "progress" and event.source == "ps0":
            result.final_version = max(result.final_version, int(data.get("done", 0)))
    gone = [j for j in result.joiners.values() if j.index in leavers]
    stayers = [j for j in result.joiners.values() if j.index not in leavers]
    result.step_windows = (
        ps_window_rates(events, opened, plan.warmup_steps, plan.leave_step, plan.windows)
        or _pushed_rates(stayers, plan.warmup_steps, plan.leave_step))
    if gone and all(j.left_at for j in gone):
        result.left_at = max(j.left_at for j in gone)
    # a stayer pushes step leave_step + 1 once ps0 completed step leave_step without the
    # leavers (their last push was step leave_step - 1)
    after = [t for j in stayers for t, step in j.steps if step == plan.leave_step + 1]
    if after and result.left_at:
        result.resumed_at = min(after)
        result.after_windows = (
            ps_window_rates(events, result.left_at, plan.leave_step + 1, plan.last_step,
                            plan.windows)
            or _pushed_rates(stayers, plan.leave_step + 1, plan.last_step - 1))


def _pushed_rates(joiners: Sequence[SimulatedJoiner], first: int, last: int) -> list[float]:
    """Steps per second from ``first`` to ``last`` by the times the joiners pushed them (one
    rate per joiner): where ps0 reported too few progress points (every 0.2 s at most) over a
    short span."""
    rates = []
    for joiner in joiners:
        times = {step: t for t, step in joiner.steps}
        if first in times and last in times and times[last] > times[first]:
            rates.append((last - first) / (times[last] - times[first]))
    return rates


# ------------------------------------------------------------------------------ figures


class _Session:
    """One X-join run per quick/full, shared by its four figures."""

    def __init__(self, plan: Plan) -> None:
        self.plan = plan
        self._result: XJoinResult | None = None

    def result(self) -> XJoinResult:
        if self._result is None:
            plan = self.plan
            lab = LabConfig.profile(
                "quick", depth=plan.depth, batch_size=plan.batch_size, workers=plan.joiners,
                aggregation="sync", eval_every=0, checkpoint_every=0, vault=False,
                workload_image="off", timeout_s=900.0)
            started = time.monotonic()
            with tempfile.TemporaryDirectory(prefix="bench-xjoin-") as tmp:
                result = run_xjoin(lab, plan, Path(tmp), say=lambda line: print(
                    f"  X-join: {line}", file=sys.stderr, flush=True))
            print(f"  {result.report()} ({time.monotonic() - started:.0f} s)", file=sys.stderr,
                  flush=True)
            problems = result.problems()
            if problems:
                raise AssertionError(f"X-join: {'; '.join(problems[:6])}")
            self._result = result
        return self._result


_SESSIONS: dict[bool, _Session] = {}


def _result(ctx: BenchContext) -> XJoinResult:
    if ctx.quick not in _SESSIONS:
        _SESSIONS[ctx.quick] = _Session(QUICK if ctx.quick else FULL)
    return _SESSIONS[ctx.quick].result()


_HOW = ("one hosted run (HostedRun: real trust service and ps0 processes, sync, quorum_rule "
        "live, ResNet-20); joiners in the bench process, each doing what hfl-lab join does "
        "(verify the host against its link, enroll, measure its worker TD, attest, register "
        "with ps0 over RA-TLS) and running the real Worker loop replaying a real gradient; "
        "SIMULATED TDs; the joiners share the host's cores")


@benchmark("X-join", unit="joins/s", goal="report", what=(
    f"joins per second of {FULL.joiners - FULL.alone} joiners joining at once (verify host + "
    "enroll + attest + register; first start to last registration), after "
    f"{FULL.alone} joined one at a time; baseline 1 / the median join time of those "
    f"{FULL.alone} (ratio: the gain of joining together); {_HOW}"))
def joins_per_second(ctx: BenchContext) -> Measurement:
    result = _result(ctx)
    return Measurement(result.joins_per_s, result.solo_joins_per_s)


@benchmark("X-join-step", unit="s", goal="report", judged_by="value", what=(
    f"sync step time with {FULL.joiners} joined workers, by ps0's clock (median of its "
    f"progress spans over the timed steps); {_HOW}"))
def step_with_all(ctx: BenchContext) -> Measurement:
    return Measurement(_result(ctx).step_s)


@benchmark("X-join-resume", unit="s", goal="report", judged_by="value", what=(
    f"seconds from {FULL.leavers} of {FULL.joiners} joined workers leaving at once (their "
    "Worker loops return after the same step) until ps0 completed its first step without "
    f"them (a remaining worker pushed the step after); {_HOW}"))
def resume_after_leave(ctx: BenchContext) -> Measurement:
    return Measurement(_result(ctx).resume_s)


@benchmark("X-join-after", unit="s", goal="report", what=(
    f"sync step time with the {FULL.joiners - FULL.leavers} workers left after "
    f"{FULL.leavers} left, by ps0's clock; baseline the step time with {FULL.joiners} in the "
    f"same run; {_HOW}"))
def step_after_leave(ctx: BenchContext) -> Measurement:
    result = _result(ctx)
    return Measurement(result.after_step_s, result.step_s)
