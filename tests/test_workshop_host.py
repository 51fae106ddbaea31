"""Hosting a cross-silo run (issue 23 item 2): the trust service and ps0 listen on the chosen
address, the join links name them and the trust service's measurements, and the host refuses a
link it did not issue; bad host parameters are refused before anything starts."""

from __future__ import annotations

import dataclasses
import hashlib
import socket
from pathlib import Path

import pytest

from hfl_lab import AttestationError, ConfigError
from hfl_lab.cli import main
from hfl_lab.events import LabEvent
from hfl_lab.lab.joining import verify_host
from hfl_lab.lab.workshop import HostedRun, SlotBoard
from tests.local_support import quick_config

# a loopback address other than 127.0.0.1: what the participants use is the address named,
# not the default; the network-namespace test (later) uses addresses on veth pairs
HOST = "127.0.0.23"


def _refused(address: str) -> bool:
    host, _, port = address.rpartition(":")
    with socket.socket() as s:
        s.settimeout(5)
        return s.connect_ex((host, int(port))) != 0


@pytest.mark.slow
def test_the_host_serves_on_its_address_and_prints_one_link_per_slot(
    tmp_path: Path, cifar_dir: Path
) -> None:
    config = quick_config(tmp_path, cifar_dir, workers=1, vault=False, checkpoint_every=0)
    with HostedRun(config, address=HOST, slots=3, quorum=2) as run:
        links = run.start(timeout_s=180)

        # Assert: both services listen on the named address, and only there
        backend = run.backend
        assert backend.trust_address.startswith(f"{HOST}:")
        assert backend.ps_address.startswith(f"{HOST}:")
        assert not _refused(backend.trust_address) and not _refused(backend.ps_address)
        assert _refused("127.0.0.1:" + backend.trust_address.rpartition(":")[2])
        # no worker was launched here: the slots are for joiners
        assert set(backend.participants) == {"trust", "ps0"}
        assert run.config.workers == 3 and run.config.sync_quorum == 2
        assert run.config.quorum_rule == "live"
        assert [link.slot for link in links] == ["worker0", "worker1", "worker2"]
        policy = hashlib.sha256(backend.policy_path.read_bytes()).hexdigest()
        trust = backend.measurements["trust"].summary()
        for link in links:
            parsed = run.check_enrollment(link.encode())
            assert parsed.trust_address == backend.trust_address
            assert parsed.ps_address == backend.ps_address
            assert parsed.policy_sha256 == policy
            parsed.check_trust_service(trust)
        # the policy names every slot's role, bound to its measurements
        assert backend.policy is not None
        assert {"worker0", "worker1", "worker2", "ps0"} <= set(backend.policy.roles)
        # the joiner's first step: the trust service is the one the link names
        verdict = verify_host(links[0])
        assert verdict.accepted and verdict.simulated
        assert verdict.measurements["mr_config_id"] == trust["mr_config_id"]
        wrong = dict(links[0].trust_measurements, mr_config_id="ee" * 48)
        with pytest.raises(AttestationError, match="mr_config_id is ") as info:
            verify_host(dataclasses.replace(links[0], trust_measurements=wrong))
        assert info.value.check == "mr_config_id" and info.value.actual == trust["mr_config_id"]
        with pytest.raises(AttestationError, match="root the join link does not name"):
            verify_host(dataclasses.replace(links[0], lab_root_sha256="00" * 32))
        other = HostedRun(config, address=HOST, slots=3)
        with pytest.raises(ConfigError, match="not issued by this host"):
            other.check_enrollment(links[0].encode())


@pytest.mark.parametrize(
    ("kwargs", "words"),
    [({"address": "0.0.0.0", "slots": 2}, "not an address a joiner can reach"),
     ({"address": "laptop.local", "slots": 2}, "must be an IPv4 address"),
     ({"address": HOST, "slots": 0}, "at least one worker slot")],
)
def test_bad_host_parameters_are_refused_before_anything_starts(
    tmp_path: Path, cifar_dir: Path, kwargs, words
) -> None:
    config = quick_config(tmp_path, cifar_dir)

    with pytest.raises(ConfigError, match=words):
        HostedRun(config, **kwargs)

    assert not (tmp_path / "run").exists()


def test_the_quorum_cannot_exceed_the_slots(tmp_path: Path, cifar_dir: Path) -> None:
    with pytest.raises(ConfigError, match="sync_quorum"):
        HostedRun(quick_config(tmp_path, cifar_dir), address=HOST, slots=2, quorum=3)


def test_the_cli_refuses_an_unreachable_address_with_exit_code_2(
    tmp_path: Path, cifar_dir: Path, capsys
) -> None:
    code = main(["host", "--address", "0.0.0.0", "-p", f"data_path={cifar_dir}",
                 "-p", f"run_dir={tmp_path / 'run'}"])

    assert code == 2
    assert "joiners' network" in capsys.readouterr().err


def test_the_board_follows_a_slot_through_attestation_registration_and_training() -> None:
    board = SlotBoard.for_slots(2)

    lines = [
        board.update(LabEvent("attestation", "trust",
                              {"subject": "worker1", "accepted": True, "reason": ""})),
        board.update(LabEvent("log", "ps0", {"peer": "worker1", "level": "info",
                                             "message": "worker1 registered at step 4"})),
        board.update(LabEvent("metrics", "ps0", {"role": "worker1", "step": 5, "loss": 2.1})),
        board.update(LabEvent("metrics", "ps0", {"role": "worker1", "step": 6, "loss": 2.0})),
        board.update(LabEvent("attestation", "trust",
                              {"subject": "unknown", "accepted": False,
                               "reason": "mr_td does not match"})),
        board.update(LabEvent("log", "ps0", {"level": "info", "message":
                                             "quorum K=1 of the live workers (rule K=2) at "
                                             "step 9"})),
    ]

    assert lines[:3] == ["worker1: attested (evidence accepted)",
                         "worker1: joined (worker1 registered at step 4)",
                         "worker1: training (step 5)"]
    assert lines[3] is None
    assert lines[4] == "refused unknown: mr_td does not match"
    assert lines[5] is not None and lines[5].startswith("quorum K=1 of the live workers")
    assert board.rows()[0]["state"] == "waiting"
    assert board.rows()[1] == {"slot": "worker1", "state": "training", "step": 6,
                               "detail": "step 5"}


def test_a_link_issued_for_a_slot_the_run_lacks_is_refused(tmp_path: Path,
                                                           cifar_dir: Path) -> None:
    run = HostedRun(quick_config(tmp_path, cifar_dir), address=HOST, slots=2)

    with pytest.raises(ConfigError, match="no slot 'worker5'"):
        run.issue_link("worker5")
