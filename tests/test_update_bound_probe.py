"""The update bound's norm summed while a push arrives (trainer.ps_screening.NormProbe) is the
norm of the whole push, and is used only for the update and base it was summed for."""

from __future__ import annotations

import math

import numpy as np

from trainer.flat import FlatTensors, flat_layout, flat_squared_norm, quick_squared_norm
from trainer.proto import parameter_server_pb2 as pb
from trainer.ps_screening import NormProbe
from trainer.tensor_decode import StreamAssembler
from trainer.tensor_wire import parse_chunk, serialize_tensors
from trainer.tensors import TensorSpec

SPECS = [TensorSpec("w", "float32", (300, 700)), TensorSpec("b", "float32", (700,)),
         TensorSpec("stats", "float32", (5000,), trainable=False)]


def model(seed: int) -> FlatTensors:
    layout = flat_layout(SPECS)
    assert layout is not None
    values = np.random.default_rng(seed).standard_normal(layout.size).astype(np.float32)
    return FlatTensors(values, layout)


def push_through(probe: NormProbe, tensors: FlatTensors) -> FlatTensors:
    assembler = StreamAssembler(SPECS, on_elements=probe)
    header = pb.StreamHeader(kind=pb.UPDATE_KIND_WEIGHTS, model_version=4)
    for chunk in serialize_tensors(tensors, header=header, chunk_bytes=100_003):
        assembler.add(parse_chunk(chunk.data))
    decoded = assembler.finish().tensors
    assert isinstance(decoded, FlatTensors)
    return decoded.trainable


def test_the_probe_sums_the_change_of_the_trainable_part_as_it_arrives() -> None:
    # Arrange: the global weights, and a pushed model
    base, pushed = model(1), model(2)
    probe = NormProbe(base.layout.trainable_size, 4, base)
    # Act
    update = push_through(probe, pushed)
    # Assert: the norm of the trainable change, the statistics left out
    squared = probe.squared_norm(update, base)
    split = base.layout.trainable_size
    exact = flat_squared_norm(pushed.buffer[:split], base.buffer[:split])
    assert squared is not None and math.isclose(squared, exact, rel_tol=1e-5)
    # other block boundaries than one pass over the buffer: other float32 roundings
    assert math.isclose(squared, quick_squared_norm(update.buffer, base.buffer[:split]),
                        rel_tol=2e-6)


def test_the_probe_counts_only_for_its_base_and_a_whole_update() -> None:
    base, pushed = model(1), model(2)
    probe = NormProbe(base.layout.trainable_size, 4, base)
    update = push_through(probe, pushed)
    assert probe.squared_norm(update, model(1)) is None  # another snapshot of the weights
    own = NormProbe(base.layout.trainable_size, 4, None)  # a gradient's own norm (sync)
    gradient = push_through(own, pushed)
    assert own.squared_norm(gradient, base) is None and own.squared_norm(gradient, None)
    gaps = NormProbe(base.layout.trainable_size, 4, None)
    gaps(pushed.buffer[:10], 0)
    gaps(pushed.buffer[20:30], 20)  # elements 10..19 never seen
    assert gaps.squared_norm(gradient, None) is None
