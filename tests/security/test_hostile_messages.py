"""R3 hostile messages: 1,000 malformed RPCs against a PS that is training, all refused with a
clear gRPC status, and the training run is unaffected.

The hostile peer is worker2: attested, registered, on the real mesh, and sending nothing but
malformed RPCs, interleaved with the steps of worker0 and worker1 (sync, K = 2 of N = 3). The
same run without worker2 is the clean run. Both start from the same seed, the same data order
and the same PS weights, so every step's loss must be the same in both.

Tolerance: the two runs do the same float operations in the same order (the K = 2 mean is
(a + b) / 2, and a + b == b + a exactly in IEEE arithmetic, so arrival order cannot matter), so
the losses are expected to be bit-identical. The test allows 1e-6 relative, only for kernels
whose reductions may be scheduled differently run to run; that is three orders of magnitude
below the step-to-step change of the loss, so a single malformed update that reached the model
would show.
"""

from __future__ import annotations

import collections
import itertools
import math
import random
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest

from hfl_lab.config import LabConfig
from tests.mesh_support import Mesh, start_mesh
from tests.reliability_report import record
from trainer.model import ResNet
from trainer.proto import parameter_server_pb2 as pb
from trainer.ps import ParameterServer
from trainer.ps_server import MAX_MESSAGE_BYTES
from trainer.serving import model_specs, parameter_server, schedule_for
from trainer.tensors import TensorSpec, encode_tensors
from trainer.worker import PsConnection, Worker, WorkerSummary, worker_batches

STEPS = 24
BATCH = 8
MALFORMED = 1000
MAX_STALENESS = 2
#: steps during which worker2 attacks (its last RPC lands before the last steps)
ATTACKED_STEPS = STEPS - 2
REL_TOLERANCE = 1e-6
HOSTILE = "worker2"

Chunks = list[pb.TensorChunk]


def lab(cifar_dir: Path) -> LabConfig:
    return LabConfig.profile(
        "quick", depth=8, workers=3, sync_quorum=2, batch_size=BATCH, steps=STEPS,
        aggregation="sync", learning_rate=0.1, max_staleness=MAX_STALENESS, eval_every=0,
        checkpoint_every=0, data_path=str(cifar_dir),
    )


# -- the malformed RPCs ---------------------------------------------------------------------


@dataclass(frozen=True)
class Hostile:
    """One kind of malformed RPC: how to make it, and the status it must get."""

    name: str
    expected: frozenset[grpc.StatusCode]
    make: Callable[[random.Random, int], Chunks | pb.PullRequest]
    min_version: int = 0  # only once the PS is at least this far (stale needs history)

    @classmethod
    def of(cls, name: str, make: Callable[[random.Random, int], Chunks | pb.PullRequest],
           *codes: grpc.StatusCode, min_version: int = 0) -> Hostile:
        return cls(name, frozenset(codes), make, min_version)


