"""Supplementary X-codec figures: the flat tensor stream workers and ps0 exchange, serialized
and decoded (trainer.tensor_wire + trainer.tensor_decode) ÷ a plain bytes round trip."""

from __future__ import annotations

from typing import Any

import numpy as np
import numpy.typing as npt

from bench.registry import BenchContext, Measurement, benchmark
from bench.timing import interleaved_medians
from trainer.flat import FlatTensors, flat_layout
from trainer.proto import parameter_server_pb2 as pb
from trainer.tensor_decode import StreamAssembler
from trainer.tensor_wire import parse_chunk, serialize_tensors
from trainer.tensors import DEFAULT_CHUNK_BYTES, TensorSpec

Arrays = dict[str, npt.NDArray[Any]]

_WHAT = (
    "flat tensor stream as workers push and pull it: serialize_tensors of the model's flat "
    "buffer into 1 MiB messages, parse_chunk of each, StreamAssembler (float32 wire, full "
    "validation incl. NaN/Inf, into reused memory) of {size} float32 ({shapes}) ÷ tobytes + "
    "np.frombuffer of the same arrays, in B/s"
)


def resnet_shapes(blocks_per_stage: int = 9) -> dict[str, tuple[int, ...]]:
    """Tensor shapes of ResNet-(6n+2) v1 for CIFAR: 3.4 MB of float32 for n = 9 (ResNet-56)."""
    shapes: dict[str, tuple[int, ...]] = {"stem/conv/kernel": (3, 3, 3, 16)}
    _add_batch_norm(shapes, "stem/bn", 16)
    channels_in = 16
    for stage, channels in enumerate((16, 32, 64)):
        for block in range(blocks_per_stage):
            prefix = f"stage{stage}/block{block}"
            shapes[f"{prefix}/conv1/kernel"] = (3, 3, channels_in, channels)
            _add_batch_norm(shapes, f"{prefix}/bn1", channels)
            shapes[f"{prefix}/conv2/kernel"] = (3, 3, channels, channels)
            _add_batch_norm(shapes, f"{prefix}/bn2", channels)
            if channels_in != channels:
                shapes[f"{prefix}/shortcut/kernel"] = (1, 1, channels_in, channels)
            channels_in = channels
    shapes["dense/kernel"] = (64, 10)
    shapes["dense/bias"] = (10,)
    return shapes


def resnet_arrays(blocks_per_stage: int = 9, seed: int = 0) -> Arrays:
    rng = np.random.default_rng(seed)
    shapes = resnet_shapes(blocks_per_stage)
    return {name: rng.standard_normal(shape, dtype=np.float32) for name, shape in shapes.items()}


def _add_batch_norm(shapes: dict[str, tuple[int, ...]], prefix: str, channels: int) -> None:
    for part in ("gamma", "beta", "moving_mean", "moving_variance"):
        shapes[f"{prefix}/{part}"] = (channels,)


def flat_arrays(total_bytes: int, tensor_bytes: int = 4_000_000, seed: int = 0) -> Arrays:
    """``total_bytes`` of float32 in tensors of ``tensor_bytes`` each (a large dense model)."""
    rng = np.random.default_rng(seed)
    count, rest = divmod(total_bytes, tensor_bytes)
    sizes = [tensor_bytes] * count + ([rest] if rest else [])
    return {
        f"layer{i}/kernel": rng.standard_normal(n // 4, dtype=np.float32)
        for i, n in enumerate(sizes)
    }


def codec_round_trip(tensors: FlatTensors, specs: list[TensorSpec]) -> FlatTensors:
    """What a push or a pull does to the tensors besides TLS and the socket: the messages are
    bytes, as gRPC sends and receives them (``PsConnection``, ``add_parameter_server``)."""
    header = pb.StreamHeader(kind=pb.UPDATE_KIND_WEIGHTS, model_version=1)
    messages = [chunk.data for chunk in serialize_tensors(tensors, header=header,
                                                          chunk_bytes=DEFAULT_CHUNK_BYTES)]
    assembler = StreamAssembler(specs)
    for message in messages:
        assembler.add(parse_chunk(message))
    decoded = assembler.finish().tensors
    assert isinstance(decoded, FlatTensors)
    return decoded


def bytes_round_trip(arrays: Arrays) -> Arrays:
    return {
        name: np.frombuffer(array.tobytes(), dtype=array.dtype).reshape(array.shape)
        for name, array in arrays.items()
    }


def measure_codec(ctx: BenchContext, *, arrays: Arrays, full_repeats: int) -> Measurement:
    specs = [TensorSpec.of(name, array) for name, array in arrays.items()]
    total = sum(array.nbytes for array in arrays.values())
    layout = flat_layout(specs)
    assert layout is not None  # float32 arrays
    flat = layout.gather(arrays)  # a worker's model hands out this buffer as it is
    result = codec_round_trip(flat, specs)
    for name, array in arrays.items():  # a fast codec that loses data would be no figure
        np.testing.assert_array_equal(result[name], array)
    del result  # its memory is the next round's, as a PS's or worker's would be
    medians = interleaved_medians(
        {
            "codec": lambda: codec_round_trip(flat, specs),
            "bytes": lambda: bytes_round_trip(arrays),
        },
        repeats=ctx.repeats(full_repeats),
    )
    return Measurement(value=total / medians["codec"], baseline=total / medians["bytes"])


@benchmark(  # registered second: decorators apply bottom-up
    "X-codec-100MB",
    what=_WHAT.format(size="100 MB", shapes="25 tensors of 4 MB"),
    unit="B/s",
    goal="report",
    model="flat100MB",
    full_repeats=7,
)
@benchmark(
    "X-codec-3.4MB",
    what=_WHAT.format(size="3.4 MB", shapes=f"ResNet-56 shapes, {len(resnet_shapes(9))} tensors"),
    unit="B/s",
    goal="report",
    model="resnet56",
    full_repeats=21,
)
def codec_throughput(ctx: BenchContext, *, model: str, full_repeats: int) -> Measurement:
    arrays = resnet_arrays(9) if model == "resnet56" else flat_arrays(100_000_000)
    return measure_codec(ctx, arrays=arrays, full_repeats=full_repeats)
