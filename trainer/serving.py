"""Assemble a parameter server or a worker from a run's configuration and mesh identity.

Used by the participant processes (``trainer.entrypoint``), and by tests and benchmarks that run the
same components in one process (always over the attested mesh).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

import grpc
import numpy as np
import numpy.typing as npt

from hfl_lab.config import LabConfig
from hfl_lab.events import LabEvent
from hfl_lab.tee.verifier import Verifier
from hfl_lab.trust.client import MeshCredentials
from hfl_lab.trust.mesh import PeerCheck, attested_channel
from hfl_lab.vault.checkpoints import CheckpointStore
from trainer.checkpoint import decode_state
from trainer.data import load_cifar10, standardize
from trainer.model import ResNet, build_resnet
from trainer.optim import MomentumSGD, PiecewiseConstantSchedule
from trainer.participant_config import ParticipantConfig
from trainer.proto import parameter_server_pb2 as pb
from trainer.ps import ParameterServer, PsOptions
from trainer.ps_options import partition_sizes
from trainer.ps_server import MAX_MESSAGE_BYTES, serve_ps, worker_peers
from trainer.tensors import TensorSpec
from trainer.worker import Worker, worker_batches

if TYPE_CHECKING:
    from trainer.participant import Participant

__all__ = [
    "RunningPs",
    "build_parameter_server",
    "build_worker",
    "channel_factory",
    "model_specs",
    "parameter_server",
    "rpc_pool_size",
]

CHANNEL_OPTIONS = (
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
)


def model_specs(model: ResNet) -> list[TensorSpec]:
    """The model's tensors in the order they travel."""
    return [TensorSpec(v.name, v.dtype, v.shape, v.trainable) for v in model.variable_specs]


def schedule_for(lab: LabConfig, num_train: int) -> PiecewiseConstantSchedule:
    return PiecewiseConstantSchedule(*lab.lr_schedule(num_train))


def parameter_server(
    lab: LabConfig,
    *,
    num_train: int,
    test: tuple[npt.NDArray[np.uint8], npt.NDArray[np.int64]] | None = None,
    store: CheckpointStore | None = None,
    emit: Callable[[LabEvent], None] | None = None,
    model: ResNet | None = None,
    initial_weights: Mapping[str, npt.NDArray[np.float32]] | None = None,
    train_labels: npt.ArrayLike | None = None,
) -> ParameterServer:
    """The PS of a LabConfig: model, optimizer, schedule; resumed from ``store`` if it holds one.
    With ``train_labels`` the PS knows each worker's shard size (FedAvg weighs by it, never by
    what a worker claims); without, every worker counts equally."""
    model = model or build_resnet(lab.depth, seed=lab.seed, num_threads=lab.threads or None,
                                  bn_momentum=lab.bn_momentum, jit_compile=lab.jit_compile)
    specs = model_specs(model)
    optimizer = MomentumSGD(model.variable_specs, schedule_for(lab, num_train),
                            momentum=lab.momentum, weight_decay=lab.weight_decay)
    weights = dict(initial_weights) if initial_weights is not None else model.get_weights()
    start_version = 0
    resumed = None
    if store is not None:
        latest = store.load_latest()
        if latest is not None:
            state = decode_state(latest.payload, specs)
            weights = {k: np.asarray(v, np.float32) for k, v in state.weights.items()}
            optimizer.load_state(state.optimizer)
            start_version = state.version
            resumed = latest.step
    evaluate = None
    if test is not None:
        x = standardize(test[0])
        y = np.asarray(test[1], np.int64)

        def evaluate(current: Mapping[str, npt.NDArray[np.float32]]) -> dict[str, float]:
            model.set_weights(current)
            result = model.evaluate(x, y)
            return {"loss": result.loss, "accuracy": result.accuracy,
                    "num_samples": float(result.num_samples)}

    shards = partition_sizes(lab, train_labels) if train_labels is not None else ()
    options = PsOptions.from_lab(lab, lab.total_steps(num_train), shard_sizes=shards)
    servicer = ParameterServer(specs, weights, optimizer, options, store=store,
                               evaluate=evaluate, emit=emit, start_version=start_version,
                               checkpoint_metadata={"depth": lab.depth, "seed": lab.seed})
    if resumed is not None:
        servicer._event("log", level="info",
                        message=f"resumed from the checkpoint of step {resumed}")
    return servicer


@dataclass
class RunningPs:
    servicer: ParameterServer
    server: grpc.Server
    port: int

    def stop(self, grace: float = 1.0) -> None:
        self.server.stop(grace).wait()
        self.servicer.close()


def build_parameter_server(
    config: ParticipantConfig,
    participant: Participant,
    creds: MeshCredentials | Callable[[], MeshCredentials],
    *,
    emit: Callable[[LabEvent], None] | None = None,
    store: CheckpointStore | None = None,
    host: str = "127.0.0.1",
    port: int = 0,
) -> RunningPs:
    lab = config.lab
    data = load_cifar10(lab.require_data_path(), sha256=lab.data_sha256)
    servicer = parameter_server(lab, num_train=len(data.train_labels),
                                test=(data.test_images, data.test_labels), store=store, emit=emit,
                                train_labels=data.train_labels)
    ca_pem = (creds() if callable(creds) else creds).ca_pem
    peer_check = PeerCheck(participant.verifier, ca_pem, worker_peers(lab.workers))
    # A sync worker holds an RPC thread while it waits in PullParameters for the next step, and
    # may push, report metrics and watch events meanwhile: a fixed pool would let the first
    # workers hold every thread and starve the rest's pushes (a deadlock with many workers).
    server, bound = serve_ps(servicer, creds, peer_check, host=host, port=port,
                             max_workers=rpc_pool_size(lab.workers))
    return RunningPs(servicer, server, bound)


def rpc_pool_size(workers: int) -> int:
    """The most RPC threads ps0 keeps for ``workers`` workers: up to four calls of each in flight
    at once (a waiting pull, a push, a metrics report, an event watch) and four to spare."""
    return max(16, 4 * workers + 4)


def channel_factory(
    address: str,
    creds: MeshCredentials | Callable[[], MeshCredentials],
    verifier: Verifier,
) -> Callable[[], grpc.Channel]:
    """New attested channels to ps0: its certificate and evidence are checked every time, and
    the channel uses this participant's current (renewed) mesh certificate."""
    current = creds if callable(creds) else (lambda: creds)

    def connect() -> grpc.Channel:
        channel, _ = attested_channel(address, current(), verifier, "ps0",
                                      options=CHANNEL_OPTIONS)
        return channel

    return connect


def build_worker(
    config: ParticipantConfig,
    participant: Participant,
    creds: MeshCredentials | Callable[[], MeshCredentials],
    index: int,
    *,
    emit: Callable[[LabEvent], None] | None = None,
    on_registered: Callable[[pb.RegisterReply], None] | None = None,
    generation: Callable[[], int] | None = None,
    reattest: Callable[[], bool] | None = None,
) -> Worker:
    lab = config.lab
    stream, num_train = worker_batches(lab, index)
    model = build_resnet(lab.depth, seed=lab.seed, num_threads=lab.threads or None,
                         bn_momentum=lab.bn_momentum, jit_compile=lab.jit_compile)
    return Worker(
        index, model, stream,
        channel_factory(config.deployment.ps_address, creds, participant.verifier),
        schedule=schedule_for(lab, num_train), momentum=lab.momentum,
        weight_decay=lab.weight_decay, emit=emit, on_registered=on_registered,
        reconnect_timeout_s=config.deployment.connect_timeout_s, generation=generation,
        reattest=reattest,
    )
