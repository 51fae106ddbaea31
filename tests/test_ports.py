"""Ports picked before their listener starts: outside the kernel's ephemeral range, free."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from hfl_lab import _ports
from hfl_lab._ports import NODE_PORTS, ephemeral_range, free_listen_port, listen_range
from hfl_lab.backends.local import free_port


def _bound(port: int) -> socket.socket:
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.bind(("127.0.0.1", port))
    return s


def test_a_picked_port_is_free_and_outside_the_range_connections_and_port_0_binds_use() -> None:
    """The local backend (ps0, trust service), the lab registry and JupyterLab's tests all
    pick this way: nothing on the machine that asks the kernel for a port can get this one
    between the pick and the participant's own bind."""
    low, high = ephemeral_range()
    for pick in (free_listen_port, free_port):
        port = pick()
        assert not low <= port <= high
        assert port not in NODE_PORTS
        assert 1024 <= port <= 65535
        with _bound(port):  # the caller's process can listen on it
            taken = [_bound(0) for _ in range(50)]
            try:
                assert port not in {s.getsockname()[1] for s in taken}
            finally:
                for s in taken:
                    s.close()


def test_the_range_it_picks_from_sits_beside_the_ephemeral_range_and_off_node_ports() -> None:
    assert listen_range((32768, 60999)) == range(20000, 30000)  # Linux's default
    assert listen_range((40000, 60999)) == range(20000, 30000)
    assert listen_range((1024, 60999)) == range(61000, 65536)  # a range that starts low
    assert listen_range((1024, 29000)) == range(32768, 42768)
    assert listen_range((1024, 65535)) == range(0)  # no room on either side
    assert listen_range((5000, 20000)) == range(32768, 42768)
    assert listen_range((5000, 10000)) == range(10001, 20001)
    assert listen_range((22000, 28000)) == range(12000, 22000)
    for ephemeral in ((32768, 60999), (1024, 60999), (1024, 29000), (5000, 20000), (5000, 10000),
                      (22000, 28000)):
        picked = listen_range(ephemeral)
        assert not set(picked) & set(NODE_PORTS)
        assert not set(picked) & set(range(ephemeral[0], ephemeral[1] + 1))


def test_an_unreadable_or_odd_range_file_means_linux_default(tmp_path: Path) -> None:
    assert ephemeral_range(tmp_path / "missing") == (32768, 60999)
    odd = tmp_path / "range"
    odd.write_text("60999 32768\n")
    assert ephemeral_range(odd) == (32768, 60999)
    odd.write_text("40000\t50000\n")
    assert ephemeral_range(odd) == (40000, 50000)


def test_a_taken_port_is_passed_over(monkeypatch: pytest.MonkeyPatch) -> None:
    with _bound(0) as holder:
        taken = holder.getsockname()[1]
        holder.listen()
        free = free_listen_port()
        tries = iter([taken, taken, free])
        monkeypatch.setattr(_ports._RANDOM, "choice", lambda _candidates: next(tries))
        assert free_listen_port() == free


def test_with_no_room_beside_the_range_it_falls_back_to_a_port_0_bind() -> None:
    port = free_listen_port(ephemeral=(1024, 65535))
    assert 1024 <= port <= 65535
    with _bound(port):
        pass


def test_a_host_that_takes_no_listener_is_an_os_error() -> None:
    with pytest.raises(OSError):
        free_listen_port("192.0.2.1")  # TEST-NET-1: not an address of this machine
