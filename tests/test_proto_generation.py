"""The gRPC code generator: one command, importable output, regeneration on import."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from trainer.proto import parameter_server_pb2 as pb

REPO = Path(__file__).resolve().parents[1]
SOURCES = ("parameter_server.proto", "__init__.py", "__main__.py")
GENERATED = tuple(
    f"{stem}{suffix}"
    for stem in ("parameter_server",)
    for suffix in ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py")
)

# Run in a child process: the descriptor pool is global, and the copy registers the same
# .proto file name as the package this test process already imported.
CHECK_IMPORT = textwrap.dedent(
    """
    import sys
    from pathlib import Path
    import trainer.proto
    from trainer.proto import parameter_server_pb2 as pb, parameter_server_pb2_grpc as rpc

    assert Path(trainer.proto.__file__).parent == Path(sys.argv[1]), trainer.proto.__file__
    reply = pb.RegisterReply(worker_id="w0", aggregation=pb.AGGREGATION_MODE_SYNC)
    reply.model.add(name="conv/kernel", dtype=pb.DTYPE_FLOAT32, shape=[3, 3, 3, 16])
    assert pb.RegisterReply.FromString(reply.SerializeToString()) == reply
    service = pb.DESCRIPTOR.services_by_name["ParameterServer"]
    assert service.methods_by_name["PullParameters"].server_streaming
    assert service.methods_by_name["PushUpdate"].client_streaming
    assert issubclass(rpc.ParameterServerServicer, object) and rpc.ParameterServerStub
    print("ok")
    """
)


@pytest.fixture
def package_copy(tmp_path: Path) -> Path:
    """A copy of trainer/proto (sources only) inside a bare `trainer` package."""
    proto_dir = tmp_path / "trainer" / "proto"
    proto_dir.mkdir(parents=True)
    (tmp_path / "trainer" / "__init__.py").write_text('"""copy for the test."""\n')
    for name in SOURCES:
        shutil.copy2(REPO / "trainer" / "proto" / name, proto_dir / name)
    return proto_dir


def run_python(args: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    # the copy first, so its `trainer` shadows the repository's; the repository for hfl_lab
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(cwd), str(REPO)])}
    return subprocess.run(
        [sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=120
    )


def test_one_command_generates_importable_modules(package_copy: Path) -> None:
    # Act
    result = run_python(["-m", "trainer.proto"], cwd=package_copy.parents[1])

    # Assert
    assert result.returncode == 0, result.stderr
    for name in GENERATED:
        assert (package_copy / name).is_file(), name
        assert f"wrote {package_copy / name}" in result.stdout
    grpc_code = (package_copy / "parameter_server_pb2_grpc.py").read_text()
    assert "from . import parameter_server_pb2 as" in grpc_code
    assert "\nimport parameter_server_pb2" not in grpc_code
    checked = run_python(["-c", CHECK_IMPORT, str(package_copy)], cwd=package_copy.parents[1])
    assert checked.stdout.strip() == "ok", checked.stderr


def test_import_generates_missing_modules_even_when_racing(package_copy: Path) -> None:
    # Arrange: four processes import a fresh checkout at the same moment
    root = package_copy.parents[1]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(root), str(REPO)])}
    command = [sys.executable, "-c", CHECK_IMPORT, str(package_copy)]

    # Act
    racers = [
        subprocess.Popen(
            command, cwd=root, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        for _ in range(4)
    ]
    outcomes = [racer.communicate(timeout=120) for racer in racers]

    # Assert
    for racer, (out, err) in zip(racers, outcomes, strict=True):
        assert racer.returncode == 0 and out.strip() == "ok", err
    assert all((package_copy / name).is_file() for name in GENERATED)
    assert not list(package_copy.glob(".generate-*")), "temporary folders left behind"


def test_import_regenerates_modules_older_than_the_proto(package_copy: Path) -> None:
    # Arrange: generated, then the .proto gains a field
    root = package_copy.parents[1]
    assert run_python(["-m", "trainer.proto"], cwd=root).returncode == 0
    proto = package_copy / "parameter_server.proto"
    proto.write_text(
        proto.read_text().replace(
            "uint32 worker_index = 3;", "uint32 worker_index = 3;\n  string zone = 4;", 1
        )
    )
    old = proto.stat().st_mtime - 60
    for name in GENERATED:
        os.utime(package_copy / name, (old, old))

    # Act
    script = "from trainer.proto import parameter_server_pb2 as pb\n" + (
        "print(pb.RegisterRequest(zone='z').zone)"
    )
    result = run_python(["-c", script], cwd=root)

    # Assert
    assert result.stdout.strip() == "z", result.stderr
    assert all((package_copy / name).stat().st_mtime > old + 30 for name in GENERATED)


def test_broken_proto_fails_with_a_clear_message(package_copy: Path) -> None:
    (package_copy / "parameter_server.proto").write_text('syntax = "proto3";\nmessage {\n')

    result = run_python(["-m", "trainer.proto"], cwd=package_copy.parents[1])

    assert result.returncode != 0
    assert "parameter_server.proto:2:" in result.stderr  # protoc names the line
    assert (
        result.stderr.startswith("error: protoc failed")
        or "\nerror: protoc failed" in result.stderr
    )
    assert "Traceback" not in result.stderr
    assert not any((package_copy / name).exists() for name in GENERATED)


def test_the_trust_service_definition_lives_with_the_trust_service() -> None:
    # The TD runtime's own protocol: generated beside hfl_lab/trust, not in the workload.
    from hfl_lab.trust.proto import trust_pb2, trust_pb2_grpc

    assert Path(trust_pb2.__file__).parent == REPO / "hfl_lab" / "trust" / "proto"
    assert "TrustService" in trust_pb2.DESCRIPTOR.services_by_name
    assert trust_pb2_grpc.TrustServiceStub is not None
    assert not (REPO / "trainer" / "proto" / "trust.proto").exists()


def test_messages_serialize_in_this_checkout() -> None:
    chunk = pb.TensorChunk(
        header=pb.StreamHeader(kind=pb.UPDATE_KIND_WEIGHTS, model_version=4, tensor_count=1),
        final=True,
    )
    chunk.pieces.add(
        name="dense/bias",
        dtype=pb.DTYPE_FLOAT32,
        shape=[10],
        wire_dtype=pb.DTYPE_BFLOAT16,
        total_bytes=20,
        data=bytes(20),
    )
    event = pb.Event(seq=1, kind="attestation", timestamp=1.5, payload_json='{"verdict": "ok"}')

    assert pb.TensorChunk.FromString(chunk.SerializeToString()) == chunk
    assert pb.Event.FromString(event.SerializeToString()) == event
    assert not list((REPO / "trainer" / "proto").glob(".generate-*"))
