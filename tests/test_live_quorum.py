"""Membership that changes during a run (issue 23 item 4): with ``quorum_rule: live`` sync
aggregation takes K of the workers live now, so a worker that joins late counts from its
registration and one that leaves stops holding the step once its lease lapses; with the
default ``fixed`` rule the step waits for K of N whoever is there."""

from __future__ import annotations

import threading

import pytest

from hfl_lab import ConfigError
from hfl_lab.config import LabConfig
from tests.mesh_support import Mesh
from tests.ps_support import (  # noqa: F401 (fixtures model, mesh)
    good_update,
    header,
    resnet8,
    start_ps,
    two_worker_mesh,
)
from trainer.model import ResNet
from trainer.ps import ParameterServer
from trainer.serving import model_specs
from trainer.worker import PsConnection


def logged_messages(servicer: ParameterServer) -> list[str]:
    """What ps0 has logged so far (its event log, read to the end without waiting)."""
    return [e.data.get("message", "") for _, e in servicer.events.follow(
        0, active=lambda: True, finished=lambda: True)]


def joined(mesh: Mesh, address: str, index: int) -> PsConnection:
    conn = PsConnection(mesh.connect(f"worker{index}", address)())
    conn.register(f"worker{index}", index)
    return conn


def test_the_fixed_rule_waits_for_a_worker_that_has_not_joined(
    mesh: Mesh, model: ResNet
) -> None:
    servicer, address = start_ps(mesh, model)  # K = N = 2, fixed
    worker0 = joined(mesh, address, 0)

    reply, _, _ = worker0.push(good_update(model), header(0, "worker0"))

    assert reply.accepted and servicer.version == 0, "the step waits for worker1"
    assert servicer.aggregator.quorum == 2
    worker0.close()
    servicer.close()


def test_the_live_rule_counts_who_is_here_as_workers_join_and_leave(
    mesh: Mesh, model: ResNet
) -> None:
    servicer, address = start_ps(mesh, model, quorum_rule="live")  # K = N = 2, live
    grads = good_update(model)

    # alone at first: K is 1, worker0's step completes by itself
    worker0 = joined(mesh, address, 0)
    assert servicer.aggregator.quorum == 1
    reply, _, _ = worker0.push(grads, header(0, "worker0"))
    assert reply.accepted and servicer.version == 1

    # worker1 joins late: K is 2 again, the step waits for both
    worker1 = joined(mesh, address, 1)
    assert servicer.aggregator.quorum == 2
    worker0.push(grads, header(1, "worker0"))
    assert servicer.version == 1
    worker1.push(grads, header(1, "worker1"))
    assert servicer.version == 2

    # worker1 leaves (goes quiet): once its lease lapses the step no longer waits for it;
    # worker0's pull waits on the PS's condition, no sleep here
    servicer.sessions.lease_s = 0.3
    worker0.push(grads, header(2, "worker0"))
    pulled = worker0.pull("worker0", 3, model_specs(model))

    assert pulled.version == 3
    assert servicer.aggregator.quorum == 1
    logged = logged_messages(servicer)
    assert any("quorum K=1 of the live workers" in m for m in logged)
    worker0.close()
    worker1.close()
    servicer.close()


def test_a_worker_that_leaves_stops_counting_at_once(mesh: Mesh, model: ResNet) -> None:
    servicer, address = start_ps(mesh, model, quorum_rule="live")  # leases stay 30 s
    grads = good_update(model)
    worker0, worker1 = joined(mesh, address, 0), joined(mesh, address, 1)
    assert servicer.aggregator.quorum == 2

    worker0.push(grads, header(0, "worker0"))
    assert servicer.version == 0, "the step waits for worker1"
    worker1.leave("stopped")  # Ctrl-C on worker1's laptop

    assert servicer.aggregator.quorum == 1 and servicer.version == 1, "no lease to wait out"
    logged = logged_messages(servicer)
    assert "worker1 left at step 0 (stopped)" in logged
    worker0.close()
    worker1.close()
    servicer.close()


def test_a_minimum_of_live_workers_holds_the_run_until_they_are_here(
    mesh: Mesh, model: ResNet
) -> None:
    servicer, address = start_ps(mesh, model, quorum_rule="live", min_live_workers=2)
    grads = good_update(model)

    worker0 = joined(mesh, address, 0)
    worker0.push(grads, header(0, "worker0"))
    assert servicer.aggregator.quorum == 2 and servicer.version == 0, "held: 1 of 2 live"

    worker1 = joined(mesh, address, 1)
    worker1.push(grads, header(0, "worker1"))
    assert servicer.version == 1

    worker1.leave("left after 1 steps")
    worker0.push(grads, header(1, "worker0"))
    assert servicer.aggregator.quorum == 2 and servicer.version == 1, "held again"
    logged = logged_messages(servicer)
    assert any("holding until 1 more worker(s) join" in m for m in logged)
    worker0.close()
    worker1.close()
    servicer.close()


def test_a_leave_is_announced_before_the_hold_it_causes_whichever_thread_refits_first(
    mesh: Mesh, model: ResNet, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Another worker's pull refits the quorum every 0.5 s: here one refits right after the
    Leave call has taken worker1 out of the table and before it logged that (the classroom's
    host read "holding until 1 more" before "worker1: left" once). The Leave call is held
    there until that refit has come to ps0's membership lock."""
    servicer, address = start_ps(mesh, model, quorum_rule="live", min_live_workers=2)
    worker0, worker1 = joined(mesh, address, 0), joined(mesh, address, 1)
    membership, at_lock = servicer._membership, threading.Event()

    class Watched:
        """ps0's membership lock; says when the other refit comes to it."""

        def __enter__(self) -> None:
            if threading.current_thread() is refit:
                at_lock.set()
            membership.acquire()

        def __exit__(self, *exc: object) -> None:
            membership.release()

    refit = threading.Thread(target=servicer._fit_quorum, name="worker0-pull-refit")
    leave = servicer.sessions.leave

    def leave_then_refit_elsewhere(who: str) -> None:
        leave(who)
        refit.start()
        assert at_lock.wait(timeout=60), "the other refit never came to the membership lock"

    monkeypatch.setattr(servicer, "_membership", Watched())
    monkeypatch.setattr(servicer.sessions, "leave", leave_then_refit_elsewhere)

    worker1.leave("left after 1 steps", timeout_s=60)  # held meanwhile: not its 5 s
    refit.join(timeout=60)

    logged = logged_messages(servicer)
    left = logged.index("worker1 left at step 0 (left after 1 steps)")
    holds = [i for i, m in enumerate(logged) if "holding until 1 more worker(s) join" in m]
    assert holds and holds[-1] > left, logged
    worker0.close()
    worker1.close()
    servicer.close()


def test_a_minimum_needs_the_live_rule_and_enough_workers() -> None:
    with pytest.raises(ConfigError, match="min_live_workers=2 needs quorum_rule 'live'"):
        LabConfig(workers=2, min_live_workers=2)
    with pytest.raises(ConfigError, match="at most the 2 workers"):
        LabConfig(workers=2, quorum_rule="live", min_live_workers=3)


def test_an_unknown_quorum_rule_is_refused() -> None:
    with pytest.raises(ConfigError, match="quorum_rule"):
        LabConfig(quorum_rule="some")