class Messages:
    """Malformed RPCs built from a correct update: each differs from it in one hostile way."""

    def __init__(self, specs: list[TensorSpec]) -> None:
        rng = np.random.default_rng(7)
        self.specs = specs
        self.good = {s.name: (rng.standard_normal(s.shape) * 0.01).astype(np.float32)
                     for s in specs}

    def header(self, version: int, **fields: Any) -> pb.StreamHeader:
        values: dict[str, Any] = {"kind": pb.UPDATE_KIND_GRADIENTS, "model_version": version,
                                  "worker_id": HOSTILE, "num_samples": BATCH}
        values.update(fields)
        return pb.StreamHeader(**values)

    def stream(self, tensors: dict[str, np.ndarray], version: int, **fields: Any) -> Chunks:
        return list(encode_tensors(tensors, header=self.header(version, **fields),
                                   chunk_bytes=64 << 10))

    def _pick(self, rng: random.Random) -> str:
        return rng.choice([s.name for s in self.specs if s.shape])

    def with_tensor(self, name: str, value: np.ndarray) -> dict[str, np.ndarray]:
        return {**self.good, name: value}

    def kinds(self) -> list[Hostile]:
        g = self.good

        def wrong_shape(rng: random.Random, v: int) -> Chunks:
            name = self._pick(rng)
            shape = list(g[name].shape)
            shape[rng.randrange(len(shape))] += rng.choice((-1, 1, 7))
            return self.stream(self.with_tensor(name, np.zeros([max(0, d) for d in shape],
                                                               np.float32)), v)

        def wrong_dtype(rng: random.Random, v: int) -> Chunks:
            name = self._pick(rng)
            dtype = rng.choice((np.float64, np.int32, np.int64, np.uint8))
            return self.stream(self.with_tensor(name, g[name].astype(dtype)), v)

        def poisoned(value: float) -> Callable[[random.Random, int], Chunks]:
            def make(rng: random.Random, v: int) -> Chunks:
                name = self._pick(rng)
                bad = g[name].copy()
                bad.flat[rng.randrange(bad.size)] = value
                return self.stream(self.with_tensor(name, bad), v)
            return make

        def oversized_declared(rng: random.Random, v: int) -> Chunks:
            chunks = self.stream(g, v)
            chunks[0].header.total_bytes = rng.choice((1 << 40, 1 << 62, 10 * (1 << 30)))
            return chunks

        def oversized_message(rng: random.Random, v: int) -> Chunks:
            # one gRPC message above the PS's limit: gRPC itself refuses it
            piece = pb.TensorPiece(name=self.specs[0].name, data=bytes(MAX_MESSAGE_BYTES + 1024))
            return [pb.TensorChunk(header=self.header(v), pieces=[piece])]

        def unknown_name(rng: random.Random, v: int) -> Chunks:
            name = self._pick(rng)
            renamed = {(f"{name}/evil" if k == name else k): a for k, a in g.items()}
            return self.stream(renamed, v)

        def stale(rng: random.Random, v: int) -> Chunks:
            return self.stream(g, v - MAX_STALENESS - 1 - rng.randrange(v - MAX_STALENESS))

        def future(rng: random.Random, v: int) -> Chunks:
            return self.stream(g, v + rng.randint(1, 1000))

        def truncated(rng: random.Random, v: int) -> Chunks:
            chunks = self.stream(g, v)
            how = rng.randrange(3)
            if how == 0:  # the final chunk never comes
                return chunks[: rng.randint(1, len(chunks) - 1)]
            if how == 1:  # the final chunk ends inside a tensor
                last = chunks[-1].pieces[-1]
                last.data = last.data[: rng.randrange(len(last.data))]
                return chunks
            return []  # not even a first chunk

        def impersonating(rng: random.Random, v: int) -> Chunks:
            return self.stream(g, v, worker_id=rng.choice(("worker0", "worker1")))

        def wrong_kind(rng: random.Random, v: int) -> Chunks:
            return self.stream(g, v, kind=rng.choice((pb.UPDATE_KIND_WEIGHTS, 0, 7)))

        def bad_pull(rng: random.Random, v: int) -> pb.PullRequest:
            return pb.PullRequest(worker_id=HOSTILE, min_version=v,
                                  wire_dtype=rng.choice((4, 5, 9, 10, 99)))  # type: ignore[arg-type]

        c = grpc.StatusCode
        # a larger shape or a wider dtype can also push the stream past the size of the
        # model: then it is refused up front, as oversized
        return [
            Hostile.of("wrong shape", wrong_shape, c.INVALID_ARGUMENT, c.RESOURCE_EXHAUSTED),
            Hostile.of("wrong dtype", wrong_dtype, c.INVALID_ARGUMENT, c.RESOURCE_EXHAUSTED),
            Hostile.of("NaN", poisoned(math.nan), c.INVALID_ARGUMENT),
            Hostile.of("Inf", poisoned(math.inf), c.INVALID_ARGUMENT),
            Hostile.of("-Inf", poisoned(-math.inf), c.INVALID_ARGUMENT),
            Hostile.of("oversized (declared)", oversized_declared, c.RESOURCE_EXHAUSTED),
            Hostile.of("oversized (message)", oversized_message, c.RESOURCE_EXHAUSTED),
            Hostile.of("unknown tensor name", unknown_name, c.INVALID_ARGUMENT),
            Hostile.of("stale version", stale, c.FAILED_PRECONDITION,
                       min_version=MAX_STALENESS + 1),
            Hostile.of("version from the future", future, c.FAILED_PRECONDITION),
            Hostile.of("truncated stream", truncated, c.DATA_LOSS),
            Hostile.of("claims another worker", impersonating, c.PERMISSION_DENIED),
            Hostile.of("wrong update kind", wrong_kind, c.INVALID_ARGUMENT),
            Hostile.of("pull with a bad wire dtype", bad_pull, c.INVALID_ARGUMENT),
        ]


