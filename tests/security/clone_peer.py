"""A second process holding another participant's mesh credentials (R2, hostile peers).

``python -m tests.security.clone_peer`` reads one JSON line on stdin (PS address, CA, the
certificate and its private key as PEM, the model's tensor shapes), opens its own mutual-TLS
connection to the PS with them, tries Register, PushUpdate and PullParameters, and prints one
JSON line: each RPC's status code and details. The key arrives over the pipe, never a file.
"""

from __future__ import annotations

import json
import sys
from typing import Any

import grpc
import numpy as np

from trainer.proto import parameter_server_pb2 as pb
from trainer.proto import parameter_server_pb2_grpc as rpc
from trainer.tensors import encode_tensors


def attempt(call: Any) -> dict[str, str]:
    try:
        result = call()
        if hasattr(result, "__iter__") and not isinstance(result, bytes | str):
            result = sum(1 for _ in result)
    except grpc.RpcError as e:
        return {"code": e.code().name, "details": e.details() or ""}
    return {"code": "OK", "details": str(result)[:200]}


def main() -> int:
    job = json.loads(sys.stdin.readline())
    role, index = job["role"], job["index"]
    credentials = grpc.ssl_channel_credentials(
        job["ca_pem"].encode(), job["key_pem"].encode(), job["cert_pem"].encode())
    channel = grpc.secure_channel(job["address"], credentials,
                                  options=[("grpc.ssl_target_name_override", "ps0")])
    stub = rpc.ParameterServerStub(channel)
    tensors = {name: np.full(shape, 1e-3, np.float32) for name, shape in job["shapes"]}
    header = pb.StreamHeader(kind=pb.UPDATE_KIND_GRADIENTS, model_version=job["version"],
                             worker_id=role, num_samples=8)
    results = {
        "Register": attempt(lambda: stub.Register(
            pb.RegisterRequest(role="worker", name=role, worker_index=index), timeout=30)),
        "PushUpdate": attempt(lambda: stub.PushUpdate(
            encode_tensors(tensors, header=header), timeout=30)),
        "PullParameters": attempt(lambda: stub.PullParameters(
            pb.PullRequest(worker_id=role, min_version=0), timeout=30)),
    }
    channel.close()
    print(json.dumps(results), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
