"""What a parameter server does with updates (:class:`PsOptions`, from a LabConfig), where it
is (:class:`PsState`), and the wire names of modes and dtypes."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Literal

import numpy.typing as npt

from hfl_lab.config import LabConfig
from trainer.aggregation import Mode, Rule
from trainer.data import partition
from trainer.proto import parameter_server_pb2 as pb
from trainer.tensors import DEFAULT_CHUNK_BYTES

__all__ = ["MODES", "WIRE", "WIRE_NAMES", "PsOptions", "PsState", "partition_sizes"]

MODES = {
    Mode.SYNC: pb.AGGREGATION_MODE_SYNC,
    Mode.ASYNC: pb.AGGREGATION_MODE_ASYNC,
    Mode.FEDAVG: pb.AGGREGATION_MODE_FEDAVG,
}
WIRE: dict[str, int] = {
    "float32": pb.DTYPE_FLOAT32,
    "float16": pb.DTYPE_FLOAT16,
    "bfloat16": pb.DTYPE_BFLOAT16,
}
WIRE_NAMES: dict[int, str] = {v: k for k, v in WIRE.items()}


class PsState(StrEnum):
    """Where a parameter server is: no worker yet, training, or finished."""

    WAITING = "waiting"
    TRAINING = "training"
    DONE = "done"


@dataclass(frozen=True)
class PsOptions:
    """What the PS does with updates; derived from a LabConfig by :meth:`from_lab`."""

    mode: Mode
    num_workers: int
    total_steps: int
    quorum: int | None = None
    #: sync/fedavg: K counts the workers live now (``quorum_rule: live``), capped at K
    live_quorum: bool = False
    #: with ``live_quorum``: no step completes while fewer workers are live
    min_live: int = 1
    staleness_bound: int | None = None
    chunk_bytes: int = DEFAULT_CHUNK_BYTES
    wire_dtype: str = "float32"
    eval_every: int = 0
    checkpoint_every: int = 0
    batch_size: int = 32
    local_steps: int = 1
    seed: int = 0
    model_name: str = "resnet56"
    partition: str = "iid"
    options: Mapping[str, str] = field(default_factory=dict)
    #: sync/fedavg: how the K contributions combine (``trainer.aggregation.Rule``)
    aggregation_rule: Rule = Rule.MEAN
    trim_fraction: float = 0.2
    #: each update's L2 bound (gradient units; 0 = none): larger ones are scaled down to it
    max_update_norm: float = 100.0
    #: samples of each worker's shard by index, as the PS derives them from the run's
    #: configuration (:func:`partition_sizes`); empty: the shards count as equal (iid)
    shard_sizes: tuple[int, ...] = ()

    @property
    def samples_per_update(self) -> int:
        """What an honest worker's update stands for: one batch, E batches in FedAvg."""
        return self.batch_size * (self.local_steps if self.mode is Mode.FEDAVG else 1)

    def fedavg_weight(self, index: int) -> int:
        """The FedAvg weight of worker ``index``'s model: its shard's size, known to the PS.

        The worker's own ``num_samples`` never counts (one claiming 2^64-1 samples would
        otherwise replace the global model by its own)."""
        if 0 <= index < len(self.shard_sizes):
            return self.shard_sizes[index]
        return self.samples_per_update  # equal weights, as iid shards are equal

    @classmethod
    def from_lab(
        cls, lab: LabConfig, total_steps: int, *, shard_sizes: tuple[int, ...] = ()
    ) -> PsOptions:
        return cls(
            mode=Mode(lab.aggregation),
            num_workers=lab.workers,
            total_steps=total_steps,
            quorum=lab.quorum if lab.aggregation != "async" else None,
            live_quorum=lab.quorum_rule == "live" and lab.aggregation != "async",
            min_live=lab.min_live_workers,
            staleness_bound=lab.staleness_bound,
            chunk_bytes=lab.chunk_bytes,
            wire_dtype=lab.wire_dtype,
            eval_every=lab.eval_every,
            checkpoint_every=lab.checkpoint_every,
            batch_size=lab.batch_size,
            local_steps=lab.local_steps,
            seed=lab.seed,
            model_name=f"resnet{lab.depth}",
            partition=lab.partition,
            aggregation_rule=Rule(lab.aggregation_rule),
            trim_fraction=lab.trim_fraction,
            max_update_norm=lab.max_update_norm,
            shard_sizes=tuple(shard_sizes),
        )

    def training_config(self, quorum: int | None, staleness: int | None) -> pb.TrainingConfig:
        """What a registering worker is told about the run."""
        return pb.TrainingConfig(
            chunk_bytes=self.chunk_bytes,
            wire_dtype=WIRE[self.wire_dtype],  # type: ignore[arg-type]
            total_steps=self.total_steps,
            local_steps=self.local_steps,
            batch_size=self.batch_size,
            num_workers=self.num_workers,
            sync_quorum=quorum,
            max_staleness=staleness,
            seed=self.seed,
            model=self.model_name,
            partition=self.partition,
            options=dict(self.options),
        )


def partition_sizes(lab: LabConfig, train_labels: npt.ArrayLike) -> tuple[int, ...]:
    """Each worker's shard size, from the same deterministic partition the workers draw
    (``trainer.worker.worker_batches``): the FedAvg weights the PS trusts."""
    scheme: Literal["iid", "dirichlet"] = "dirichlet" if lab.partition == "dirichlet" else "iid"
    parts = partition(train_labels, lab.workers, scheme, alpha=lab.dirichlet_alpha,
                      seed=lab.seed)
    return tuple(len(p) for p in parts)


# -- admission limits of the PS's long calls (issue 18, item 9)

#: how far ahead of the PS a pull may ask: a worker asks for the step after the one it
#: computed, which the PS has reached at least; more is a request nothing would ever answer
MAX_PULL_AHEAD = 1
#: long calls one role may hold at once (each holds an RPC thread while it lasts): two pulls
#: (a restarted worker's old one may still be ending) and two event watches; the PS's pool
#: has four threads per worker and four more (trainer.serving)
MAX_PULLS_PER_ROLE = 2
MAX_WATCHES_PER_ROLE = 2
#: seconds a pull waits for its step before the PS answers DEADLINE_EXCEEDED (the worker pulls
#: again; less than its own 600 s deadline, so the answer is the PS's), and an event watch
#: lasts (the watcher resumes with since_seq)
PULL_WAIT_LIMIT_S = 300.0
WATCH_LIMIT_S = 600.0


def pull_too_far(wanted: int, version: int) -> str:
    """Why a pull for step ``wanted`` is refused while the PS is at ``version``."""
    return (f"a pull for step {wanted} while the PS is at step {version}: more than "
            f"{MAX_PULL_AHEAD} ahead, which no worker asks for. Fix: pull with min_version at "
            f"most {version + MAX_PULL_AHEAD} (Register again to learn the PS's step)")
