"""The few Kubernetes API calls the backend makes, over the official client, as plain JSON.

Objects travel as dicts (the manifests are dicts already) through the client's REST layer,
which brings kubeconfig / in-cluster credentials, TLS and proxies; exec goes through the
client's websocket stream, as ``kubectl exec``/``kubectl cp`` do.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kubernetes import client as k8s_client
from kubernetes import config as _k8s_config
from kubernetes.stream import portforward as k8s_portforward
from kubernetes.stream import stream as k8s_stream

from hfl_lab._exceptions import ApiError, BackendError

# the config loaders carry no annotations; treat them as the dynamic API they are
k8s_config: Any = _k8s_config

#: apiVersion/kind → (URL prefix, plural, namespaced), for the kinds k8s/ uses
RESOURCES: dict[tuple[str, str], tuple[str, str, bool]] = {
    ("v1", "Namespace"): ("/api/v1", "namespaces", False),
    ("v1", "ConfigMap"): ("/api/v1", "configmaps", True),
    ("v1", "Secret"): ("/api/v1", "secrets", True),
    ("v1", "Service"): ("/api/v1", "services", True),
    ("v1", "PersistentVolumeClaim"): ("/api/v1", "persistentvolumeclaims", True),
    ("v1", "Pod"): ("/api/v1", "pods", True),
    ("apps/v1", "StatefulSet"): ("/apis/apps/v1", "statefulsets", True),
    ("networking.k8s.io/v1", "NetworkPolicy"): (
        "/apis/networking.k8s.io/v1",
        "networkpolicies",
        True,
    ),
    ("networking.k8s.io/v1", "Ingress"): ("/apis/networking.k8s.io/v1", "ingresses", True),
}


@dataclass(frozen=True)
class ExecResult:
    stdout: bytes
    stderr: bytes
    returncode: int


def object_path(obj: dict[str, Any], *, with_name: bool = True) -> str:
    """The REST path of a manifest (``/apis/apps/v1/namespaces/ns/statefulsets/name``)."""
    key = (str(obj["apiVersion"]), str(obj["kind"]))
    if key not in RESOURCES:
        raise BackendError(
            f"the Kubernetes backend does not know how to apply a {key[1]} ({key[0]}); "
            "add it to hfl_lab/backends/kubernetes/cluster_api.py RESOURCES."
        )
    prefix, plural, namespaced = RESOURCES[key]
    path = prefix
    if namespaced:
        path += f"/namespaces/{obj['metadata']['namespace']}"
    path += f"/{plural}"
    if with_name:
        path += f"/{obj['metadata']['name']}"
    return path


class ClusterApi:
    """JSON over the kubernetes client's ``ApiClient``."""

    def __init__(self, api_client: Any, request_timeout_s: float = 30.0) -> None:
        self.api_client = api_client
        self.request_timeout_s = request_timeout_s

    @classmethod
    def connect(cls, kubeconfig: str | None, context: str | None = None) -> ClusterApi:
        """From a kubeconfig file, else in-cluster credentials, else ~/.kube/config."""
        try:
            if kubeconfig is None and os.environ.get("KUBERNETES_SERVICE_HOST"):
                configuration = k8s_client.Configuration()
                k8s_config.load_incluster_config(client_configuration=configuration)
                return cls(k8s_client.ApiClient(configuration))
            if kubeconfig is not None and not Path(kubeconfig).is_file():
                raise BackendError(
                    f"kubeconfig {kubeconfig} does not exist.",
                    fix="set kubeconfig to your cluster's kubeconfig file.",
                )
            return cls(k8s_config.new_client_from_config(config_file=kubeconfig, context=context))
        except k8s_config.ConfigException as exc:
            raise BackendError(
                f"no usable Kubernetes credentials ({exc}).",
                fix="set kubeconfig (or KUBECONFIG) to a valid kubeconfig, or run in a pod.",
            ) from None

    @property
    def host(self) -> str:
        return str(self.api_client.configuration.host)

    def _call(
        self,
        method: str,
        path: str,
        query: list[tuple[str, Any]] | None = None,
        body: Any = None,
        content_type: str | None = None,
        timeout: float | None = None,
    ) -> Any:
        headers = {"Accept": "application/json"}
        if content_type is not None:
            headers["Content-Type"] = content_type
        request = self.api_client.param_serialize(
            method=method,
            resource_path=path,
            query_params=query or [],
            header_params=headers,
            body=body,
            auth_settings=["BearerToken"],
        )
        try:
            return self.api_client.call_api(
                *request, _request_timeout=timeout or self.request_timeout_s
            )
        except k8s_client.ApiException as exc:
            raise ApiError(int(exc.status or 0), str(exc.reason), str(exc.body or "")) from None
        except OSError as exc:
            raise ApiError(0, "unreachable", str(exc)) from None
        except Exception as exc:  # noqa: BLE001 - urllib3 wraps socket errors in its own tree
            raise ApiError(0, "unreachable", f"{exc.__class__.__name__}: {exc}") from None

    def request(
        self,
        method: str,
        path: str,
        query: list[tuple[str, Any]] | None = None,
        body: Any = None,
        content_type: str | None = None,
    ) -> Any:
        response = self._call(method, path, query, body, content_type)
        data = response.read()
        if not 200 <= response.status <= 299:
            message = ""
            try:
                message = str(json.loads(data).get("message", ""))
            except (ValueError, AttributeError):
                message = data.decode(errors="replace")[:200]
            raise ApiError(response.status, str(response.reason), message)
        return json.loads(data) if data else {}

    def get(self, path: str, query: list[tuple[str, Any]] | None = None) -> Any:
        return self.request("GET", path, query)

    def apply(self, obj: dict[str, Any], field_manager: str) -> Any:
        """Server-side apply (``PATCH application/apply-patch+yaml``, forced)."""
        return self.request(
            "PATCH",
            object_path(obj),
            [("fieldManager", field_manager), ("force", "true")],
            obj,
            "application/apply-patch+yaml",
        )

    def delete(self, path: str) -> bool:
        """Delete an object; False when it was already gone."""
        try:
            self.request("DELETE", path, [("propagationPolicy", "Background")])
        except ApiError as exc:
            if exc.status == 404:
                return False
            raise
        return True

    def stream_lines(
        self, path: str, query: list[tuple[str, Any]], timeout: float | None = None
    ) -> Iterator[str]:
        """Lines of a streaming GET (pod logs with follow=true) until the server ends it."""
        response = self._call("GET", path, query, timeout=timeout)
        if not 200 <= response.status <= 299:
            data = response.read()
            raise ApiError(response.status, str(response.reason), data.decode(errors="replace"))
        raw = response.response
        pending = b""
        try:
            for chunk in raw.stream(4096, decode_content=True):
                pending += chunk
                *lines, pending = pending.split(b"\n")
                for line in lines:
                    yield line.decode(errors="replace")
            if pending:
                yield pending.decode(errors="replace")
        finally:
            raw.release_conn()

    def exec(self, namespace: str, pod: str, container: str, command: list[str]) -> ExecResult:
        """Run ``command`` in a container and collect its output (binary-safe)."""
        core = k8s_client.CoreV1Api(self.api_client)
        try:
            ws = k8s_stream(
                core.connect_get_namespaced_pod_exec,
                pod,
                namespace,
                container=container,
                command=command,
                stderr=True,
                stdin=False,
                stdout=True,
                tty=False,
                binary=True,
                _preload_content=False,
            )
        except k8s_client.ApiException as exc:
            raise ApiError(int(exc.status or 0), str(exc.reason), str(exc.body or "")) from None
        stdout = bytearray()
        stderr = bytearray()
        try:
            while ws.is_open():
                ws.update(timeout=1)
                stdout += ws.read_stdout() or b""
                stderr += ws.read_stderr() or b""
            stdout += ws.read_stdout() or b""
            stderr += ws.read_stderr() or b""
            returncode = exec_returncode(ws.read_channel(3))
        finally:
            ws.close()
        return ExecResult(bytes(stdout), bytes(stderr), returncode)


    def port_forward(self, namespace: str, pod: str, port: int) -> ForwardedStream:
        """One stream to ``port`` in ``pod`` through the API server (``kubectl port-forward``'s
        websocket, v4.channel.k8s.io)."""
        core = k8s_client.CoreV1Api(self.api_client)
        try:
            forward = k8s_portforward(core.connect_get_namespaced_pod_portforward, pod,
                                      namespace, ports=str(port))
        except k8s_client.ApiException as exc:
            raise ApiError(int(exc.status or 0), str(exc.reason), str(exc.body or "")) from None
        return ForwardedStream(forward, port)


