"""``python -m trainer trust --config FILE --policy FILE --port N``: the trust service's TD.

The trust service (:mod:`hfl_lab.trust`) is TD runtime; this is the process around it, as the
workload image runs it, next to ``python -m trainer ps|worker``. Its own RA-TLS certificate binds
its in-memory key to its TD evidence, so clients verify it before handing it anything.

The owner's admin credential never comes with the launch: the service starts knowing only the
owner's public policy key (``deployment.policy_key`` in its measured config), announces
``provisioning`` with its port, and waits until the owner, having verified this TD's evidence,
sends the credential over the pinned channel (``Provision``, :mod:`hfl_lab.trust.owner_gate`).
Only then does it unseal its state, make the model volume's passphrase, and announce ``ready``.
For a simulated TD the lab platform's keys arrive on stdin from the launcher, or in a pod from
the tmpfs Secret volume that ``$HFL_LAB_BOOTSTRAP_FILE`` names (see
:func:`trainer.participant.read_bootstrap`); a real TD gets nothing that way. Events (verdicts,
audit records, lifecycle) go to stdout as JSON lines.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

from hfl_lab._exceptions import ConfigError
from hfl_lab.tee.policy import SIGNATURE_SUFFIX, AttestationPolicy
from hfl_lab.trust.broker import DEFAULT_APP_ID
from hfl_lab.trust.enrollment import EnrollmentDesk, RunDocuments
from hfl_lab.trust.service import TrustService, serve
from hfl_lab.vault.keyrelease import VOLUME_SECRET_NAME, check_release_policy
from hfl_lab.vault.model_vault import new_passphrase
from trainer.participant import (
    Emitter,
    Participant,
    StopFlag,
    load_run_policy,
    measured_argv,
    read_bootstrap,
)
from trainer.participant_config import ParticipantConfig

__all__ = ["add_trust_parser", "run_trust"]


def add_trust_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    run = sub.add_parser("trust", help="the trust service: attest participants, issue mesh "
                         "certificates, release secrets")
    run.add_argument("--config", required=True, help="the run's participant config file")
    run.add_argument("--policy", required=True, help="the owner's attestation policy (YAML)")
    run.add_argument("--port", type=int, default=50060, help="TLS port (0 = any free port)")
    run.add_argument("--host", default=None,
                     help="listen address (default: from trust_address in the config)")
    run.add_argument("--state", default=None,
                     help="seal the policy and the registered secrets into this file (sealed "
                     "under a key derived from the owner's credential, which arrives by "
                     "Provision), and resume from it when it exists: a restarted service "
                     "still releases the volume passphrase")
    run.add_argument("--volume-policy", default=None,
                     help="generate the model volume's passphrase here, in this TD, and "
                     "register it under this release policy (YAML) for ps0, which creates the "
                     "volume (the cluster way; needs --state, the owner's way to it later)")


def run_trust(args: argparse.Namespace, args_list: Sequence[str], emitter: Emitter,
              stop: StopFlag) -> int:
    config = ParticipantConfig.load(args.config)
    policy = load_run_policy(config, args.policy)
    boot = read_bootstrap()
    emitter.lifecycle("starting")
    if not config.deployment.policy_key:
        raise ConfigError(
            "the participant config names no owner policy key (deployment.policy_key), so "
            "this trust service could not tell its owner's credential from anyone else's.",
            fix="start the trust service through a backend, which writes the owner's policy "
            "key into the run's config.",
        )
    me = Participant("trust", config, measured_argv("trainer", args_list), boot, emitter,
                     policy=policy)
    volume_policy = (load_run_policy(config, args.volume_policy) if args.volume_policy
                     else None)
    if volume_policy is not None:
        check_release_policy(volume_policy)

    def on_provisioned(service: TrustService) -> None:
        if volume_policy is not None:
            _generate_volume_passphrase(service, volume_policy, emitter)

    service = TrustService(
        policy=policy,
        policy_key=config.deployment.policy_key,
        on_provisioned=on_provisioned,
        lab_root_der=boot.platform.root_der if boot.platform else None,
        on_event=emitter.emit,
        cert_lifetime_s=config.lab.cert_lifetime_s,
        state_path=Path(args.state) if args.state else None,
        enrollment=EnrollmentDesk(_run_documents(args), boot.platform),
    )
    me.identity.make_certificate(me.provider, subject_cn="trust", role="trust")
    address_host = config.deployment.trust_address.rpartition(":")[0]
    # A pod listens on every interface behind its Service; a local run on its loopback address.
    local = address_host[:1].isdigit() or address_host == "localhost"
    host = args.host or (address_host if local else "0.0.0.0")  # noqa: S104
    server, port = serve(service, me.identity.certificate_pem, me.identity.private_key_pem(),
                         host=host, port=args.port)
    emitter.lifecycle("provisioning", port=port,
                      detail=f"listening on {host}:{port}; awaiting the owner's credential")
    try:
        while not service.wait_provisioned(0.5):
            if stop.is_set():
                raise KeyboardInterrupt
        emitter.lifecycle("ready", detail=f"serving on {host}:{port}", port=port)
        while not stop.wait(0.5):
            pass
    except KeyboardInterrupt:
        pass
    finally:
        server.stop(1).wait()
    emitter.lifecycle("exited", detail=f"issued {service.issued} mesh certificates")
    return 0


def _run_documents(args: argparse.Namespace) -> RunDocuments:
    """What a joiner of a hosted run receives: the config and policy this service started
    with, byte for byte (the enrollment desk adds, in a simulated run, keys for its slot)."""
    signature = Path(args.policy + SIGNATURE_SUFFIX)
    return RunDocuments(
        config_yaml=Path(args.config).read_text(encoding="utf-8"),
        policy_yaml=Path(args.policy).read_text(encoding="utf-8"),
        policy_signature=signature.read_text().strip() if signature.exists() else "",
    )


def _generate_volume_passphrase(service: TrustService, release: AttestationPolicy,
                                emitter: Emitter) -> None:
    """The model volume's passphrase, born in this TD (unless the sealed state has it)."""
    made = service.generate_secret(DEFAULT_APP_ID, VOLUME_SECRET_NAME, release, new_passphrase)
    emitter.log(
        "model volume passphrase "
        + ("generated in this TD and registered for "
           f"{', '.join(sorted(release.roles)) or 'the PS'} only; sealed for the owner"
           if made else "kept from the sealed state (a volume may already use it)")
    )
