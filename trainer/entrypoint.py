"""Process entry points: ``python -m trainer ps|worker|trust --config FILE``.

Each prints lab events as JSON lines on stdout, logs on stderr, and exits with 0 when its part of
the training is done, 1 on an error it can name (one line, with the fix), 3 when its launcher went
away, and 130 on Ctrl-C.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import signal
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from hfl_lab._exceptions import ConfigError, HflLabError
from hfl_lab.vault.checkpoints import CheckpointStore
from hfl_lab.vault.directory_store import DirectoryCheckpointStore
from trainer.image_boot import run_from_image
from trainer.participant import (
    Emitter,
    MeshSession,
    Participant,
    StopFlag,
    configure_logging,
    load_run_policy,
    measured_argv,
    read_bootstrap,
)
from trainer.participant_config import ParticipantConfig
from trainer.trust_td import add_trust_parser, run_trust
from trainer.vault_store import open_vault_store

# trainer.serving (the PS and worker servers) imports trainer.model, i.e. TensorFlow and Keras:
# run_ps and run_worker import it themselves ("lazy: TensorFlow"), so that `python -m trainer
# --help` and the trust role (`python -m trainer trust`) start without loading TensorFlow.
if TYPE_CHECKING:
    from hfl_lab.trust.client import TrustClient

__all__ = ["main"]

log = logging.getLogger("trainer")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m trainer",
        description="A participant of an HFL-TDX Lab run (parameter server, worker or the "
        "trust service).",
    )
    sub = parser.add_subparsers(dest="role", required=True)
    ps = sub.add_parser("ps", help="the parameter server (ps0)")
    ps.add_argument("--config", required=True, help="the run's participant config file")
    ps.add_argument("--host", default=None, help="listen address (default: from ps_address)")
    ps.add_argument("--exit-when-done", action="store_true",
                    help="exit once training finished and every worker was told so "
                    "(default: stay up so the vault can be fetched)")
    worker = sub.add_parser("worker", help="a worker (worker<N>)")
    worker.add_argument("--index", type=int, required=True, help="worker index N (0-based)")
    worker.add_argument("--config", required=True, help="the run's participant config file")
    worker.add_argument("--policy", default=None,
                        help="the run's signed policy file (default: deployment.policy_path); "
                        "a joiner of a hosted run keeps its copy in its own folder")
    worker.add_argument("--data", default=None,
                        help="this site's CIFAR-10 folder (default: the config's data_path); "
                        "the data are the site's own, the shard is still chosen by --index")
    add_trust_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args_list = list(sys.argv[1:] if argv is None else argv)
    args = _parser().parse_args(args_list)
    configure_logging()
    role = {"ps": "ps0", "trust": "trust"}.get(args.role) or f"worker{args.index}"
    emitter = Emitter(role)
    stop = StopFlag()

    def on_signal(signum: int, frame: Any) -> None:
        # A pod's stop reaches the participant twice: the signal to the process group and
        # the entrypoint's forwarded one. Only the first interrupts; a second one landing in
        # the shutdown below must not break it (it made a clean stop exit with 130). Nor one
        # landing later, in the interpreter's own shutdown, where Python puts the default
        # disposition back for a handler it installed (exit -15): from the first one on the
        # stop is under way and SIGTERM is ignored (SIGKILL still ends a shutdown that hangs).
        if stop.is_set():
            return
        stop.set()
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_signal)
    try:
        if args.role == "ps":
            return run_ps(args, args_list, emitter, stop)
        if args.role == "trust":
            return run_trust(args, args_list, emitter, stop)
        if args.index < 0:
            raise ConfigError(f"--index must be >= 0, got {args.index}.", fix="use 0..workers-1.")
        return run_worker(args, args_list, emitter)
    except KeyboardInterrupt:
        emitter.lifecycle("exited", detail="stopped")
        return 0 if stop.is_set() else 130
    except HflLabError as e:
        print(f"{role}: {e}", file=sys.stderr)
        emitter.lifecycle("failed", detail=str(e))
        return 1


def _participant(role: str, args_list: Sequence[str], config: ParticipantConfig,
                 emitter: Emitter, policy_path: str | None = None) -> Participant:
    boot = read_bootstrap()
    emitter.lifecycle("starting")
    policy = load_run_policy(config, policy_path) if policy_path else None
    return Participant(role, config, measured_argv("trainer", args_list), boot, emitter,
                       policy=policy)


def open_checkpoint_store(
    config: ParticipantConfig,
    participant: Participant,
    trust: TrustClient,
    session: MeshSession,
) -> CheckpointStore | None:
    """Where ps0 keeps checkpoints: the LUKS volume at ``deployment.vault_path`` (opened, or on a
    cluster first created, with the passphrase the key broker releases to ps0's attested TD,
    every checkpoint signed), else
    a plain ``checkpoint_dir`` (a run without the vault), else nowhere."""
    deployment = config.deployment
    if deployment.vault_path:
        return open_vault_store(participant, trust, lambda: session.creds,
                                deployment.vault_path, data_path=deployment.vault_data_path,
                                create_size_mb=deployment.vault_size_mb)
    if deployment.checkpoint_dir:
        return DirectoryCheckpointStore(Path(deployment.checkpoint_dir))
    return None


def run_ps(args: argparse.Namespace, args_list: Sequence[str], emitter: Emitter,
           stop: StopFlag) -> int:
    config = ParticipantConfig.load(args.config)
    run_from_image("ps0", args_list, config, emitter)  # with an image: pull, exec, no return
    from trainer.serving import build_parameter_server  # lazy: TensorFlow

    participant = _participant("ps0", args_list, config, emitter)
    trust = participant.connect_trust()
    session = MeshSession(participant, trust, participant.attest(trust),
                          every_s=config.lab.reattest_every_s)
    session.start()
    host, _, port = config.deployment.ps_address.rpartition(":")
    # A pod listens on every interface behind its Service; a local run on its loopback address.
    local = host[:1].isdigit() or host == "localhost"
    bind = args.host or (host if local else "0.0.0.0")  # noqa: S104
    store = open_checkpoint_store(config, participant, trust, session)
    running = build_parameter_server(
        config, participant, lambda: session.creds, emit=emitter.emit,
        store=store, host=bind, port=int(port),
    )
    emitter.lifecycle("ready", detail=f"serving on {bind}:{running.port}", port=running.port,
                      version=running.servicer.version)
    try:
        while not running.servicer.finished.wait(0.5):
            pass
        if args.exit_when_done:
            running.servicer.wait_workers_released(timeout_s=30.0)
            emitter.lifecycle("exited", detail="training finished")
            return 0
        emitter.log("training finished; serving the final model until stopped")
        while not stop.wait(1.0):
            pass
        return 0
    finally:
        session.stop()
        running.stop()
        close = getattr(store, "close", None)
        if close is not None:
            close()
        trust.close()


def run_worker(args: argparse.Namespace, args_list: Sequence[str], emitter: Emitter) -> int:
    config = ParticipantConfig.load(args.config)
    if args.index >= config.lab.workers:
        raise ConfigError(
            f"--index {args.index} is outside this run's {config.lab.workers} workers.",
            fix=f"use an index from 0 to {config.lab.workers - 1}.",
        )
    role = f"worker{args.index}"
    run_from_image(role, args_list, config, emitter)  # with an image: pull, exec, no return
    from trainer.serving import build_worker  # lazy: TensorFlow

    if args.data:
        # the site's own copy of the data; the measured document (MR_CONFIG_ID) is unchanged
        config = dataclasses.replace(config, lab=config.lab.replace(data_path=args.data))
    participant = _participant(role, args_list, config, emitter, args.policy)
    trust = participant.connect_trust()
    session = MeshSession(participant, trust, participant.attest(trust),
                          every_s=config.lab.reattest_every_s)
    session.start()
    ready_file = config.deployment.ready_file

    def registered(reply: Any) -> None:
        if ready_file:
            path = Path(ready_file)
            path.parent.mkdir(parents=True, exist_ok=True)
            path.touch()
        emitter.lifecycle("ready", detail=f"registered at step {reply.model_version}",
                          version=reply.model_version)

    worker = build_worker(config, participant, lambda: session.creds, args.index,
                          emit=emitter.emit, on_registered=registered,
                          generation=lambda: session.generation,
                          reattest=lambda: session.reconnect(config.deployment.connect_timeout_s))
    started = time.monotonic()
    try:
        summary = worker.run()
    finally:
        session.stop()
        session.client.close()  # the trust client now (reconnect() may have replaced it)
    emitter.lifecycle(
        "exited",
        detail=f"{len(summary.steps)} steps in {time.monotonic() - started:.1f} s, "
        f"last step {summary.final_version}, {summary.reconnects} reconnects",
        steps=len(summary.steps), reconnects=summary.reconnects,
    )
    return 0
