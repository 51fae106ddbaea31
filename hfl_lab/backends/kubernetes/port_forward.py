"""A local TCP port that reaches a pod's port through the Kubernetes API (``kubectl
port-forward``, in-process).

The owner provisions the trust service through it: the path (the API server, the kubelet, the
node) is untrusted, which is fine, because the TLS session the owner opens through it ends in the
trust service's TD, and the owner pinned that TD's RA-TLS certificate after verifying its
evidence. Whoever relays the bytes sees only ciphertext and can at most refuse to relay them.

:class:`LocalForward` listens on 127.0.0.1 and, for each connection, opens one stream to the pod
(``open_stream()``, e.g. :meth:`~hfl_lab.backends.kubernetes.cluster_api.ClusterApi.port_forward`)
and copies bytes both ways until either side closes.
"""

from __future__ import annotations

import contextlib
import logging
import socket
import threading
from collections.abc import Callable
from typing import Any, Protocol

log = logging.getLogger(__name__)

CHUNK = 64 * 1024


class Stream(Protocol):
    """A connected, socket-like stream to the pod's port."""

    def recv(self, n: int) -> bytes: ...

    def sendall(self, data: bytes) -> Any: ...

    def shutdown(self, how: int) -> Any: ...

    def close(self) -> Any: ...


class LocalForward:
    """``with LocalForward(open_stream) as address:`` → "127.0.0.1:PORT" while in the block."""

    def __init__(self, open_stream: Callable[[], Stream], what: str = "the pod") -> None:
        self.open_stream = open_stream
        self.what = what
        self._listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._listener.bind(("127.0.0.1", 0))
        self._listener.listen(8)
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._open: list[Any] = []
        self._lock = threading.Lock()
        self.connections = 0

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self._listener.getsockname()[1]}"

    def __enter__(self) -> str:
        accept = threading.Thread(target=self._accept, name="port-forward", daemon=True)
        accept.start()
        self._threads.append(accept)
        return self.address

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._stop.set()
        with contextlib.suppress(OSError):
            self._listener.close()
        with self._lock:
            opened, self._open = self._open, []
        for s in opened:
            with contextlib.suppress(OSError):
                s.close()
        for t in self._threads:
            t.join(timeout=5)

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                client, _ = self._listener.accept()
            except OSError:
                return  # closed
            try:
                remote = self.open_stream()
            except Exception as error:  # noqa: BLE001 - reported, and the client sees a close
                log.warning("port-forward to %s failed: %s", self.what, error)
                client.close()
                continue
            with self._lock:
                self.connections += 1
                self._open += [client, remote]
            for src, dst in ((client, remote), (remote, client)):
                t = threading.Thread(target=_pump, args=(src, dst), daemon=True,
                                     name="port-forward-pump")
                t.start()
                self._threads.append(t)


def _pump(src: Any, dst: Any) -> None:
    try:
        while data := src.recv(CHUNK):
            dst.sendall(data)
    except OSError:
        pass
    finally:
        with contextlib.suppress(OSError):
            dst.shutdown(socket.SHUT_WR)