class ForwardedStream:
    """The socket end of one port-forward (what :class:`~.port_forward.LocalForward` pumps)."""

    def __init__(self, forward: Any, port: int) -> None:
        self._forward = forward
        self._port = port
        self._socket = forward.socket(port)

    def recv(self, n: int) -> bytes:
        data: bytes = self._socket.recv(n)
        return data

    def sendall(self, data: bytes) -> None:
        self._socket.sendall(data)

    def shutdown(self, how: int) -> None:
        self._socket.shutdown(how)

    def close(self) -> None:
        self._forward.close()

    @property
    def error(self) -> str | None:
        """What the API server said on the port's error channel (None: nothing)."""
        error: str | None = self._forward.error(self._port)
        return error


def exec_returncode(status: bytes | str) -> int:
    """The exit code in an exec's error channel (a ``metav1.Status`` as JSON).

    Success → 0; ``NonZeroExitCode`` → the code in ``details.causes[ExitCode]``; any other
    failure (the command could not start, the container is gone) → ``ApiError``.
    """
    text = status.decode(errors="replace") if isinstance(status, bytes) else status
    if not text.strip():
        raise ApiError(0, "exec", "the exec stream ended without a status")
    doc = json.loads(text)
    if doc.get("status") == "Success":
        return 0
    if doc.get("reason") == "NonZeroExitCode":
        for cause in (doc.get("details") or {}).get("causes") or []:
            if cause.get("reason") == "ExitCode":
                return int(cause["message"])
    raise ApiError(int(doc.get("code") or 0), "exec", str(doc.get("message", text)))