@dataclass
class Attack:
    """worker2's malformed RPCs, paced to the training: block ``v`` is sent at step ``v``."""

    conn: PsConnection
    messages: Messages
    servicer: ParameterServer
    sent: int = 0
    results: list[tuple[str, grpc.StatusCode | None, str, frozenset[grpc.StatusCode]]] = field(
        default_factory=list)
    blocks_done: int = 0
    cond: threading.Condition = field(default_factory=threading.Condition)
    error: BaseException | None = None

    def per_block(self) -> int:
        return math.ceil(MALFORMED / ATTACKED_STEPS)

    def run(self) -> None:
        rng = random.Random(9)
        kinds = self.messages.kinds()
        rotation = itertools.cycle(range(len(kinds)))
        try:
            for block in range(ATTACKED_STEPS):
                self.servicer.aggregator.wait_for_version(block, timeout=300)
                version = self.servicer.version
                for _ in range(min(self.per_block(), MALFORMED - self.sent)):
                    kind = kinds[next(rotation)]
                    while version < kind.min_version:
                        kind = kinds[next(rotation)]
                    self.results.append(self.send(kind, rng, version))
                    self.sent += 1
                with self.cond:
                    self.blocks_done = block + 1
                    self.cond.notify_all()
        except BaseException as e:
            self.error = e
            raise
        finally:
            with self.cond:
                self.blocks_done = ATTACKED_STEPS
                self.cond.notify_all()

    def send(self, kind: Hostile, rng: random.Random,
             version: int) -> tuple[str, grpc.StatusCode | None, str, frozenset[grpc.StatusCode]]:
        message = kind.make(rng, version)
        try:
            if isinstance(message, pb.PullRequest):
                for _ in self.conn.stub.PullParameters(message, timeout=60):
                    pass
            else:
                self.conn.stub.PushUpdate(iter(message), timeout=60)
        except grpc.RpcError as e:
            return kind.name, e.code(), e.details() or "", kind.expected
        return kind.name, None, "accepted", kind.expected

    def wait_block(self, step: int) -> None:
        with self.cond:
            self.cond.wait_for(lambda: self.blocks_done > step, timeout=300)


class PacedBatches:
    """A worker's batch stream that, in the hostile run, computes step ``v`` only after
    worker2's block ``v`` has been sent: the malformed RPCs fall between real steps whatever the
    machine's speed. Waiting changes no number."""

    def __init__(self, stream: Any, attack: Attack | None) -> None:
        self.stream = stream
        self.attack = attack

    def batch(self, step: int) -> Any:
        if self.attack is not None and step < ATTACKED_STEPS:
            self.attack.wait_block(step)
        return self.stream.batch(step)


# -- the runs -------------------------------------------------------------------------------


@dataclass
class Run:
    losses: dict[str, list[tuple[int, float]]]
    weights: dict[str, np.ndarray]
    servicer: ParameterServer
    attack: Attack | None


