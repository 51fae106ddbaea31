"""gRPC service definitions; the generated modules are (re)built on first import when stale.

Import the generated code as ``from trainer.proto import parameter_server_pb2`` (messages)
and ``from trainer.proto import parameter_server_pb2_grpc`` (stubs and servicer).
"""

from __future__ import annotations

from ._generate import ensure_generated, invoked_as_command

if not invoked_as_command(__name__):  # `python -m trainer.proto` reports its own errors
    ensure_generated()
