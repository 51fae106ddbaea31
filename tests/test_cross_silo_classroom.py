"""Cross-silo in a classroom (issue 23 "Must show"): ``hfl-lab host`` and four attendees'
``hfl-lab join``, over a real network where the machine allows it.

In network namespaces (root, ``ip netns``): a host namespace and four joiner namespaces on one
bridged LAN, each joiner on its own veth pair and address, its loopback down, so nothing reaches
the host by a loopback shortcut. Where namespaces cannot be made, the same scenario runs on
loopback addresses and the namespace case skips saying why (and the other way round, so the
scenario runs once).

The scenario holds the run where the test needs it, never on timing: the host wants at least
two live workers (``--min-workers 2``), so no step completes until two are in, and none while
one of two has left.

1-3 start together:
1. joiner 2 runs edited worker code: refused at attestation, MR_TD named on both screens;
2. joiner 0 joins (alone it cannot train: one live worker of the two the host wants);
3. joiner 1 joins, the two train; joiner 1 leaves after 5 steps the way Ctrl-C does
   (``--leave-after``): it tells ps0, which holds the run at once (no lease to wait out);
4. joiner 3 joins late, starts from the run's step, and finishes the run with joiner 0.

The run completes, the loss falls, and the host's board and the trust service's audit record
each outcome.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from hfl_lab.config.join_link import JoinLink

REPO = Path(__file__).resolve().parents[1]
PREFIX = f"hfl{os.getpid() % 100000}"
TIMEOUT_S = 300.0
STEPS = 120
JOINERS = 4
LEAVE_AFTER = 5


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, text=True, timeout=30)


def _netns_unavailable() -> str | None:
    if os.environ.get("HFL_LAB_TEST_NETNS") == "0":
        return "HFL_LAB_TEST_NETNS=0 asks for loopback addresses"
    if os.geteuid() != 0:
        return "network namespaces need root (ip netns add), and this test runs as a user"
    if shutil.which("ip") is None:
        return "the ip command (iproute2) is not installed"
    probe = f"{PREFIX}probe"
    try:
        _ip("netns", "add", probe)
    except (subprocess.CalledProcessError, OSError) as e:
        detail = getattr(e, "stderr", "") or str(e)
        return f"cannot create a network namespace here: {detail.strip()}"
    _ip("netns", "del", probe)
    return None


@dataclass(frozen=True)
class Network:
    """Where the host listens and how each party's command is started."""

    host_ip: str
    host_prefix: list[str]
    joiner_prefixes: list[list[str]]


def _namespaces() -> Iterator[Network]:
    """The host namespace and the joiners' on one LAN (a classroom's Wi-Fi): a bridge in the
    host namespace holds the host's address, and joiner k is 10.231.0.(k+2) on a veth pair
    whose other end is a port of that bridge. The joiners' loopback devices stay down."""
    host_ns, host_ip, bridge = f"{PREFIX}h", "10.231.0.1", f"{PREFIX}br"
    made: list[str] = []
    try:
        _ip("netns", "add", host_ns)
        made.append(host_ns)
        _ip("-n", host_ns, "link", "add", bridge, "type", "bridge")
        _ip("-n", host_ns, "addr", "add", f"{host_ip}/24", "dev", bridge)
        _ip("-n", host_ns, "link", "set", bridge, "up")
        # the host's own trust service, ps0 and owner side reach its address through the
        # kernel's loopback device, as on any machine
        _ip("-n", host_ns, "link", "set", "lo", "up")
        joiners = []
        for k in range(JOINERS):
            ns = f"{PREFIX}j{k}"
            _ip("netns", "add", ns)
            made.append(ns)
            port, nic = f"{PREFIX}p{k}", f"{PREFIX}n{k}"
            _ip("link", "add", port, "netns", host_ns, "type", "veth", "peer", "name", nic,
                "netns", ns)
            _ip("-n", host_ns, "link", "set", port, "master", bridge)
            _ip("-n", host_ns, "link", "set", port, "up")
            _ip("-n", ns, "addr", "add", f"10.231.0.{k + 2}/24", "dev", nic)
            _ip("-n", ns, "link", "set", nic, "up")
            joiners.append(["ip", "netns", "exec", ns])
        yield Network(host_ip, ["ip", "netns", "exec", host_ns], joiners)
    finally:
        for ns in reversed(made):  # deleting a namespace removes its devices too
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=30)


