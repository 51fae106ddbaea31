"""Listening ports chosen before the process that listens on them starts.

The local backend writes the trust service's and ps0's addresses into the participants'
measured configuration before it launches them, the lab registry's into its configuration file
before ``docker-registry`` starts, and a test picks JupyterLab's before the server runs. A port
that a probe bound to port 0 found free is one from the kernel's *ephemeral* range
(``/proc/sys/net/ipv4/ip_local_port_range``, 32768-60999 by default): the range the kernel also
hands to every outgoing connection and every other port-0 bind on the machine. Until the
participant binds it, any of those can take it, and the participant then fails to listen
("port in use"). So :func:`free_listen_port` picks from below that range instead, where only
a process that names the port itself can collide, and checks that the port is free now.

It also stays out of Kubernetes' default NodePort range (30000-32767): on a machine that is a
cluster node, kube-proxy forwards connections to a local address on a NodePort to its service,
so a participant listening on one would not be the one its peers reach.
"""

from __future__ import annotations

import random
import socket
from pathlib import Path
from typing import Final

__all__ = ["EPHEMERAL_RANGE_FILE", "LISTEN_SPAN", "NODE_PORTS", "ephemeral_range",
           "free_listen_port", "listen_range"]

#: where Linux keeps the range it picks ephemeral ports from
EPHEMERAL_RANGE_FILE: Final = Path("/proc/sys/net/ipv4/ip_local_port_range")
#: how many ports below the ephemeral range :func:`free_listen_port` picks from
LISTEN_SPAN: Final = 10_000
#: Kubernetes' default ``--service-node-port-range``, never picked
NODE_PORTS: Final = range(30000, 32768)
_LINUX_DEFAULT: Final = (32768, 60999)
_FIRST_UNPRIVILEGED: Final = 1024
_TRIES: Final = 64
_RANDOM = random.SystemRandom()


def ephemeral_range(path: Path = EPHEMERAL_RANGE_FILE) -> tuple[int, int]:
    """The kernel's ephemeral port range (inclusive); Linux's default where it cannot be read
    (not Linux, or no /proc)."""
    try:
        low, high = (int(v) for v in path.read_text().split())
    except (OSError, ValueError):
        return _LINUX_DEFAULT
    if not _FIRST_UNPRIVILEGED <= low <= high <= 65535:
        return _LINUX_DEFAULT
    return low, high


def listen_range(ephemeral: tuple[int, int]) -> range:
    """The ports :func:`free_listen_port` picks from: up to :data:`LISTEN_SPAN` ports below the
    ephemeral range, else above it (a range that starts low), never a privileged one nor one of
    :data:`NODE_PORTS`. Empty when the ephemeral range leaves no room on either side."""
    low, high = ephemeral
    top = min(low, NODE_PORTS.start)
    below = range(max(_FIRST_UNPRIVILEGED, top - LISTEN_SPAN), top)
    options = [below]
    if high < NODE_PORTS.start:  # between the ephemeral range and the NodePorts
        options.append(range(high + 1, min(high + 1 + LISTEN_SPAN, NODE_PORTS.start)))
    start = max(high + 1, NODE_PORTS.stop)
    options.append(range(start, min(65536, start + LISTEN_SPAN)))
    return max(options, key=len)  # the first of the longest: the nearest below, then above


def free_listen_port(host: str = "127.0.0.1", *,
                     ephemeral: tuple[int, int] | None = None) -> int:
    """A TCP port free on ``host`` now that no outgoing connection or port-0 bind can take
    before the caller's process binds it (see the module). Where every try is taken, or the
    ephemeral range leaves no other ports, a port-0 bind's port (the old behaviour). Raises
    ``OSError`` when ``host`` accepts no listener at all."""
    candidates = listen_range(ephemeral or ephemeral_range())
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        for _ in range(_TRIES if candidates else 0):
            port = _RANDOM.choice(candidates)
            try:
                probe.bind((host, port))
            except OSError:
                continue
            return port
        probe.bind((host, 0))
        return int(probe.getsockname()[1])
