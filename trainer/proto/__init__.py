"""gRPC service definitions of the parameter server; the generated modules are (re)built on
first import when stale.

Import the generated code as ``from trainer.proto import parameter_server_pb2`` (messages)
and ``from trainer.proto import parameter_server_pb2_grpc`` (stubs and servicer).
"""

from __future__ import annotations

from pathlib import Path

from hfl_lab._protogen import ProtoPackage, invoked_as_command

PROTOS = ProtoPackage(Path(__file__).resolve().parent, ("parameter_server",), __name__)

if not invoked_as_command(__name__):  # `python -m trainer.proto` reports its own errors
    PROTOS.ensure_generated()
