"""Serving the parameter server on the attested mesh: the gRPC server, the handlers that
stream tensors through ``trainer.tensor_wire``, and who may call."""

from __future__ import annotations

import ctypes
import ctypes.util
import sys
import threading
from collections.abc import Callable
from concurrent import futures
from typing import TYPE_CHECKING, Any

import grpc

from hfl_lab._exceptions import ConfigError
from hfl_lab.trust.client import MeshCredentials
from hfl_lab.trust.mesh import AttestedPeerInterceptor, PeerCheck, dynamic_server_credentials, roles
from trainer.proto import parameter_server_pb2 as pb
from trainer.proto import parameter_server_pb2_grpc as rpc
from trainer.tensor_wire import parse_chunk

if TYPE_CHECKING:
    from trainer.ps import ParameterServer

__all__ = ["MAX_MESSAGE_BYTES", "RPC_THREAD_NAME", "add_parameter_server", "serve_ps",
           "worker_peers"]

#: gRPC message limit both ways: a chunk is at most 4 MiB of data plus framing
MAX_MESSAGE_BYTES = 8 << 20

#: The prefix of the kernel's name of each thread of ps0's RPC pool (``ps-rpc_0``, ``ps-rpc_1``,
#: … in ``top -H`` and ``/proc/PID/task/*/comm``): the pool grows on demand up to
#: ``max_workers`` and keeps its threads, so an operator (and the load test's leak check) tells the
#: pool apart from any other thread of ps0 by this name. A thread that a pool thread starts
#: inherits its kernel name, so it shows as a second thread of the same name.
RPC_THREAD_NAME = "ps-rpc"
_PR_SET_NAME = 15


def _name_native_thread() -> None:
    """Give the calling thread its Python name in the kernel too (Python 3.11 keeps its thread
    names to itself); where prctl is not there (not Linux) it keeps the process's name."""
    if not sys.platform.startswith("linux"):
        return
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
        libc.prctl(_PR_SET_NAME, threading.current_thread().name.encode()[:15], 0, 0, 0)
    except (OSError, AttributeError):
        return


def serve_ps(
    servicer: ParameterServer,
    creds: MeshCredentials | Callable[[], MeshCredentials],
    peer_check: PeerCheck,
    *,
    host: str = "127.0.0.1",
    port: int = 0,
    max_workers: int = 16,
) -> tuple[grpc.Server, int]:
    """Serve the PS on the attested mesh: mTLS with mesh certificates + the evidence re-check.

    ``creds`` may be a callable returning the current (renewed) mesh credentials.
    """
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix=RPC_THREAD_NAME,
                                   initializer=_name_native_thread),
        interceptors=[AttestedPeerInterceptor(peer_check)],
        options=[
            ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
            ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
        ],
    )
    add_parameter_server(servicer, server)
    current = creds if callable(creds) else (lambda: creds)
    bound = server.add_secure_port(f"{host}:{port}", dynamic_server_credentials(current))
    if bound == 0:
        raise ConfigError(
            f"the parameter server cannot listen on {host}:{port} (port in use?).",
            fix="free the port or let the backend choose another one.",
        )
    server.start()
    return server, bound


def add_parameter_server(servicer: ParameterServer, server: grpc.Server) -> None:
    """Register ``servicer`` on ``server``: the generated handlers, but the tensor streams go
    through ``trainer.tensor_wire``. PullParameters yields chunks already serialized (cached
    per version), and PushUpdate's chunks are parsed without copying the tensor data. The
    bytes on the wire are the same protobuf messages; any client may use the generated stub.
    """
    captured = _CapturedHandlers()
    rpc.add_ParameterServerServicer_to_server(servicer, captured)  # type: ignore[no-untyped-call]
    handlers = dict(captured.handlers)
    handlers["PullParameters"] = grpc.unary_stream_rpc_method_handler(
        servicer.PullParameters,
        request_deserializer=pb.PullRequest.FromString,
        response_serializer=None,  # the servicer yields bytes
    )
    handlers["PushUpdate"] = grpc.stream_unary_rpc_method_handler(
        servicer.PushUpdate,
        request_deserializer=parse_chunk,
        response_serializer=pb.PushReply.SerializeToString,
    )
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler(captured.service, handlers),)
    )


class _CapturedHandlers:
    """Stands in for a server to take the generated method handlers."""

    def __init__(self) -> None:
        self.service = ""
        self.handlers: dict[str, grpc.RpcMethodHandler[Any, Any]] = {}

    def add_generic_rpc_handlers(self, handlers: object) -> None:
        pass

    def add_registered_method_handlers(
        self, service: str, handlers: dict[str, grpc.RpcMethodHandler[Any, Any]]
    ) -> None:
        self.service, self.handlers = service, handlers


def worker_peers(num_workers: int) -> Callable[[str], bool]:
    """Roles allowed to call the PS: this run's workers (and the owner's dashboard)."""
    allowed = {f"worker{i}" for i in range(num_workers)}
    return roles(*allowed, "owner")
