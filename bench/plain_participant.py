"""P3-startup's baseline: a participant of a local run with ordinary mTLS and no attestation.

Run by ``bench.mesh`` as ``python -c <this file's text>`` in the workload root, like the local
backend runs ``python -m trainer ...``. The first stdin line is JSON: ``role``, ``config`` (a
participant config file), ``ca``, ``key`` and ``cert`` (ordinary PEM certificates for this
role). Each participant does what its attested counterpart does (same imports, data, model,
servers, worker registration and training loop) except evidence, attestation and the mesh
certificate. It prints the same lifecycle events as JSON lines on stdout, at the same points:
``starting`` once its modules are imported, ``ready`` when it serves (ps0, trust) or has
registered with ps0 (workers).
"""

from __future__ import annotations

import json
import os
import sys
from concurrent import futures
from pathlib import Path
from typing import Any


def _trust(args: dict[str, Any], emitter: Any) -> None:
    import trainer.trust_td  # noqa: F401 - the trust TD's own modules
    from hfl_lab.tee.policy import AttestationPolicy
    from hfl_lab.trust.service import TrustService, serve
    from trainer.participant_config import ParticipantConfig

    config = ParticipantConfig.load(args["config"])
    policy = AttestationPolicy.load(args["policy"])
    emitter.lifecycle("starting")
    service = TrustService(policy=policy, admin_token=os.urandom(32),
                           on_event=emitter.emit, cert_lifetime_s=config.lab.cert_lifetime_s)
    host, _, port = config.deployment.trust_address.rpartition(":")
    _, bound = serve(service, args["cert"].encode(), args["key"].encode(), host=host,
                     port=int(port))
    emitter.lifecycle("ready", detail=f"serving on {host}:{bound}", port=bound)
    sys.stdin.read()


def _ps(args: dict[str, Any], emitter: Any) -> None:
    import grpc

    import trainer.entrypoint  # noqa: F401 - the PS TD's own modules
    from hfl_lab.vault.directory_store import DirectoryCheckpointStore
    from trainer.data import load_cifar10
    from trainer.participant_config import ParticipantConfig
    from trainer.ps_server import MAX_MESSAGE_BYTES, add_parameter_server
    from trainer.serving import parameter_server

    config = ParticipantConfig.load(args["config"])
    emitter.lifecycle("starting")
    lab = config.lab
    data = load_cifar10(lab.require_data_path(), sha256=lab.data_sha256)
    # the plain run has no vault (no attested key release): a plain checkpoint folder or none
    folder = config.deployment.checkpoint_dir
    store = DirectoryCheckpointStore(Path(folder)) if folder else None
    servicer = parameter_server(lab, num_train=len(data.train_labels),
                                test=(data.test_images, data.test_labels),
                                store=store, emit=emitter.emit, train_labels=data.train_labels)
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=16, thread_name_prefix="ps-rpc"),
        options=[("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
                 ("grpc.max_send_message_length", MAX_MESSAGE_BYTES)],
    )
    add_parameter_server(servicer, server)
    credentials = grpc.ssl_server_credentials(
        [(args["key"].encode(), args["cert"].encode())],
        root_certificates=args["ca"].encode(), require_client_auth=True,
    )
    port = server.add_secure_port(config.deployment.ps_address, credentials)
    server.start()
    emitter.lifecycle("ready", detail=f"serving on port {port}", port=port,
                      version=servicer.version)
    sys.stdin.read()


def _worker(args: dict[str, Any], emitter: Any, index: int) -> None:
    import grpc

    import trainer.entrypoint  # noqa: F401 - the worker TD's own modules
    from trainer.model import build_resnet
    from trainer.participant_config import ParticipantConfig
    from trainer.serving import CHANNEL_OPTIONS, schedule_for
    from trainer.worker import Worker, worker_batches

    config = ParticipantConfig.load(args["config"])
    emitter.lifecycle("starting")
    lab = config.lab
    credentials = grpc.ssl_channel_credentials(
        args["ca"].encode(), args["key"].encode(), args["cert"].encode()
    )

    def connect() -> grpc.Channel:
        return grpc.secure_channel(
            config.deployment.ps_address, credentials,
            options=[("grpc.ssl_target_name_override", "ps0"), *CHANNEL_OPTIONS],
        )

    stream, num_train = worker_batches(lab, index)
    model = build_resnet(lab.depth, seed=lab.seed, num_threads=lab.threads or None,
                         bn_momentum=lab.bn_momentum)
    worker = Worker(
        index, model, stream, connect, schedule=schedule_for(lab, num_train),
        momentum=lab.momentum, weight_decay=lab.weight_decay, emit=emitter.emit,
        on_registered=lambda reply: emitter.lifecycle(
            "ready", detail=f"registered at step {reply.model_version}",
            version=reply.model_version),
        reconnect_timeout_s=config.deployment.connect_timeout_s,
    )
    worker.run()


def main() -> None:
    from trainer.participant import Emitter

    args = json.loads(sys.stdin.readline())
    role = args["role"]
    emitter = Emitter(role)
    if role == "trust":
        _trust(args, emitter)
    elif role == "ps0":
        _ps(args, emitter)
    else:
        _worker(args, emitter, int(role.removeprefix("worker")))


if __name__ == "__main__":
    main()
