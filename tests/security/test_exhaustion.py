"""R8, issue 18 item 9: no caller can make the trust service or the PS hold without bound.

- The trust service (unauthenticated callers): request fields are bounded before anything is
  logged, so a refused call with a 4 MB role leaves a record of a few hundred bytes; the audit
  log keeps its newest records in memory and the rest in a rotated file; challenges expire in
  constant work per call (counted: entries the nonce store looks at), are capped in number, and
  each address gets a token bucket of them.
- The PS (an attested worker): a pull for a step far in the future is refused at once, a pull's
  wait and an event watch are bounded in time, and each role holds at most a few of them at
  once, so one worker cannot take the PS's RPC threads from the others.

Figures are counted, never timed: bytes of the audit records, entries examined, calls refused
and calls held by the server.
"""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from hfl_lab._exceptions import TooManyChallenges
from hfl_lab.ratls import RaTlsIdentity
from hfl_lab.trust.audit import AuditLog
from hfl_lab.trust.broker import DEFAULT_APP_ID
from hfl_lab.trust.nonces import NonceStore
from hfl_lab.trust.proto import trust_pb2 as tpb
from hfl_lab.trust.service import TrustService, serve
from tests.mesh_support import Mesh, start_mesh
from tests.reliability_report import record
from tests.security.test_role_binding import tiny_ps
from tests.td_support import PLATFORM, lab_policy, provider
from tests.trust_support import Running, connect, start
from trainer.proto import parameter_server_pb2 as pb
from trainer.proto import parameter_server_pb2_grpc as ps_rpc
from trainer.ps import ParameterServer
from trainer.worker import PsConnection

HUGE_CALLS = 20
#: what the audit log may hold after the refused calls: a few KiB per record at most
AUDIT_BOUND_BYTES = HUGE_CALLS * 4096


@pytest.fixture()
def trust(tmp_path: Path) -> Iterator[Running]:
    running = start(tmp_path, owner_key=os.urandom(32))
    yield running
    running.server.stop(0)


def audit_bytes(audit: AuditLog) -> int:
    return sum(len(json.dumps(entry)) for entry in audit.entries)


# -- the trust service ------------------------------------------------------------------------


