"""R7 load: 32 workers against one PS for 100 synchronous steps: no errors, no leaked file
descriptors or threads in ps0, and ps0's step throughput.

Every TD in this test is a SIMULATED TD (lab-local attestation keys; never secure). ps0 and the
trust service are the real processes, launched by the local backend exactly as in a lab run
(``python -m trainer ps --config ... --exit-when-done`` and ``python -m trainer trust``).
The 32 workers are simulated worker TDs in this test process, one thread each (32 processes
that each import TensorFlow would not fit on 2 cores): each has its own evidence for its role
``workerN``, attests to the trust service for its own mesh certificate, opens its own
mutual-TLS channel to ps0 (checking ps0's evidence first) and runs the real
``trainer.worker.Worker`` loop: register, pull the parameters, push a real ResNet-8 gradient
(see ``bench.simulated_workers``), in sync mode, where every step waits for all 32 pushes.

ps0 checkpoints every 25 steps into the run's plain checkpoint folder (``vault=False``: the
LUKS volume adds nothing to this case but set-up time). The run has three rounds, each with
fresh attestations (as a restarted worker re-attests), each ending with every worker
disconnected:

1. warm-up, ``WARMUP`` steps: fills ps0's RPC thread pool, which keeps idle threads; ps0's file
   descriptors and threads after it are the baseline ("before");
2. the load, ``STEPS`` steps: the throughput is measured here; then ps0's figures are measured
   again ("after"): file descriptors against the level ps0 had when it was ready, threads
   against the baseline (see the slacks below);
3. the end, ``TAIL`` steps: the run reaches its final step, ps0 says ``done`` and, started with
   ``--exit-when-done`` as in every lab run, exits 0 (so "after" cannot be measured later).

The PS's throughput is taken from ps0's own clock (its progress reports); ps0 shares the two
cores with the 32 workers' client side in this process, so it is a figure of this machine.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from bench.simulated_workers import (
    FINISHED,
    RpcTally,
    cpu_seconds,
    drain,
    launch_servers,
    mean_bytes,
    ps_step_rate,
    replayed_models,
    run_round,
    settled,
    wait_servers,
    worker_tds,
)
from hfl_lab.backends.local import LocalBackend
from hfl_lab.events import LabEvent
from tests.local_support import quick_config
from tests.reliability.fault_support import count_fds, count_threads_named
from tests.reliability_report import record
from trainer.ps_server import RPC_THREAD_NAME
from trainer.serving import rpc_pool_size

pytestmark = pytest.mark.slow

WORKERS = 32
WARMUP = 10
STEPS = 100
TAIL = 3
#: Growth of ps0's open file descriptors that is not a leak. Every worker connection is one
#: socket, closed when the worker disconnects, so once the workers of a round are gone ps0 is
#: back at its level when it was ready (no warm-up baseline needed); 2 spare allow for a
#: connection of a client's certificate fetch (``attested_channel`` checks ps0's evidence on a
#: connection of its own) that is not torn down yet. A leak of one descriptor per connection or
#: per session shows 32 more after each round.
FD_SLACK = 2
#: ps0's RPC pool (ThreadPoolExecutor, ``rpc_pool_size``) makes threads on demand and keeps them
#: idle, so its size is the highest number of calls that were ever in flight at once: with 32
#: workers each holding a waiting pull and pushing, reporting and watching meanwhile, that peak
#: depends on how the machine schedules them (one clean-clone run grew it by 13 threads during the
#: load, after the warm-up had grown it by 52), and a growth of the total is no sign of a leak.
#: The pool's threads carry the kernel names ``ps-rpc_<n>``: the pool is held to its bound, and
#: every *other* thread of ps0 must be back at its level after the warm-up (a thread that a
#: handler starts and leaves running counts as other). The slack is for a gRPC core thread
#: (timer, executor) made or ended while the round winds down. A leak of one thread per
#: connection, session or step shows 32 or 100 more.
THREAD_SLACK = 2


def other_threads(pid: int) -> int:
    """ps0's threads that are not its RPC pool's."""
    return count_threads_named(pid, RPC_THREAD_NAME)[1]


def test_32_sync_workers_for_100_steps_no_errors_no_leaks(tmp_path: Path,
                                                           cifar_dir: Path) -> None:
    # Arrange: the real trust service and ps0, and 32 simulated worker TDs in this process
    total = WARMUP + STEPS + TAIL
    # no image pull (quick_config's default): this test launches the two servers itself,
    # without start()'s registration of the image's layer key
    config = quick_config(tmp_path, cifar_dir, workers=WORKERS, steps=total,
                          aggregation="sync", eval_every=0, checkpoint_every=25, vault=False)
    seen: list[LabEvent] = []
    tally = RpcTally()
    started = time.monotonic()
    with LocalBackend(config) as backend:
        # start() would also launch the 32 worker processes: only the two servers here
        launch_servers(backend)
        tds = worker_tds(backend, replayed_models(config))  # meanwhile they start
        wait_servers(backend, 180)
        ps = backend.participants["ps0"]
        pid = ps.pid
        assert pid is not None
        fds_ready = settled(lambda: count_fds(pid))
        threads_ready = settled(lambda: other_threads(pid))

        # Act: warm-up, then the load, each followed by every worker disconnecting
        warmup = run_round(backend, tds, tally, max_steps=WARMUP)
        fds_before = settled(lambda: count_fds(pid), at_most=fds_ready + FD_SLACK)
        threads_before = settled(lambda: other_threads(pid))
        cpu_before = cpu_seconds(pid)
        load = run_round(backend, tds, tally, max_steps=STEPS, not_before=warmup.attested_at)
        ps_cpu_s = cpu_seconds(pid) - cpu_before
        fds_after = settled(lambda: count_fds(pid), at_most=fds_ready + FD_SLACK)
        threads_after = settled(lambda: other_threads(pid),
                                at_most=threads_before + THREAD_SLACK)
        pool_after, _ = count_threads_named(pid, RPC_THREAD_NAME)
        alive_after_load = ps.returncode is None
        drain(backend, seen)
        end = run_round(backend, tds, tally, max_steps=None, not_before=load.attested_at)
        assert ps.process is not None
        exit_code = ps.process.wait(timeout=120)
        drain(backend, seen)

    # Assert
    seconds = time.monotonic() - started
    done = [e for e in seen if e.kind == "lifecycle" and e.source == "ps0"
            and e.data.get("state") == "done"]
    final = done[0].data if done else {}
    # ps0's own clock: its progress reports during the load round
    steps_per_s, ps_seconds = ps_step_rate(seen, load.started_at, WARMUP, WARMUP + STEPS)
    wall_rate = STEPS / load.seconds
    rounds = (warmup, load, end)
    failures = {k: v for r in rounds for k, v in r.failures.items()}
    warnings = [w for r in rounds for w in r.warnings]
    refusals = {k: v for k, v in dict(final.get("refusals") or {}).items()
                if k != FINISHED.name}
    dropped = {k: final.get(k) for k in ("late_dropped", "stale_refused", "rejected")}
    # ps0's own pairwise check of each worker certificate (one verdict per certificate)
    verified = [e.data for e in seen if e.kind == "attestation" and e.source == "ps0"
                and str(e.data.get("subject", "")).startswith("worker")]
    sent, received = mean_bytes(load.summaries)
    errors = (len(tally.errors) + len(failures) + len(warnings) + sum(refusals.values())
              + sum(int(v or 0) for v in dropped.values()))
    leaked = (max(fds_before, fds_after) > fds_ready + FD_SLACK
              or threads_after > threads_before + THREAD_SLACK
              or pool_after > rpc_pool_size(WORKERS))
    completed = final.get("version") == total and exit_code == 0 and alive_after_load
    entry = record(
        "R7", "sync_32_workers_100_steps", tried=1,
        held=int(completed and errors == 0 and not leaked), lost=0,
        workers=WORKERS, steps=STEPS, mode="sync", model=f"resnet{config.depth}",
        errors=errors, rpc_errors=len(tally.errors), worker_failures=len(failures),
        ps_refusals=sum(refusals.values()), **dropped,
        workers_verified_by_ps=sum(1 for v in verified if v.get("accepted")),
        pushes=load.pushes, pushes_refused=load.refused_pushes,
        fds_ready=fds_ready, fds_before=fds_before, fds_after=fds_after,
        threads_ready=threads_ready, threads_before=threads_before, threads_after=threads_after,
        rpc_pool_after=pool_after, rpc_pool_bound=rpc_pool_size(WORKERS),
        fd_slack=FD_SLACK, thread_slack=THREAD_SLACK,
        steps_per_s=round(steps_per_s, 2), pushes_per_s=round(steps_per_s * WORKERS, 1),
        ps_seconds=round(ps_seconds, 2), round_seconds=round(load.seconds, 2),
        ps_cpu_seconds=round(ps_cpu_s, 2),
        wall_steps_per_s=round(wall_rate, 2), push_bytes=int(sent), pull_bytes=int(received),
        final_step=final.get("version"), ps_exit_code=exit_code,
        test_seconds=round(seconds, 1), evidence="SIMULATED TDs",
    )
    print(f"[R7] {entry}")

    assert not failures, failures
    assert not tally.errors, tally.errors[:10]
    assert not warnings, warnings[:10]
    assert not refusals, final.get("refusals")
    assert dropped == {"late_dropped": 0, "stale_refused": 0, "rejected": 0}
    assert load.pushes == WORKERS * STEPS
    assert load.refused_pushes == 0
    assert tally.count("Register") == 3 * WORKERS
    assert tally.count("PushUpdate") == WORKERS * total
    assert len(verified) == 3 * WORKERS and all(v["accepted"] for v in verified)
    assert {v["subject"] for v in verified} == {td.role for td in tds}
    assert alive_after_load, "ps0 died during the load"
    assert done, "ps0 never said done"
    assert final["version"] == total
    assert exit_code == 0
    assert max(fds_before, fds_after) <= fds_ready + FD_SLACK, (fds_ready, fds_before, fds_after)
    # the pool's threads are named (or every thread would count as "other")
    assert 0 < pool_after <= rpc_pool_size(WORKERS), pool_after
    assert threads_after <= threads_before + THREAD_SLACK, (
        threads_ready, threads_before, threads_after)
    assert steps_per_s > 0