@pytest.fixture(params=["netns", "loopback"])
def network(request: pytest.FixtureRequest) -> Iterator[Network]:
    reason = _netns_unavailable()
    if request.param == "netns":
        if reason:
            pytest.skip(f"{reason}; the scenario runs on loopback addresses instead")
        yield from _namespaces()
    else:
        if not reason:
            pytest.skip("the scenario ran in network namespaces (the netns case)")
        yield Network("127.0.0.23", [], [[] for _ in range(JOINERS)])


class Lines:
    """A process's output lines as they come, and a wait on them (no sleeps)."""

    def __init__(self, stream, sink: list[str] | None = None) -> None:
        self.lines: list[str] = [] if sink is None else sink
        self._cond = threading.Condition()
        self._ended = False
        threading.Thread(target=self._read, args=(stream,), daemon=True).start()

    def _read(self, stream) -> None:
        for line in stream:
            with self._cond:
                self.lines.append(line.rstrip("\n"))
                self._cond.notify_all()
        with self._cond:
            self._ended = True
            self._cond.notify_all()

    def wait_for(self, what: Callable[[list[str]], bool], label: str) -> None:
        with self._cond:
            if not self._cond.wait_for(lambda: what(self.lines) or self._ended, TIMEOUT_S):
                raise AssertionError(f"timed out waiting for {label}:\n" + "\n".join(
                    self.lines[-30:]))
            if not what(self.lines):
                raise AssertionError(f"output ended before {label}:\n" + "\n".join(
                    self.lines[-30:]))

    def wait_end(self) -> None:
        with self._cond:
            self._cond.wait_for(lambda: self._ended, TIMEOUT_S)