@pytest.mark.parametrize("chars", [4_000_000, 1_000_000])
def test_refused_calls_with_huge_fields_leave_bounded_audit_records(
    trust: Running, chars: int
) -> None:
    identity = RaTlsIdentity()
    huge = "w" * chars
    codes = []
    with connect(trust) as client:
        for i in range(HUGE_CALLS):
            nonce = client.stub.GetChallenge(tpb.ChallengeRequest(role="worker0"),
                                             timeout=30).nonce
            try:
                if i % 2:
                    client.stub.Attest(tpb.AttestRequest(
                        role=huge, nonce=nonce, public_key=identity.spki_der,
                        evidence_json="{}"), timeout=60)
                else:
                    client.stub.ReleaseSecret(tpb.ReleaseRequest(
                        app_id=DEFAULT_APP_ID, name=huge[:chars // 2], role="ps0",
                        nonce=nonce, public_key=identity.spki_der,
                        evidence_json="{}"), timeout=60)
            except grpc.RpcError as e:
                codes.append(e.code())
            else:
                codes.append(grpc.StatusCode.OK)

    held = audit_bytes(trust.service.audit)
    record("R8", f"refused calls with a {chars // 1_000_000} MB field", tried=HUGE_CALLS,
           held=HUGE_CALLS if held <= AUDIT_BOUND_BYTES else 0, lost=0, secrets_released=0,
           certificates_wrongly_issued=0, audit_bytes=held)
    assert grpc.StatusCode.OK not in codes
    assert held <= AUDIT_BOUND_BYTES, f"the audit log holds {held} bytes"
    assert trust.service.issued == 0 and trust.service.broker.released == 0


def test_audit_log_keeps_its_newest_records_and_rotates_the_rest_to_disk(
    tmp_path: Path,
) -> None:
    path = tmp_path / "audit.jsonl"
    audit = AuditLog(path, keep=10, max_file_bytes=4096, generations=2)

    for i in range(200):
        audit.record("attest", subject=f"worker{i}", allowed=False, reason="x" * 100_000)

    kept = audit.entries
    files = sorted(tmp_path.glob("audit.jsonl*"))
    record("R8", "audit log bounded in memory and on disk", held=int(len(kept) == 10), lost=0,
           secrets_released=0, certificates_wrongly_issued=0, records_in_memory=len(kept),
           files=len(files))
    assert [e["subject"] for e in kept] == [f"worker{i}" for i in range(190, 200)]
    assert [index for index, _ in audit.since(0)] == list(range(190, 200))
    assert audit.count == 200
    assert all(len(e["reason"]) < 2048 for e in kept)  # long texts are cut, and say so
    assert "more characters" in kept[-1]["reason"]
    assert [p.name for p in files] == ["audit.jsonl", "audit.jsonl.1", "audit.jsonl.2"]
    assert all(p.stat().st_size <= 4096 + 2048 for p in files)
    last = json.loads(path.read_text().splitlines()[-1])
    assert last["subject"] == "worker199"


def test_challenges_expire_in_constant_work_per_call() -> None:
    now = [1000.0]
    store = NonceStore(ttl_s=60.0, clock=lambda: now[0])
    live = 20_000
    for _ in range(live):
        store.issue()
    examined = store.examined

    store.issue()  # one more, with 20,000 live challenges
    one_call = store.examined - examined
    now[0] += 2 * 60.0 + 1  # every one of them is now past keeping
    examined = store.examined
    store.issue()
    expiry = store.examined - examined
    examined = store.examined
    store.issue()
    after = store.examined - examined

    record("R8", "challenge expiry work per call", held=int(one_call <= 2 and after <= 2),
           lost=0, secrets_released=0, certificates_wrongly_issued=0,
           examined_with_20000_live=one_call, examined_expiring_20001=expiry)
    assert one_call <= 2, f"one GetChallenge looked at {one_call} live challenges"
    assert expiry <= live + 2  # each challenge is looked at once when it expires ...
    assert after <= 2  # ... and never again
    assert len(store) == 2  # the two issued after the expiry


def test_open_challenges_are_capped() -> None:
    store = NonceStore(ttl_s=60.0, clock=lambda: 1000.0, capacity=100)
    for _ in range(100):
        store.issue()

    with pytest.raises(TooManyChallenges, match="open challenges") as refused:
        store.issue()
    assert refused.value.fix
    assert len(store) == 100


def serve_limited(burst: int) -> tuple[TrustService, grpc.Server, str]:
    service = TrustService(policy=lab_policy(), admin_token=os.urandom(32),
                           lab_root_der=PLATFORM.root_der, challenge_burst=burst,
                           challenges_per_s=1e-9)  # no refill within the test
    identity = RaTlsIdentity()
    identity.make_certificate(provider("trust"), subject_cn="trust", role="trust")
    server, port = serve(service, identity.certificate_pem, identity.private_key_pem())
    return service, server, f"127.0.0.1:{port}"


def test_a_burst_of_challenges_from_one_address_is_rate_limited() -> None:
    service, server, address = serve_limited(burst=8)
    codes: list[grpc.StatusCode] = []
    details = ""
    try:
        running = Running(service, server, address, b"", [])
        with connect(running) as client:
            for _ in range(20):
                try:
                    client.stub.GetChallenge(tpb.ChallengeRequest(role="worker0"), timeout=30)
                except grpc.RpcError as e:
                    codes.append(e.code())
                    details = e.details() or ""
                else:
                    codes.append(grpc.StatusCode.OK)
    finally:
        server.stop(0)

    granted = codes.count(grpc.StatusCode.OK)
    record("R8", "burst of 20 challenges, bucket of 8", tried=20, held=20 - max(0, granted - 8),
           lost=0, secrets_released=0, certificates_wrongly_issued=0, granted=granted)
    assert granted == 8
    assert set(codes[8:]) == {grpc.StatusCode.RESOURCE_EXHAUSTED}
    assert "challenges" in details and "Fix:" in details, details
    assert len(service.nonces) == 8


# -- the parameter server ---------------------------------------------------------------------


class Ps:
    """A small PS on the attested mesh with worker0 registered on its own connection."""

    def __init__(self, tmp_path: Path) -> None:
        self.mesh: Mesh = start_mesh(tmp_path, workers=2)
        self.servicer: ParameterServer = tiny_ps()
        self.address = self.mesh.serve(self.servicer, num_workers=2)
        self.worker0 = PsConnection(self.mesh.connect("worker0", self.address)())
        self.worker0.register("worker0", 0)

    def stub(self, conn: PsConnection) -> Any:
        return ps_rpc.ParameterServerStub(conn.channel)

    def close(self) -> None:
        self.worker0.close()
        self.servicer.close()
        self.mesh.close()


@pytest.fixture()
def ps(tmp_path: Path) -> Iterator[Ps]:
    running = Ps(tmp_path)
    yield running
    running.close()


def first_reply(calls: Iterator[Any]) -> grpc.StatusCode:
    try:
        next(calls)
    except StopIteration:
        return grpc.StatusCode.OK
    except grpc.RpcError as e:
        assert e.details(), "every refusal says why"
        return e.code()
    return grpc.StatusCode.OK


def test_a_pull_for_a_step_far_ahead_is_refused_at_once(ps: Ps) -> None:
    stub = ps.stub(ps.worker0)
    far = ps.servicer.version + 1_000_000

    code = first_reply(stub.PullParameters(pb.PullRequest(worker_id="worker0",
                                                          min_version=far), timeout=30))

    record("R8", "pull for a step 10^6 ahead", held=int(code == grpc.StatusCode.INVALID_ARGUMENT),
           lost=0, secrets_released=0, certificates_wrongly_issued=0)
    assert code == grpc.StatusCode.INVALID_ARGUMENT


def test_a_pull_waits_only_as_long_as_the_ps_allows(ps: Ps) -> None:
    ps.servicer.max_pull_wait_s = 0.0
    stub = ps.stub(ps.worker0)
    calls = stub.PullParameters(pb.PullRequest(worker_id="worker0",
                                               min_version=ps.servicer.version + 1), timeout=30)
    try:
        next(calls)
    except grpc.RpcError as e:
        code, details = e.code(), e.details() or ""
    else:
        code, details = grpc.StatusCode.OK, ""

    held = code == grpc.StatusCode.DEADLINE_EXCEEDED and "pull again" in details
    record("R8", "pull wait bounded by the PS", held=int(held), lost=0, secrets_released=0,
           certificates_wrongly_issued=0)
    assert code == grpc.StatusCode.DEADLINE_EXCEEDED
    assert "pull again" in details, details  # the PS's answer, not the client's deadline


def test_an_event_watch_ends_when_its_time_is_up(ps: Ps) -> None:
    ps.servicer.max_watch_s = 0.0
    stub = ps.stub(ps.worker0)

    events = list(stub.WatchEvents(pb.WatchRequest(), timeout=30))  # ends, with what there was

    record("R8", "event watch bounded in time", held=1, lost=0, secrets_released=0,
           certificates_wrongly_issued=0, events=len(events))
    assert events and events[0].kind == "log"  # worker0's registration


class Outcomes:
    """The first reply of each long call, as the calls' threads get them."""

    def __init__(self) -> None:
        self.codes: list[grpc.StatusCode] = []
        self.cond = threading.Condition()

    def run(self, start: Callable[[], Iterator[Any]]) -> Any:
        calls = start()

        def first() -> None:
            code = first_reply(calls)
            with self.cond:
                self.codes.append(code)
                self.cond.notify_all()

        threading.Thread(target=first, daemon=True).start()
        return calls

    def wait_for(self, count: int) -> bool:
        with self.cond:
            return self.cond.wait_for(lambda: len(self.codes) >= count, timeout=60)


def test_one_worker_cannot_hold_the_ps_threads(ps: Ps) -> None:
    # Arrange: worker0 opens far more long calls than the PS has threads (16): pulls that
    # wait for the next step and event watches
    stub = ps.stub(ps.worker0)
    attempts = 12
    outcomes = Outcomes()
    calls = []
    for _ in range(attempts):
        calls.append(outcomes.run(lambda: stub.PullParameters(pb.PullRequest(
            worker_id="worker0", min_version=ps.servicer.version + 1))))
        calls.append(outcomes.run(lambda: stub.WatchEvents(pb.WatchRequest(since_seq=10**9))))
    try:
        # Act: wait until every call beyond the per-role limits has been answered
        servicer = ps.servicer
        limit = servicer.pull_quota.limit + servicer.watch_quota.limit
        answered = outcomes.wait_for(2 * attempts - limit)
        assert servicer.pull_quota.wait_until_held("worker0", servicer.pull_quota.limit)
        assert servicer.watch_quota.wait_until_held("worker0", servicer.watch_quota.limit)
        # another worker is still served
        other = PsConnection(ps.mesh.connect("worker1", ps.address)())
        other.register("worker1", 1)
        status = ps.stub(other).Status(pb.StatusRequest(), timeout=30)
        other.close()
    finally:
        for call in calls:
            call.cancel()

    refused = outcomes.codes.count(grpc.StatusCode.RESOURCE_EXHAUSTED)
    record("R8", "one worker's long calls against the PS's threads", tried=2 * attempts,
           held=refused + limit if answered else 0, lost=0, secrets_released=0,
           certificates_wrongly_issued=0, threads_held=limit, refused=refused)
    assert answered, f"only {len(outcomes.codes)} calls were answered"
    assert refused == 2 * attempts - limit
    assert limit <= 4
    assert status.state == "training" and len(status.workers) == 2
