"""gRPC service definition of the trust service; the generated modules are (re)built on first
import when stale.

Import the generated code as ``from hfl_lab.trust.proto import trust_pb2`` (messages) and
``from hfl_lab.trust.proto import trust_pb2_grpc`` (stubs and servicer).
"""

from __future__ import annotations

from pathlib import Path

from hfl_lab._protogen import ProtoPackage, invoked_as_command

PROTOS = ProtoPackage(Path(__file__).resolve().parent, ("trust",), __name__)

if not invoked_as_command(__name__):  # `python -m hfl_lab.trust.proto` reports its own errors
    PROTOS.ensure_generated()