def _start(prefix: list[str], args: list[str], root: Path) -> subprocess.Popen[str]:
    """``hfl-lab <args>`` behind ``prefix`` (``ip netns exec <ns>`` or nothing), running the
    checkout at ``root``."""
    env = {**os.environ, "PYTHONPATH": str(root), "KERAS_BACKEND": "tensorflow",
           "TF_CPP_MIN_LOG_LEVEL": "2"}
    return subprocess.Popen([*prefix, sys.executable, "-m", "hfl_lab.cli", *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=env, cwd=root, start_new_session=True)


def board_before(line: str, lines: list[str]) -> str:
    """The host's lines up to ``line``."""
    return "\n".join(lines[:lines.index(line) + 1])


def _steps(lines: list[str]) -> list[tuple[int, float]]:
    out = []
    for line in lines:
        if " step " in line and ": loss " in line:
            head, _, loss = line.partition(": loss ")
            out.append((int(head.rsplit(" ", 1)[1]), float(loss)))
    return out


def _edited_checkout(tmp_path: Path) -> Path:
    root = tmp_path / "edited"
    for package in ("hfl_lab", "trainer"):
        shutil.copytree(REPO / package, root / package,
                        ignore=shutil.ignore_patterns("__pycache__"))
    with (root / "trainer" / "worker.py").open("a") as f:
        f.write("# an attendee's edit\n")
    return root


@pytest.mark.slow
def test_a_classroom_joins_leaves_and_finishes_one_run(network: Network, tmp_path: Path,
                                                       cifar_dir: Path) -> None:
    run_dir = tmp_path / "run"
    params = [f"data_path={cifar_dir}", f"run_dir={run_dir}", "depth=8", f"steps={STEPS}",
              "batch_size=32", "learning_rate=0.02", "eval_every=0", "checkpoint_every=0",
              "vault=false"]
    procs: list[subprocess.Popen[str]] = []
    try:
        host = _start(network.host_prefix,
                      ["host", "--address", network.host_ip, "--slots", str(JOINERS),
                       "--min-workers", "2", *(a for p in params for a in ("-p", p))], REPO)
        procs.append(host)
        out, err = Lines(host.stdout), Lines(host.stderr)
        out.wait_for(lambda ls: len(ls) >= JOINERS, "the join links")
        links = {line.split()[0]: line.split()[1] for line in out.lines[:JOINERS]}
        assert all(JoinLink.parse(link).trust_address.startswith(f"{network.host_ip}:")
                   for link in links.values())

        def join(k: int, *extra: str, root: Path = REPO
                 ) -> tuple[subprocess.Popen[str], Lines, Lines]:
            p = _start(network.joiner_prefixes[k],
                       ["join", links[f"worker{k}"], "--data", str(cifar_dir),
                        "--run-dir", str(tmp_path / f"joiner{k}"), *extra], root)
            procs.append(p)
            return p, Lines(p.stdout), Lines(p.stderr)

        # 1-3 start together (the order of their arrival does not matter: no step completes
        # before two honest workers are live). 1. edited worker code: refused at attestation
        # (named on both screens); 2. joiner 0 joins, alone it cannot train; 3. joiner 1
        # joins, both train, joiner 1 leaves after LEAVE_AFTER steps (as Ctrl-C does)
        j2, _, j2_err = join(2, root=_edited_checkout(tmp_path))
        j0, j0_out, j0_err = join(0)
        j1, j1_out, j1_err = join(1, "--leave-after", str(LEAVE_AFTER))
        j2_err.wait_end()
        assert j2.wait(timeout=60) != 0, "\n".join(j2_err.lines[-30:])
        assert any("mr_td" in x for x in j2_err.lines), "the joiner names the measurement"
        err.wait_for(lambda ls: any("worker2: refused" in x for x in ls), "worker2 refused")
        assert j1.wait(timeout=TIMEOUT_S) == 0, "\n".join(j1_err.lines[-20:])
        j1_err.wait_end()
        err.wait_for(lambda ls: any("worker1: left" in x for x in ls), "worker1 left")

        # 4. joiner 3 joins late and finishes the run with joiner 0
        j3, j3_out, j3_err = join(3)
        assert host.wait(timeout=TIMEOUT_S) == 0, "\n".join(err.lines[-30:])
        err.wait_end()
        for p, lines in ((j0, j0_err), (j3, j3_err)):
            assert p.wait(timeout=120) == 0, "\n".join(lines.lines[-20:])
        j0_out.wait_end()
        j3_out.wait_end()
    finally:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait(timeout=30)

    assert any(f"done at step {STEPS}" in x for x in err.lines), err.lines[-10:]
    assert any(f"step {STEPS}/{STEPS}" in x for x in err.lines), "the host shows the progress"
    holds = [x for x in err.lines if "holding until 1 more worker(s) join" in x]
    assert holds and "worker1: left" in board_before(holds[-1], err.lines), \
        f"held after worker1 left: {holds}"
    assert any("leaving the run" in x for x in j1_err.lines)
    left_at = _steps(j1_out.lines)
    assert LEAVE_AFTER <= len(left_at) < STEPS // 2, "worker1 left mid-run"
    late = _steps(j3_out.lines)
    assert late[0][0] >= LEAVE_AFTER, "worker3 joined late: it started from the run's step"
    early = _steps(j0_out.lines)
    first = sum(loss for _, loss in early[:5]) / 5
    last = sum(loss for _, loss in early[-5:]) / 5
    assert last < first, f"the loss did not fall: {first:.3f} -> {last:.3f}"
    board = "\n".join(err.lines)
    assert all(f"worker{k}: joined" in board for k in (0, 1, 3))
    assert "worker1: left" in board and "worker2: refused (mr_td" in board
    audit = [json.loads(x) for x in (run_dir / "trust" / "audit.jsonl").read_text().splitlines()]
    enrolled = {e.get("subject") for e in audit if e.get("action") == "enroll" and e["allowed"]}
    assert enrolled == {f"worker{k}" for k in range(JOINERS)}, "each joiner enrolled"
