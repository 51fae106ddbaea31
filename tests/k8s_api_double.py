"""A test double of the Kubernetes API server: only the calls the lab's backend makes.

It stores objects as sent and answers like the API server (JSON bodies, ``metav1.Status``
errors, 404 for missing objects), but it is no cluster: nothing reconciles. Tests play the
controllers by setting pod status with :meth:`ApiDouble.set_pod`. Served:

  GET /version, GET/PATCH(apply)/DELETE of object paths, list of nodes / ccruntimes / pods
  (labelSelector a=b), pod logs (follow: lines, then the stream ends), pod exec over a real
  RFC 6455 websocket with the v4.channel.k8s.io framing, for ``sha256sum FILE`` and
  ``tar cf - -C DIR NAME`` on files a test puts in a container; pod port-forward over the same
  websocket framing (portforward's first frames name the port), relayed to the TCP address a
  test maps the pod's port to in :attr:`ApiDouble.forwards`; and a registry's GET /v2/.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import io
import json
import socket
import tarfile
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

WS_GUID = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11"


def _status(code: int, reason: str, message: str) -> dict[str, Any]:
    return {
        "kind": "Status",
        "apiVersion": "v1",
        "status": "Failure",
        "message": message,
        "reason": reason,
        "code": code,
    }


class ApiDouble:
    def __init__(self) -> None:
        self.objects: dict[str, dict[str, Any]] = {}
        self.requests: list[tuple[str, str, dict[str, str]]] = []
        self.logs: dict[tuple[str, str], list[str]] = {}
        self.files: dict[tuple[str, str], dict[str, bytes]] = {}
        self.version = {"major": "1", "minor": "31", "gitVersion": "v1.31.2"}
        self.registry_status = 200
        #: the phase a pod the backend creates reports (a reader pod on the TDX overlays)
        self.new_pod_phase = "Running"
        self.fail: dict[tuple[str, str], tuple[int, str]] = {}
        #: (pod, port) → the (host, port) a port-forward to it reaches, and how many were made
        self.forwards: dict[tuple[str, int], tuple[str, int]] = {}
        self.forwarded = 0
        self._lock = threading.Lock()
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    @property
    def hostport(self) -> str:
        return f"127.0.0.1:{self.server.server_address[1]}"

    def __enter__(self) -> ApiDouble:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()

    # -- what tests arrange ------------------------------------------------------------

    def put(self, path: str, obj: dict[str, Any]) -> None:
        self.objects[path] = obj

    def set_pod(
        self,
        ns: str,
        name: str,
        *,
        phase: str = "Running",
        ready: bool = True,
        waiting: str | None = None,
        restarts: int = 0,
    ) -> None:
        base = name.rpartition("-")[0]
        main = {"trust": "trust", "ps": "ps", "worker": "worker"}[base]
        component = {"trust": "trust", "ps": "ps", "worker": "worker"}[base]
        state: dict[str, Any] = (
            {"waiting": {"reason": waiting, "message": "back-off"}}
            if waiting
            else {"running": {"startedAt": "2025-01-01T00:00:00Z"}}
        )
        self.objects[f"/api/v1/namespaces/{ns}/pods/{name}"] = {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {
                "name": name,
                "namespace": ns,
                "uid": f"uid-{name}",
                "labels": {
                    "app.kubernetes.io/part-of": "hfl-lab",
                    "app.kubernetes.io/component": component,
                },
            },
            "status": {
                "phase": phase,
                "conditions": [{"type": "Ready", "status": "True" if ready else "False"}],
                "containerStatuses": [
                    {"name": main, "state": state, "restartCount": restarts, "ready": ready}
                ],
            },
        }

    def calls(self, method: str) -> list[str]:
        return [p for m, p, _ in self.requests if m == method]

    # -- serving -----------------------------------------------------------------------

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        double = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def _send(self, code: int, body: Any) -> None:
                data = json.dumps(body).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def _route(self, method: str) -> None:
                url = urlsplit(self.path)
                path, query = url.path, parse_qs(url.query)
                with double._lock:
                    double.requests.append((method, self.path, dict(self.headers)))
                if (method, path) in double.fail:
                    code, msg = double.fail[(method, path)]
                    return self._send(
                        code, _status(code, "Forbidden" if code == 403 else "Error", msg)
                    )
                if path == "/v2/":
                    return self._send(double.registry_status, {})
                if path == "/version":
                    return self._send(200, double.version)
                if method == "GET" and path.endswith("/portforward"):
                    return self._portforward(path, query)
                if method == "GET" and path.endswith("/exec"):
                    return self._exec(path, query)
                if method == "GET" and path.endswith("/log"):
                    return self._log(path, query)
                if method == "GET":
                    return self._get(path, query)
                if method == "PATCH":
                    return self._apply(path, query)
                if method == "DELETE":
                    if double.objects.pop(path, None) is None:
                        return self._send(404, _status(404, "NotFound", f"{path} not found"))
                    return self._send(200, {"kind": "Status", "status": "Success"})
                return self._send(405, _status(405, "MethodNotAllowed", method))

            def _get(self, path: str, query: dict[str, list[str]]) -> None:
                if path in double.objects:
                    return self._send(200, double.objects[path])
                prefix = path + "/"
                items = [
                    o
                    for p, o in double.objects.items()
                    if p.startswith(prefix) and "/" not in p[len(prefix) :]
                ]
                selector = query.get("labelSelector", [""])[0]
                if selector:
                    key, _, value = selector.partition("=")
                    items = [
                        o for o in items if (o["metadata"].get("labels") or {}).get(key) == value
                    ]
                if items or path.endswith(("/pods", "/nodes", "/ccruntimes")):
                    return self._send(200, {"kind": "List", "items": items})
                return self._send(404, _status(404, "NotFound", f"{path} not found"))

            def _apply(self, path: str, query: dict[str, list[str]]) -> None:
                if self.headers.get("Content-Type") != "application/apply-patch+yaml":
                    return self._send(415, _status(415, "UnsupportedMediaType", "need apply-patch"))
                if not query.get("fieldManager"):
                    return self._send(422, _status(422, "Invalid", "fieldManager is required"))
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                if not path.endswith("/" + body["metadata"]["name"]):
                    return self._send(400, _status(400, "BadRequest", "name does not match path"))
                if body.get("kind") == "Pod" and "status" not in body:
                    body["status"] = {"phase": double.new_pod_phase}  # the kubelet, at once
                double.objects[path] = body
                return self._send(200, body)

            def _log(self, path: str, query: dict[str, list[str]]) -> None:
                pod = path.split("/")[-2]
                container = query.get("container", [""])[0]
                if path[: -len("/log")] not in double.objects:
                    return self._send(404, _status(404, "NotFound", f"pod {pod} not found"))
                lines = double.logs.get((pod, container), [])
                self.send_response(200)
                self.send_header("Content-Type", "text/plain")
                self.send_header("Connection", "close")
                self.end_headers()
                for line in lines:  # follow=true: lines as they come, then the container exits
                    self.wfile.write(line.encode() + b"\n")
                    self.wfile.flush()

            # -- exec: websocket, v4.channel.k8s.io --------------------------------------

            def _exec(self, path: str, query: dict[str, list[str]]) -> None:
                pod = path.split("/")[-2]
                container = query.get("container", [""])[0]
                command = query.get("command", [])
                key = self.headers.get("Sec-WebSocket-Key", "")
                offered = [
                    p.strip() for p in self.headers.get("Sec-WebSocket-Protocol", "").split(",")
                ]
                if (
                    self.headers.get("Upgrade", "").lower() != "websocket"
                    or "v4.channel.k8s.io" not in offered
                ):
                    return self._send(
                        400, _status(400, "BadRequest", "exec needs a websocket upgrade")
                    )
                if path[: -len("/exec")] not in double.objects:
                    return self._send(404, _status(404, "NotFound", f"pod {pod} not found"))
                accept = base64.b64encode(hashlib.sha1((key + WS_GUID).encode()).digest()).decode()
                head = (
                    "HTTP/1.1 101 Switching Protocols\r\n"
                    "Upgrade: websocket\r\nConnection: Upgrade\r\n"
                    f"Sec-WebSocket-Accept: {accept}\r\n"
                    "Sec-WebSocket-Protocol: v4.channel.k8s.io\r\n\r\n"
                )
                self.wfile.write(head.encode())
                stdout, stderr, code = double.run(pod, container, command)
                for chunk_start in range(0, len(stdout), 32768):
                    self._frame(0x2, b"\x01" + stdout[chunk_start : chunk_start + 32768])
                if stderr:
                    self._frame(0x2, b"\x02" + stderr)
                if code == 0:
                    status: dict[str, Any] = {"metadata": {}, "status": "Success"}
                else:
                    status = {
                        "metadata": {},
                        "status": "Failure",
                        "reason": "NonZeroExitCode",
                        "message": f"command terminated with non-zero exit code: {code}",
                        "details": {"causes": [{"reason": "ExitCode", "message": str(code)}]},
                    }
                self._frame(0x2, b"\x03" + json.dumps(status).encode())
                self._frame(0x8, b"\x03\xe8")
                self.wfile.flush()
                self.connection.settimeout(2)
                with contextlib.suppress(TimeoutError, OSError):
                    self.connection.recv(1024)  # the client's close frame
                self.close_connection = True

            # -- port-forward: websocket, v4.channel.k8s.io ------------------------------

            def _portforward(self, path: str, query: dict[str, list[str]]) -> None:
                pod = path.split("/")[-2]
                port = int(query.get("ports", ["0"])[0])
                target = double.forwards.get((pod, port))
                if target is None:
                    return self._send(404, _status(404, "NotFound", f"pod {pod}:{port}"))
                key = self.headers.get("Sec-WebSocket-Key", "")
                accept = base64.b64encode(hashlib.sha1((key + WS_GUID).encode()).digest()).decode()
                self.wfile.write((
                    "HTTP/1.1 101 Switching Protocols\r\n"
                    "Upgrade: websocket\r\nConnection: Upgrade\r\n"
                    f"Sec-WebSocket-Accept: {accept}\r\n"
                    "Sec-WebSocket-Protocol: v4.channel.k8s.io\r\n\r\n").encode())
                lock = threading.Lock()

                def send(channel: int, data: bytes, opcode: int = 0x2) -> None:
                    with lock:
                        self._frame(opcode, bytes([channel]) + data if opcode == 0x2 else data)
                        self.wfile.flush()

                number = port.to_bytes(2, "little")
                send(0, number)
                send(1, number)
                upstream = socket.create_connection(target, timeout=10)
                upstream.settimeout(None)
                with double._lock:
                    double.forwarded += 1

                def down() -> None:  # the pod's bytes to the client
                    with contextlib.suppress(OSError):
                        while data := upstream.recv(65536):
                            send(0, data)
                    with contextlib.suppress(OSError):
                        send(0, b"\x03\xe8", opcode=0x8)

                pump = threading.Thread(target=down, daemon=True)
                pump.start()
                with contextlib.suppress(OSError, ValueError):
                    while (frame := self._read_frame()) is not None:
                        opcode, payload = frame
                        if opcode == 0x8:
                            break
                        if opcode == 0x2 and payload[:1] == b"\x00" and len(payload) > 1:
                            upstream.sendall(payload[1:])
                with contextlib.suppress(OSError):
                    upstream.shutdown(socket.SHUT_WR)
                pump.join(timeout=10)
                upstream.close()
                self.close_connection = True

            def _read_frame(self) -> tuple[int, bytes] | None:
                head = self.rfile.read(2)
                if len(head) < 2:
                    return None
                opcode, n = head[0] & 0x0F, head[1] & 0x7F
                if n == 126:
                    n = int.from_bytes(self.rfile.read(2), "big")
                elif n == 127:
                    n = int.from_bytes(self.rfile.read(8), "big")
                mask = self.rfile.read(4) if head[1] & 0x80 else b"\0\0\0\0"
                payload = self.rfile.read(n)
                return opcode, bytes(b ^ mask[i % 4] for i, b in enumerate(payload))

            def _frame(self, opcode: int, payload: bytes) -> None:
                header = bytes([0x80 | opcode])
                n = len(payload)
                if n < 126:
                    header += bytes([n])
                elif n < 1 << 16:
                    header += bytes([126]) + n.to_bytes(2, "big")
                else:
                    header += bytes([127]) + n.to_bytes(8, "big")
                self.wfile.write(header + payload)

            def do_GET(self) -> None:
                self._route("GET")

            def do_PATCH(self) -> None:
                self._route("PATCH")

            def do_DELETE(self) -> None:
                self._route("DELETE")

        return Handler

    def run(self, pod: str, container: str, command: list[str]) -> tuple[bytes, bytes, int]:
        """The two commands the backend runs in a container, on the test's files."""
        files = self.files.get((pod, container), {})
        if len(command) == 2 and command[0] == "sha256sum":
            if command[1] not in files:
                return b"", f"sha256sum: {command[1]}: No such file or directory\n".encode(), 1
            return (
                f"{hashlib.sha256(files[command[1]]).hexdigest()}  {command[1]}\n".encode(),
                b"",
                0,
            )
        if len(command) == 6 and command[:4] == ["tar", "cf", "-", "-C"]:
            path = f"{command[4]}/{command[5]}"
            if path not in files:
                return (
                    b"",
                    f"tar: {command[5]}: Cannot stat: No such file or directory\n".encode(),
                    2,
                )
            buf = io.BytesIO()
            with tarfile.open(fileobj=buf, mode="w") as tar:
                info = tarfile.TarInfo(command[5])
                info.size = len(files[path])
                tar.addfile(info, io.BytesIO(files[path]))
            return buf.getvalue(), b"", 0
        return b"", f"{command[0] if command else ''}: not found\n".encode(), 127
