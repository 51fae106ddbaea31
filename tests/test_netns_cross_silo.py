"""Cross-silo over a real network (issue 23 "Must show"): a host namespace and three joiner
namespaces on one bridged LAN, each joiner on its own veth pair and address, its loopback
down. ``hfl-lab host`` runs in the host namespace, ``hfl-lab join`` in each joiner's: joiner 0
starts with the run and leaves mid-run (Ctrl-C), joiner 1 joins late and finishes it, joiner 2
runs edited worker code and is refused. The run completes, the loss falls, and the host's board
and the trust service's audit record each outcome. The namespaces are made and removed here;
the test skips, saying why, where they cannot be made (not root, no ``ip netns``)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from hfl_lab.config.join_link import JoinLink

REPO = Path(__file__).resolve().parents[1]
PREFIX = f"hfl{os.getpid() % 100000}"
HOST_NS = f"{PREFIX}h"
HOST_IP = "10.231.0.1"
TIMEOUT_S = 300.0
STEPS = 200


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, text=True, timeout=30)


def _skip_reason() -> str | None:
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


@pytest.fixture()
def network() -> Iterator[list[str]]:
    """The host namespace and three joiner namespaces on one LAN (a classroom's Wi-Fi): a
    bridge in the host namespace holds HOST_IP, and each joiner k is 10.231.0.(k+2) on a veth
    pair whose other end is a port of that bridge. The joiners' loopback devices stay down:
    nothing reaches the host that way."""
    reason = _skip_reason()
    if reason:
        pytest.skip(reason)
    made: list[str] = []
    bridge = f"{PREFIX}br"
    try:
        _ip("netns", "add", HOST_NS)
        made.append(HOST_NS)
        _ip("-n", HOST_NS, "link", "add", bridge, "type", "bridge")
        _ip("-n", HOST_NS, "addr", "add", f"{HOST_IP}/24", "dev", bridge)
        _ip("-n", HOST_NS, "link", "set", bridge, "up")
        # the host's own trust service, ps0 and owner side reach HOST_IP through the kernel's
        # loopback device, as on any machine
        _ip("-n", HOST_NS, "link", "set", "lo", "up")
        joiners = []
        for k in range(3):
            ns = f"{PREFIX}j{k}"
            _ip("netns", "add", ns)
            made.append(ns)
            port, nic = f"{PREFIX}p{k}", f"{PREFIX}n{k}"
            _ip("link", "add", port, "netns", HOST_NS, "type", "veth", "peer", "name", nic,
                "netns", ns)
            _ip("-n", HOST_NS, "link", "set", port, "master", bridge)
            _ip("-n", HOST_NS, "link", "set", port, "up")
            _ip("-n", ns, "addr", "add", f"10.231.0.{k + 2}/24", "dev", nic)
            _ip("-n", ns, "link", "set", nic, "up")
            joiners.append(ns)
        yield joiners
    finally:
        for ns in reversed(made):  # deleting a namespace removes its devices too
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=30)


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


def _in_ns(ns: str, args: list[str], root: Path) -> subprocess.Popen[str]:
    """``hfl-lab <args>`` in namespace ``ns``, running the checkout at ``root``."""
    env = {**os.environ, "PYTHONPATH": str(root), "KERAS_BACKEND": "tensorflow",
           "TF_CPP_MIN_LOG_LEVEL": "2"}
    return subprocess.Popen(["ip", "netns", "exec", ns, sys.executable, "-m", "hfl_lab.cli",
                             *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=env, cwd=root, start_new_session=True)


def _worker_pid(lines: list[str]) -> int | None:
    for line in lines:
        if "starting (pid " in line:
            return int(line.split("(pid ", 1)[1].split(")", 1)[0])
    return None


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
def test_three_joiners_in_their_own_namespaces(network: list[str], tmp_path: Path,
                                               cifar_dir: Path) -> None:
    run_dir = tmp_path / "run"
    params = [f"data_path={cifar_dir}", f"run_dir={run_dir}", "depth=8", f"steps={STEPS}",
              "batch_size=32", "learning_rate=0.02", "eval_every=0", "checkpoint_every=0",
              "vault=false"]
    procs: list[subprocess.Popen[str]] = []
    try:
        host = _in_ns(HOST_NS, ["host", "--address", HOST_IP, "--slots", "3",
                                *(a for p in params for a in ("-p", p))], REPO)
        procs.append(host)
        out, err = Lines(host.stdout), Lines(host.stderr)
        out.wait_for(lambda ls: len(ls) >= 3, "three join links")
        links = {line.split()[0]: line.split()[1] for line in out.lines[:3]}
        assert all(JoinLink.parse(link).trust_address.startswith(f"{HOST_IP}:")
                   for link in links.values())

        def join(k: int, root: Path = REPO) -> tuple[subprocess.Popen[str], Lines, Lines]:
            p = _in_ns(network[k], ["join", links[f"worker{k}"], "--data", str(cifar_dir),
                                    "--run-dir", str(tmp_path / f"joiner{k}")], root)
            procs.append(p)
            return p, Lines(p.stdout), Lines(p.stderr)

        # joiner 2: edited worker code, refused at attestation (named on both screens)
        j2, _, j2_err = join(2, _edited_checkout(tmp_path))
        j2_err.wait_end()
        assert j2.wait(timeout=60) != 0, "\n".join(j2_err.lines[-30:])
        assert any("mr_td" in x for x in j2_err.lines), "the joiner names the measurement"
        err.wait_for(lambda ls: any("worker2: refused" in x for x in ls), "worker2 refused")

        # joiner 0 starts the run. Alone it would train the whole run in less time than
        # joiner 1's start takes, so after its first steps it holds (SIGSTOP) until joiner 1
        # has registered.
        j0, j0_out, j0_err = join(0)
        j0_out.wait_for(lambda ls: len(_steps(ls)) >= 5, "worker0's first steps")
        pid = _worker_pid(j0_err.lines)
        assert pid is not None, j0_err.lines
        os.kill(pid, signal.SIGSTOP)
        try:
            j1, j1_out, j1_err = join(1)
            j1_err.wait_for(lambda ls: any("worker1 ready" in x for x in ls), "worker1 ready")
        finally:
            os.kill(pid, signal.SIGCONT)
        j1_out.wait_for(lambda ls: len(_steps(ls)) >= 3, "worker1's first steps")
        # joiner 0 leaves mid-run (Ctrl-C)
        os.killpg(j0.pid, signal.SIGINT)
        assert j0.wait(timeout=120) == 0, "\n".join(j0_err.lines[-20:])
        j0_err.wait_for(lambda ls: any("leaving the run" in x for x in ls), "worker0 leaving")

        # the run completes without worker0, and the loss falls
        assert host.wait(timeout=TIMEOUT_S) == 0, "\n".join(err.lines[-30:])
        err.wait_end()
        assert j1.wait(timeout=120) == 0
        j1_out.wait_end()
    finally:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait(timeout=30)

    assert any(f"done at step {STEPS}" in x for x in err.lines), err.lines[-10:]
    assert any(f"step {STEPS}/{STEPS}" in x for x in err.lines), "the host shows the progress"
    quorums = [x.split("quorum K=", 1)[1][:1] for x in err.lines if "quorum K=" in x]
    assert quorums[-2:] == ["2", "1"], f"K rose with worker1, fell when worker0 left: {quorums}"
    early, late = _steps(j0_out.lines), _steps(j1_out.lines)
    assert late[0][0] >= 5, "worker1 joined late: it started from the run's step"
    first = sum(loss for _, loss in early[:5]) / 5
    last = sum(loss for _, loss in late[-5:]) / 5
    assert last < first, f"the loss did not fall: {first:.3f} -> {last:.3f}"
    board = "\n".join(err.lines)
    assert "worker0: joined" in board and "worker1: joined" in board
    assert "worker2: refused (mr_td" in board
    audit = [json.loads(x) for x in (run_dir / "trust" / "audit.jsonl").read_text().splitlines()]
    enrolled = {e.get("subject") for e in audit if e.get("action") == "enroll" and e["allowed"]}
    assert enrolled == {"worker0", "worker1", "worker2"}, "each joiner enrolled with its link"
