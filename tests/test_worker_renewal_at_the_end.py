"""A worker whose mesh certificate is renewed at the run's last step still ends cleanly.

Found in a clean-clone run (``test_participants_re_attest_and_train_past_their_first_
certificates_expiry`` took 140 s instead of 19, and notebook 07's honest stand-in joiner was
still running when the notebook stopped it): a renewal seen after the last push made the worker
drop its pull of the final model and connect anew, but ps0 (``--exit-when-done``) had already
sent that final model to every worker and exited, so the new connection was refused until the
worker's reconnect timeout ran out and it failed. Here the renewal comes exactly then, and ps0
is stopped exactly then: deterministic, no timing.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from hfl_lab.config import LabConfig
from tests.mesh_support import Mesh, mesh_fixture
from trainer.data import BatchStream
from trainer.model import ResNet
from trainer.ps import ParameterServer
from trainer.serving import parameter_server, schedule_for
from trainer.worker import Worker, worker_batches

STEPS = 3


@pytest.fixture()
def mesh(tmp_path: Path) -> Iterator[Mesh]:
    yield from mesh_fixture(tmp_path, workers=1)


def _served_run(mesh: Mesh, cifar_dir: Path) -> tuple[
        LabConfig, BatchStream, int, ParameterServer, str, grpc.Server]:
    """A 3-step sync run of one worker: its config, the worker's batches and the training
    set's size, and ps0 serving it on the mesh (its address and server)."""
    config = LabConfig.profile("quick", depth=8, workers=1, batch_size=8, steps=STEPS,
                               aggregation="sync", eval_every=0, checkpoint_every=0,
                               data_path=str(cifar_dir))
    stream, num_train = worker_batches(config, 0)
    servicer = parameter_server(config, num_train=num_train, model=ResNet(8, seed=3))
    address = mesh.serve(servicer, num_workers=1)
    return config, stream, num_train, servicer, address, mesh.servers[-1]


def test_a_renewal_after_the_last_push_does_not_outlive_ps0(mesh: Mesh, cifar_dir: Path) -> None:
    # Arrange: ps0 for a 3-step sync run of one worker; like `trainer ps --exit-when-done`, it
    # stops serving once training finished and every worker was sent the final model
    config, stream, num_train, servicer, address, server = _served_run(mesh, cifar_dir)
    gone = threading.Event()

    def exit_when_done() -> None:
        if servicer.finished.wait(120) and servicer.wait_workers_released(120):
            server.stop(1.0).wait()  # in-flight calls get their grace, as at ps0's exit
            gone.set()

    stopper = threading.Thread(target=exit_when_done, daemon=True)
    stopper.start()

    def generation() -> int:
        """The worker's certificate generation: renewed once ps0 is gone after the last step."""
        if servicer.version < STEPS:
            return 0
        assert gone.wait(120), "ps0 did not stop after the run finished"
        return 1

    worker = Worker(0, ResNet(8, seed=99), stream, mesh.connect("worker0", address),
                    schedule=schedule_for(config, num_train), generation=generation,
                    reconnect_timeout_s=3.0)

    # Act
    summary = worker.run()

    # Assert: the final model's pull, read on the old connection, said the run is over
    stopper.join(timeout=10)
    assert gone.is_set()
    assert summary.finished
    assert len(summary.steps) == STEPS
    assert summary.final_version == STEPS
    assert summary.reconnects == 0


def test_ps0_exits_only_after_the_final_model_was_sent(
    mesh: Mesh, cifar_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """ps0 (--exit-when-done) stops serving, with a 1 s grace, once every worker was told the
    run is over. The final model's stream is held here until ps0 has checked that once: the
    worker must not count as told yet (counted when its stream started, a stream slower than
    the grace was cut, and the worker found ps0 gone and failed)."""
    # Arrange: a 3-step sync run of one worker, and ps0's exit as in the test above
    config, stream, num_train, servicer, address, server = _served_run(mesh, cifar_dir)
    changed = threading.Condition()
    checks: list[bool] = []  # ps0's "every worker told?" checks, once the final stream waits
    holding = threading.Event()
    gone = threading.Event()
    all_released = servicer.sessions.all_released

    def checked() -> bool:
        told = all_released()
        with changed:
            if holding.is_set():
                checks.append(told)
            changed.notify_all()
        return told

    def exit_when_done() -> None:
        if servicer.finished.wait(120) and servicer.wait_workers_released(120):
            server.stop(1.0).wait()
        with changed:
            gone.set()
            changed.notify_all()

    chunks_for = servicer._chunks

    def held_final_stream(wire: int, flat: bool = False) -> tuple[int, Any]:
        version, chunks = chunks_for(wire, flat)
        if version < STEPS:
            return version, chunks

        def held() -> Iterator[Any]:
            with changed:
                holding.set()
                assert changed.wait_for(lambda: checks or gone.is_set(), 120)
            yield from chunks
        return version, held()

    monkeypatch.setattr(servicer.sessions, "all_released", checked)
    monkeypatch.setattr(servicer, "_chunks", held_final_stream)
    stopper = threading.Thread(target=exit_when_done, daemon=True)
    stopper.start()
    worker = Worker(0, ResNet(8, seed=99), stream, mesh.connect("worker0", address),
                    schedule=schedule_for(config, num_train), reconnect_timeout_s=3.0)

    # Act
    summary = worker.run()

    # Assert: ps0 waited for the final stream, which the worker read to its end
    stopper.join(timeout=120)
    assert checks and checks[0] is False, "ps0 counted the worker as told before it was sent"
    assert gone.is_set()
    assert summary.finished and summary.final_version == STEPS
    assert summary.reconnects == 0
