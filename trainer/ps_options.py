"""What a parameter server does with updates (:class:`PsOptions`, from a LabConfig), where it
is (:class:`PsState`), and the wire names of modes and dtypes."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum

from hfl_lab.config import LabConfig
from trainer.aggregation import Mode
from trainer.proto import parameter_server_pb2 as pb
from trainer.tensors import DEFAULT_CHUNK_BYTES

__all__ = ["MODES", "WIRE", "WIRE_NAMES", "PsOptions", "PsState"]

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

    @classmethod
    def from_lab(cls, lab: LabConfig, total_steps: int) -> PsOptions:
        return cls(
            mode=Mode(lab.aggregation),
            num_workers=lab.workers,
            total_steps=total_steps,
            quorum=lab.quorum if lab.aggregation != "async" else None,
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