def train(mesh: Mesh, config: LabConfig, *, hostile: bool) -> Run:
    streams = [worker_batches(config, i) for i in range(2)]
    num_train = streams[0][1]
    model = ResNet(8, seed=3, bn_momentum=config.bn_momentum)
    servicer = parameter_server(config, num_train=num_train, model=model)
    address = mesh.serve(servicer, num_workers=3)
    attack = None
    attacker: threading.Thread | None = None
    if hostile:
        conn = PsConnection(mesh.connect(HOSTILE, address)())
        conn.register(HOSTILE, 2)
        attack = Attack(conn, Messages(model_specs(model)), servicer)
        attacker = threading.Thread(target=attack.run, name="worker2-hostile")
        attacker.start()
    summaries: dict[str, WorkerSummary] = {}
    errors: list[BaseException] = []

    def work(index: int) -> None:
        worker = Worker(index, ResNet(8, seed=99 + index, bn_momentum=config.bn_momentum),
                        PacedBatches(streams[index][0], attack),  # type: ignore[arg-type]
                        mesh.connect(f"worker{index}", address),
                        schedule=schedule_for(config, num_train))
        try:
            summaries[worker.name] = worker.run()
        except BaseException as e:  # reported below
            errors.append(e)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=600)
    if attacker is not None:
        attacker.join(timeout=60)
        attack.conn.close()  # type: ignore[union-attr]
    assert not errors, errors
    assert servicer.finished.wait(60)
    servicer.close()
    losses = {name: [(r.step, r.loss) for r in s.steps] for name, s in sorted(summaries.items())}
    return Run(losses, dict(servicer.weights()), servicer, attack)


@pytest.fixture()
def mesh(tmp_path: Path) -> Iterator[Mesh]:
    m = start_mesh(tmp_path, workers=3)
    yield m
    m.close()


@pytest.mark.slow
def test_malformed_rpcs_are_refused_and_training_is_unaffected(
    mesh: Mesh, cifar_dir: Path
) -> None:
    config = lab(cifar_dir)

    clean = train(mesh, config, hostile=False)
    attacked = train(mesh, config, hostile=True)

    attack = attacked.attack
    assert attack is not None and attack.error is None, attack and attack.error
    results = attack.results
    wrong = [(name, got, detail) for name, got, detail, expected in results
             if got not in expected or not detail.strip()]
    by_kind: dict[str, collections.Counter[str]] = collections.defaultdict(collections.Counter)
    for name, got, _, _ in results:
        by_kind[name][got.name if got else "OK"] += 1
    # every step of both workers, with the same loss
    assert clean.losses.keys() == attacked.losses.keys() == {"worker0", "worker1"}
    differences = []
    for name, steps in clean.losses.items():
        other = attacked.losses[name]
        assert [s for s, _ in steps] == [s for s, _ in other] == list(range(STEPS)), name
        differences += [abs(a - b) / max(abs(a), 1e-12)
                        for (_, a), (_, b) in zip(steps, other, strict=True)]
    loss_diff = max(differences)
    weight_diff = max(float(np.max(np.abs(clean.weights[k] - attacked.weights[k])))
                      for k in clean.weights)
    losses = [round(float(np.mean([clean.losses[w][s][1] for w in clean.losses])), 4)
              for s in range(STEPS)]
    counters = attacked.servicer.aggregator.counters()

    record("R3", "malformed RPCs during training", tried=len(results),
           held=len(results) - len(wrong), lost=0,
           kinds={k: dict(v) for k, v in by_kind.items()},
           expected={k.name: sorted(c.name for c in k.expected)
                     for k in attack.messages.kinds()},
           steps=STEPS, workers="worker0, worker1 training (sync, K=2 of 3); worker2 hostile",
           loss_max_rel_difference=loss_diff, weights_max_abs_difference=weight_diff,
           loss_tolerance_rel=REL_TOLERANCE, mean_loss_by_step=losses,
           ps_refusals=dict(attacked.servicer.refusals),
           aggregator_rejected=counters.rejected, aggregator_applied=counters.applied)

    assert len(results) == MALFORMED
    assert not wrong, wrong[:5]
    assert loss_diff <= REL_TOLERANCE, loss_diff
    assert weight_diff <= REL_TOLERANCE, weight_diff
    # nothing from worker2 reached the aggregator: exactly K contributions per step
    assert counters.applied == 2 * STEPS and counters.updates == STEPS
