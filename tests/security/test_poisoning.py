"""R8, an attested worker poisons the model (issue 18, item 5).

The attacker is worker2: attested, registered, on the real mesh, pushing well-formed streams
that the NaN/Inf check lets through. Each case drives the real ParameterServer over gRPC with
real ResNet-8 tensors:

(a) FedAvg weights: a worker claiming 2^64-1 samples must not outweigh the others; the PS
    weighs by its own figures (the shard sizes it derives from the run's configuration).
(b) a finite but huge gradient (1e38 everywhere) in sync and in async mode: its L2 norm is
    clipped to ``max_update_norm``, so one step moves the weights by a bounded amount.
(c) an update that is finite but makes the new global weights overflow: refused, the old
    weights and optimizer state are kept, nothing non-finite is committed, checkpointed or
    served, and the next honest step goes through.
(d) with ``aggregation_rule`` median or trimmed_mean, one attacker among three workers cannot
    move the aggregate out of the honest workers' range (the mean, as a control, is moved far).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest

from hfl_lab._exceptions import ConfigError, TensorValidationError
from hfl_lab.config import LabConfig
from hfl_lab.vault import DirectoryCheckpointStore
from tests.mesh_support import Mesh, mesh_fixture
from tests.reliability_report import record
from trainer.aggregation import Aggregator, Update, trimmed_count
from trainer.checkpoint import decode_state
from trainer.data import load_cifar10, standardize
from trainer.model import ResNet
from trainer.optim import MomentumSGD
from trainer.participant_config import Deployment, ParticipantConfig
from trainer.proto import parameter_server_pb2 as pb
from trainer.ps import ParameterServer
from trainer.ps_options import PsOptions, partition_sizes
from trainer.serving import model_specs, parameter_server
from trainer.worker import PsConnection

ATTACKER = "worker2"
HONEST = ("worker0", "worker1")
WORKERS = 3
HUGE = 1e38  # finite in float32 (max 3.4e38): passes the stream decoder's NaN/Inf check
Tensors = dict[str, np.ndarray]


@pytest.fixture(scope="module")
def model() -> ResNet:
    return ResNet(8, seed=0)


@pytest.fixture()
def mesh(tmp_path: Path) -> Iterator[Mesh]:
    yield from mesh_fixture(tmp_path, workers=WORKERS)


def lab(**overrides: Any) -> LabConfig:
    values: dict[str, Any] = {"depth": 8, "workers": WORKERS, "steps": 20, "eval_every": 0,
                              "checkpoint_every": 0}
    values.update(overrides)
    return LabConfig.profile("quick", **values)


class Run:
    """A PS served on the mesh and one registered connection per worker."""

    def __init__(self, mesh: Mesh, servicer: ParameterServer, model: ResNet) -> None:
        self.servicer = servicer
        self.specs = model_specs(model)
        self.trainable = [s.name for s in self.specs if s.trainable]
        self.frozen = [s.name for s in self.specs if not s.trainable]
        address = mesh.serve(servicer, num_workers=WORKERS)
        self.conns = {f"worker{i}": PsConnection(mesh.connect(f"worker{i}", address)())
                      for i in range(WORKERS)}
        for i, conn in enumerate(self.conns.values()):
            conn.register(f"worker{i}", i)

    def close(self) -> None:
        for conn in self.conns.values():
            conn.close()
        self.servicer.close()

    def weights(self) -> Tensors:
        return {k: v.copy() for k, v in self.servicer.weights().items()}

    def push(self, who: str, tensors: Tensors, version: int, *, kind: pb.UpdateKind,
             samples: int) -> pb.PushReply:
        header = pb.StreamHeader(kind=kind, model_version=version, worker_id=who,
                                 num_samples=samples)
        ordered = {s.name: tensors[s.name] for s in self.specs}
        reply, _, _ = self.conns[who].push(ordered, header)
        return reply

    def gradients(self, who: str, tensors: Tensors, version: int) -> pb.PushReply:
        batch = self.servicer.options.batch_size
        return self.push(who, tensors, version, kind=pb.UPDATE_KIND_GRADIENTS, samples=batch)

    def refused(self, who: str, tensors: Tensors, version: int) -> grpc.RpcError:
        with pytest.raises(grpc.RpcError) as info:
            self.gradients(who, tensors, version)
        return info.value

    def pulled(self, version: int) -> Tensors:
        return self.conns[HONEST[0]].pull(HONEST[0], version, self.specs).weights

    def serves_finite(self, version: int) -> bool:
        try:
            return finite(self.pulled(version))
        except TensorValidationError:  # the worker's decoder refuses non-finite weights
            return False

    def messages(self) -> list[str]:
        return [str(e.data.get("message", "")) for _, e in
                self.servicer.events.follow(0, lambda: True, lambda: True)]


@pytest.fixture()
def start(mesh: Mesh, model: ResNet) -> Iterator[Any]:
    runs: list[Run] = []

    def run(config: LabConfig, **kwargs: Any) -> Run:
        servicer = parameter_server(config, num_train=1200, model=model, **kwargs)
        runs.append(Run(mesh, servicer, model))
        return runs[-1]

    yield run
    for r in runs:
        r.close()


def honest_gradient(run: Run, seed: int, scale: float = 0.01) -> Tensors:
    """Small gradients (L2 norm about 2.8, like the quick profile's) and the current BN stats."""
    rng = np.random.default_rng(seed)
    current = run.servicer.weights()
    out = {n: (rng.standard_normal(current[n].shape) * scale).astype(np.float32)
           for n in run.trainable}
    out.update({n: current[n].copy() for n in run.frozen})
    return out


def huge_gradient(run: Run, value: float = HUGE) -> Tensors:
    current = run.servicer.weights()
    out = {n: np.full(current[n].shape, value, np.float32) for n in run.trainable}
    out.update({n: current[n].copy() for n in run.frozen})
    return out


def norm(tensors: Tensors, names: list[str]) -> float:
    return math.sqrt(sum(float(np.square(tensors[n], dtype=np.float64).sum()) for n in names))


def delta(after: Tensors, before: Tensors, names: list[str]) -> float:
    return norm({n: after[n].astype(np.float64) - before[n] for n in names}, names)


def finite(tensors: Tensors) -> bool:
    return all(bool(np.all(np.isfinite(v))) for v in tensors.values())


# ---------------------------------------------------------------------- (a) FedAvg weights


def test_fedavg_ignores_a_worker_claiming_2_pow_64_samples(start: Any) -> None:
    # Arrange: three workers of equal shards (iid); the attacker claims 2^64-1 samples
    run: Run = start(lab(aggregation="fedavg", learning_rate=1.0))
    before = run.weights()
    rng = np.random.default_rng(1)
    models = {who: {n: (v + rng.standard_normal(v.shape) * 1e-3).astype(np.float32)
                    for n, v in before.items()} for who in (*HONEST, ATTACKER)}
    honest_claim = run.servicer.options.batch_size * run.servicer.options.local_steps

    # Act
    for who in (*HONEST, ATTACKER):
        claim = 2**64 - 1 if who == ATTACKER else honest_claim
        reply = run.push(who, models[who], 0, kind=pb.UPDATE_KIND_WEIGHTS, samples=claim)
        assert reply.accepted, reply.detail
    after = run.weights()

    # Assert: the plain mean of the three (equal shards), not the attacker's model
    fair = {n: np.mean([models[w][n].astype(np.float64) for w in models], axis=0)
            for n in before}
    off = max(float(np.max(np.abs(after[n] - fair[n]))) for n in before)
    poisoned = int(off > 1e-6)
    record("R8", "fedavg: a worker claims 2^64-1 samples", held=1 - poisoned, lost=0,
           poisoned_commits=poisoned)
    assert run.servicer.version == 1
    assert off <= 1e-6, f"the global model is {off:.3g} away from the fair mean"
    assert any(ATTACKER in m and "ignored" in m for m in run.messages()), \
        "the PS says that it ignored the attacker's claim"


def test_fedavg_weighs_by_the_shard_sizes_the_ps_derives(model: ResNet, mesh: Mesh) -> None:
    # Arrange: a skewed (dirichlet) partition; the PS computes the shard sizes itself
    config = lab(aggregation="fedavg", learning_rate=1.0, partition="dirichlet",
                 dirichlet_alpha=0.3)
    labels = np.concatenate([np.full(40, c) for c in range(10)] * 3)
    sizes = partition_sizes(config, labels)
    options = PsOptions.from_lab(config, 20, shard_sizes=sizes)
    weights = model.get_weights()
    servicer = ParameterServer(model_specs(model), weights,
                               MomentumSGD(model.variable_specs, 1.0), options)
    run = Run(mesh, servicer, model)
    try:
        step = 1e-3  # each model moves every weight by i x 1e-3: far inside the norm bound
        models = {f"worker{i}": {n: v + np.float32(i * step) for n, v in weights.items()}
                  for i in range(WORKERS)}

        # Act: every worker claims the same (honest) figure; only the PS's sizes differ
        for who, tensors in models.items():
            assert run.push(who, tensors, 0, kind=pb.UPDATE_KIND_WEIGHTS, samples=32).accepted

        # Assert
        share = np.asarray(sizes, np.float64) / sum(sizes)
        name = run.trainable[0]
        expected = weights[name] + sum(share[i] * i * step for i in range(WORKERS))
        assert len(set(sizes)) > 1, "the dirichlet shards differ in size"
        np.testing.assert_allclose(run.weights()[name], expected, atol=1e-6)
    finally:
        run.close()


# ---------------------------------------------------------------------- (b) huge gradients


def test_huge_finite_gradient_is_clipped_in_sync_mode(start: Any) -> None:
    # Arrange: K = N = 3; worker2 pushes 1e38 in every gradient entry, four steps in a row
    run: Run = start(lab(aggregation="sync", learning_rate=0.1))
    bound = run.servicer.options.max_update_norm
    lr, wd, m = 0.1, run.servicer.optimizer.weight_decay, run.servicer.optimizer.momentum
    poisoned, steps = 0, 4

    # Act / Assert per step
    for version in range(steps):
        before = run.weights()
        honest = [honest_gradient(run, seed=10 * version + i) for i in range(2)]
        for who, g in zip(HONEST, honest, strict=True):
            assert run.gradients(who, g, version).accepted
        assert run.gradients(ATTACKER, huge_gradient(run), version).accepted
        after = run.weights()
        # |v_t| <= sum of m^j * (mean of the clipped norms + wd |w|): the step is bounded
        per_step = (sum(norm(g, run.trainable) for g in honest) + bound) / WORKERS
        limit = lr * (per_step + wd * norm(before, run.trainable)) / (1 - m) * 1.001
        moved = delta(after, before, run.trainable)
        poisoned += int(not finite(after) or moved > limit)
    served = run.serves_finite(steps)

    record("R8", "a finite 1e38 gradient (sync, 4 steps)", held=int(poisoned == 0 and served),
           lost=0, poisoned_commits=poisoned)
    assert poisoned == 0, f"{poisoned} of {steps} steps moved the weights beyond the bound"
    assert served and run.servicer.version == steps
    assert any(ATTACKER in m and "max_update_norm" in m for m in run.messages())


def test_huge_finite_gradient_is_clipped_in_async_mode(start: Any) -> None:
    # Arrange: the attacker alone drives async steps (each push is applied at once)
    run: Run = start(lab(aggregation="async", learning_rate=0.1, max_staleness=3))
    bound = run.servicer.options.max_update_norm
    lr, wd, m = 0.1, run.servicer.optimizer.weight_decay, run.servicer.optimizer.momentum
    poisoned, steps = 0, 6  # the unclipped velocity overflows float32 at the 4th step

    # Act
    for version in range(steps):
        before = run.weights()
        reply = run.gradients(ATTACKER, huge_gradient(run), version)
        after = run.weights()
        limit = lr * (bound + wd * norm(before, run.trainable)) / (1 - m) * 1.001
        poisoned += int(not reply.accepted or not finite(after)
                        or delta(after, before, run.trainable) > limit)
    honest = run.gradients(HONEST[0], honest_gradient(run, seed=3), steps)
    served = run.serves_finite(steps + 1)

    # Assert
    record("R8", "a finite 1e38 gradient (async, 6 steps)", held=int(poisoned == 0 and served),
           lost=int(not honest.accepted), poisoned_commits=poisoned)
    assert poisoned == 0, f"{poisoned} of {steps} async steps escaped the bound"
    assert honest.accepted and served


def test_a_huge_fedavg_model_is_clipped_to_what_local_steps_can_do(start: Any) -> None:
    # Arrange: fedavg, E = 1, lr 0.1: an honest round moves the weights by at most
    # 0.1 x max_update_norm; worker2 sends a model of 1e38 everywhere
    run: Run = start(lab(aggregation="fedavg", learning_rate=0.1))
    bound = 0.1 * run.servicer.options.max_update_norm
    before = run.weights()
    changes = [{n: (np.random.default_rng(i).standard_normal(v.shape) * 1e-3)
                .astype(np.float32) for n, v in before.items()} for i in range(2)]
    hostile = {n: np.full_like(v, HUGE) for n, v in before.items()}

    # Act
    for who, change in zip(HONEST, changes, strict=True):
        model = {n: before[n] + change[n] for n in before}
        assert run.push(who, model, 0, kind=pb.UPDATE_KIND_WEIGHTS, samples=32).accepted
    assert run.push(ATTACKER, hostile, 0, kind=pb.UPDATE_KIND_WEIGHTS, samples=32).accepted
    after = run.weights()

    # Assert: the attacker moved the mean by at most bound / 3
    limit = (sum(norm(c, run.trainable) for c in changes) + bound) / WORKERS * 1.001
    moved = delta(after, before, run.trainable)
    poisoned = int(not finite(after) or moved > limit)
    record("R8", "a fedavg model of 1e38 values", held=1 - poisoned, lost=0,
           poisoned_commits=poisoned)
    assert poisoned == 0, f"the global model moved {moved:.3g}, more than {limit:.3g}"
    assert any(ATTACKER in m and "scaled down" in m for m in run.messages())


# ---------------------------------------------------------------------- (c) overflow


def checkpoints_finite(store: DirectoryCheckpointStore, specs: Any) -> tuple[int | None, bool]:
    latest = store.load_latest()
    if latest is None:
        return None, True
    return latest.step, finite(decode_state(latest.payload, specs).weights)


def test_an_update_that_overflows_the_new_weights_is_refused_async(
    start: Any, tmp_path: Path
) -> None:
    # Arrange: no norm bound, a large rate: 3e38 x 10 overflows float32 in one step
    store = DirectoryCheckpointStore(tmp_path / "ckpt")
    run: Run = start(lab(aggregation="async", learning_rate=10.0, max_update_norm=0.0,
                         checkpoint_every=1), store=store)
    before = run.weights()
    velocity = run.servicer.optimizer.state()

    # Act
    error = run.refused(ATTACKER, huge_gradient(run, 3e38), 0)
    kept = run.weights()
    kept_state = run.servicer.optimizer.state()
    served = run.pulled(0)
    honest = run.gradients(HONEST[0], honest_gradient(run, seed=5), 0)
    run.servicer.housekeeping.join()
    step, on_disk_finite = checkpoints_finite(store, run.specs)

    # Assert
    held = (error.code() == grpc.StatusCode.INVALID_ARGUMENT and finite(kept)
            and all(np.array_equal(kept[n], before[n]) for n in before) and on_disk_finite)
    record("R8", "an update that overflows the new weights (async)", held=int(held),
           lost=int(not honest.accepted), poisoned_commits=int(not finite(kept)))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, error.details()
    details = error.details() or ""
    assert "non-finite" in details and ATTACKER in details
    assert all(np.array_equal(kept[n], before[n]) for n in before), "the old weights are kept"
    assert all(np.array_equal(served[n], before[n]) for n in before), "and served"
    assert all(np.array_equal(kept_state[k], velocity[k]) for k in velocity), \
        "the optimizer's velocity and step are put back"
    assert honest.accepted and run.servicer.version == 1, "the next honest step goes through"
    assert step == 1 and on_disk_finite, "only the honest step was checkpointed"
    assert any(ATTACKER in m and "non-finite" in m for m in run.messages())


def test_an_aggregate_that_overflows_is_refused_and_the_step_is_redone_sync(
    start: Any, tmp_path: Path
) -> None:
    # Arrange: K = 3; two honest gradients wait while worker2's completes the step
    store = DirectoryCheckpointStore(tmp_path / "ckpt")
    run: Run = start(lab(aggregation="sync", learning_rate=10.0, max_update_norm=0.0,
                         checkpoint_every=1), store=store)
    before = run.weights()
    honest = [honest_gradient(run, seed=20 + i) for i in range(WORKERS)]

    # Act
    for who, g in zip(HONEST, honest[:2], strict=True):
        assert run.gradients(who, g, 0).accepted
    error = run.refused(ATTACKER, huge_gradient(run, 3e38), 0)
    kept = run.weights()
    version_after_refusal = run.servicer.version
    # every worker redoes step 0, honestly this time
    replies = [run.gradients(f"worker{i}", honest[i], 0) for i in range(WORKERS)]
    run.servicer.housekeeping.join()
    step, on_disk_finite = checkpoints_finite(store, run.specs)

    # Assert
    held = (version_after_refusal == 0 and finite(kept) and on_disk_finite
            and all(np.array_equal(kept[n], before[n]) for n in before))
    record("R8", "an aggregate that overflows the new weights (sync)", held=int(held),
           lost=int(not all(r.accepted for r in replies)),
           poisoned_commits=int(not finite(kept)))
    details = error.details() or ""
    assert error.code() == grpc.StatusCode.FAILED_PRECONDITION, details
    assert "non-finite" in details and "register" not in details  # the worker redoes the step
    assert all(w in details for w in (*HONEST, ATTACKER)), "names the contributors"
    assert version_after_refusal == 0
    assert all(np.array_equal(kept[n], before[n]) for n in before)
    assert all(r.accepted for r in replies) and run.servicer.version == 1
    assert step == 1 and on_disk_finite and run.serves_finite(1)


def test_a_ps_does_not_start_from_non_finite_weights(model: ResNet) -> None:
    # Arrange: weights such as a PS before this fix could checkpoint
    weights = model.get_weights()
    name = next(iter(weights))
    weights[name] = np.full_like(weights[name], -np.inf)
    options = PsOptions.from_lab(lab(), 20)

    # Act / Assert
    with pytest.raises(ConfigError) as refused:
        ParameterServer(model_specs(model), weights, MomentumSGD(model.variable_specs, 0.1),
                        options)
    assert name in str(refused.value) and "NaN/Inf" in str(refused.value)


# ---------------------------------------------------------------------- (d) robust rules


def attacked_aggregate(run: Run, mode: str) -> tuple[Tensors, list[Tensors]]:
    """Step 0 with two honest contributions and worker2's: (what the PS applied, honest).

    The attacker's contribution stays inside the norm bound (so clipping does not neutralize
    it) and sets the BN moving variance to 1e30. With learning rate 1, no weight decay and a
    zero velocity, the applied sync gradient is ``before - after``."""
    before = run.weights()
    base = {n: np.random.default_rng(7).standard_normal(before[n].shape).astype(np.float32)
            * 0.01 for n in run.trainable}
    honest = []
    for i in range(2):
        noise = np.random.default_rng(100 + i)
        honest.append({n: (base[n] + noise.standard_normal(base[n].shape) * 1e-3)
                       .astype(np.float32) for n in run.trainable})
    scale = 0.9 * run.servicer.options.max_update_norm / norm(base, run.trainable)
    hostile = {n: -scale * base[n] for n in run.trainable}
    contributions = [*honest, hostile]
    for who, g in zip((*HONEST, ATTACKER), contributions, strict=True):
        stats = {n: before[n].copy() for n in run.frozen}
        if who == ATTACKER:
            stats = {n: np.full_like(v, 1e30) if "variance" in n else v for n, v in stats.items()}
        if mode == "fedavg":  # the same change, as new weights
            tensors = {**{n: before[n] - g[n] for n in run.trainable}, **stats}
            reply = run.push(who, tensors, 0, kind=pb.UPDATE_KIND_WEIGHTS, samples=32)
        else:
            reply = run.gradients(who, {**g, **stats}, 0)
        assert reply.accepted, reply.detail
    after = run.weights()
    applied = {n: before[n].astype(np.float64) - after[n] for n in run.trainable}
    applied.update({n: after[n] for n in run.frozen})
    return applied, honest


@pytest.mark.parametrize("mode", ["sync", "fedavg"])
@pytest.mark.parametrize("rule", ["median", "trimmed_mean"])
def test_robust_rules_keep_one_attacker_among_three_inside_the_honest_range(
    start: Any, rule: str, mode: str
) -> None:
    # Arrange
    run: Run = start(lab(aggregation=mode, aggregation_rule=rule, learning_rate=1.0,
                         weight_decay=0.0))

    # Act
    applied, honest = attacked_aggregate(run, mode)

    # Assert: every coordinate of the update lies between the honest workers' values
    outside = 0
    for n in run.trainable:
        low = np.minimum(honest[0][n], honest[1][n]) - 1e-6
        high = np.maximum(honest[0][n], honest[1][n]) + 1e-6
        outside += int(np.sum((applied[n] < low) | (applied[n] > high)))
    variances = [n for n in run.frozen if "variance" in n]
    stats_poisoned = any(float(np.max(applied[n])) > 1e3 for n in variances)
    poisoned = int(outside > 0 or stats_poisoned)
    record("R8", f"one attacker among three, {rule} ({mode})", held=1 - poisoned, lost=0,
           poisoned_commits=poisoned)
    assert outside == 0, f"{outside} coordinates left the honest range"
    assert not stats_poisoned, "the BN variance follows the attacker"
    assert finite(run.weights())


def test_trimmed_mean_drops_the_extremes_at_each_end() -> None:
    # Arrange: five contributions, trim 0.2: one dropped at each end
    applied: list[Update] = []
    agg = Aggregator("sync", 5, rule="trimmed_mean", trim_fraction=0.2, apply=applied.append)
    values = [1.0, 2.0, 3.0, 4.0, 3e38]

    # Act
    for i, value in enumerate(values):
        agg.submit(f"w{i}", 0, {"w": np.full(3, value, np.float32)})

    # Assert: the mean of 2, 3, 4; the counts the rule drops for some K
    np.testing.assert_allclose(applied[0].tensors["w"], 3.0)
    assert [trimmed_count(k, 0.2) for k in (2, 3, 5, 10)] == [0, 1, 1, 2]
    assert trimmed_count(10, 0.3) == 3  # 0.3 x 10 is 3.0000000000000004 in floats


def test_the_mean_is_moved_by_the_same_attacker(start: Any) -> None:
    """Control: the attack of the robust-rule test is real; the plain mean follows it."""
    run: Run = start(lab(aggregation="sync", learning_rate=1.0, weight_decay=0.0))

    applied, honest = attacked_aggregate(run, "sync")

    spread = norm({n: honest[0][n] - honest[1][n] for n in run.trainable}, run.trainable)
    fair = {n: (honest[0][n] + honest[1][n]) / 2 for n in run.trainable}
    moved = norm({n: applied[n] - fair[n] for n in run.trainable}, run.trainable)
    assert moved > 10 * spread


# ---------------------------------------------------------------------- parameters


def test_the_parameters_flow_from_lab_config_to_the_ps(tmp_path: Path) -> None:
    config = lab(aggregation="fedavg", aggregation_rule="trimmed_mean", trim_fraction=0.3,
                 max_update_norm=25.0)
    deployment = Deployment(trust_address="127.0.0.1:1", ps_address="127.0.0.1:2",
                            workers=WORKERS)
    ParticipantConfig.write(tmp_path / "config.yaml", deployment, config)

    loaded = ParticipantConfig.load(tmp_path / "config.yaml")
    options = PsOptions.from_lab(loaded.lab, 20)

    assert (options.aggregation_rule, options.trim_fraction, options.max_update_norm) == (
        "trimmed_mean", 0.3, 25.0)
    assert LabConfig().aggregation_rule == "mean" and LabConfig().max_update_norm > 0


@pytest.mark.parametrize(
    ("params", "expected"),
    [
        ({"aggregation": "async", "aggregation_rule": "median"}, "async"),
        ({"workers": 2, "aggregation_rule": "median"}, "at least 3"),
        ({"workers": 4, "sync_quorum": 2, "aggregation_rule": "trimmed_mean"}, "at least 3"),
        ({"aggregation_rule": "mode"}, "aggregation_rule must be one of mean, median"),
        ({"trim_fraction": 0.5}, "trim_fraction must be > 0 and < 0.5"),
        ({"max_update_norm": -1.0}, "max_update_norm must be ≥ 0"),
    ],
)
def test_bad_robustness_parameters_are_refused(params: dict[str, Any], expected: str) -> None:
    with pytest.raises(ConfigError) as info:
        LabConfig(**params)
    assert expected in str(info.value)


def test_the_default_bound_leaves_real_gradients_alone(cifar_dir: Path, model: ResNet) -> None:
    """Measured: the quick profile's per-worker gradient norms are about 1.3-2.3 (batch 32),
    up to 7.6 at batch 1-2; the default bound is far above them."""
    data = load_cifar10(cifar_dir)
    bound = LabConfig().max_update_norm
    norms = []
    for start_index in range(0, 64, 8):
        x = standardize(data.train_images[start_index:start_index + 8])
        result = model.compute_gradients(x, data.train_labels[start_index:start_index + 8])
        norms.append(norm(dict(result.gradients), list(result.gradients)))
    assert max(norms) < bound / 10, norms
