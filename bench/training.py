"""P1, P2, P4: what the attested parameter server costs training, against same-run baselines.

P1 and P2 run a real :class:`~trainer.ps.ParameterServer` behind the attested mesh
(``serve_ps``: mesh mTLS plus the pairwise evidence check) and its clients in this process,
with a trust service and simulated TDs (:class:`bench.support.LabMesh`).
"""

from __future__ import annotations

import statistics
import sys
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import grpc
import numpy as np
import numpy.typing as npt

from bench.codec import flat_arrays, resnet_arrays
from bench.registry import BenchContext, Measurement, benchmark
from bench.support import MESSAGE_OPTIONS, LabMesh, PlainPki, download, echo_server, upload
from bench.timing import interleaved_medians
from hfl_lab.config import LabConfig
from hfl_lab.events import LabEvent
from trainer.aggregation import Mode
from trainer.flat import FlatTensors, flat_layout
from trainer.model import ResNet, VariableSpec, build_resnet
from trainer.optim import MomentumSGD
from trainer.proto import parameter_server_pb2 as pb
from trainer.ps import ParameterServer, PsOptions
from trainer.ps_server import serve_ps, worker_peers
from trainer.reference import train_reference
from trainer.serving import channel_factory, parameter_server, schedule_for
from trainer.tensor_decode import StreamAssembler
from trainer.tensor_wire import WireChunk, parse_chunk, serialize_tensors
from trainer.tensors import DEFAULT_CHUNK_BYTES, TensorSpec
from trainer.worker import PsConnection, Worker, WorkerSummary, worker_batches

Arrays = dict[str, npt.NDArray[Any]]


def _lab(depth: int, workers: int, batch_size: int, steps: int) -> LabConfig:
    """A sync run of the reference optimizer; no evaluation or checkpoints inside the timing."""
    return LabConfig.profile(
        "quick", depth=depth, workers=workers, batch_size=batch_size, steps=steps,
        aggregation="sync", eval_every=0, checkpoint_every=0, threads=0, vault=False,
    )


def _served(mesh: LabMesh, servicer: ParameterServer, workers: int) -> tuple[grpc.Server, str]:
    """``servicer`` as ps0 on the attested mesh, exactly as trainer.serving serves it."""
    ps = mesh.attest("ps0")
    check = mesh.peer_check(ps, "ps0", worker_peers(workers))
    server, port = serve_ps(servicer, ps, check)
    return server, f"127.0.0.1:{port}"


# ------------------------------------------------------------------------------ P1


class ReferenceStepper:
    """trainer.reference's single-process loop on its own model, one step per :meth:`step`.

    It runs in a thread of its own but never alongside anything else: :meth:`step` hands it
    one step and waits for it, so attested and reference steps can alternate one by one.
    """

    def __init__(self, model: ResNet, initial: Mapping[str, npt.NDArray[np.float32]],
                 lab: LabConfig, stream: Any, num_train: int) -> None:
        self.times: list[float] = []
        self._go = threading.Semaphore(0)
        self._done = threading.Semaphore(0)
        self._stop = False
        self._started = 0.0
        self._error: BaseException | None = None
        optimizer = MomentumSGD(model.variable_specs, schedule_for(lab, num_train),
                                momentum=lab.momentum, weight_decay=lab.weight_decay)

        def steps() -> Iterator[list[tuple[Any, Any]]]:
            index = 0
            while True:
                self._go.acquire()
                if self._stop:
                    return
                self._started = time.perf_counter()
                yield [stream.batch(index)]
                index += 1

        def on_step(index: int, loss: float) -> None:
            self.times.append(time.perf_counter() - self._started)
            self._done.release()

        def run() -> None:
            try:
                train_reference(model, initial, steps(), optimizer, on_step=on_step)
            except BaseException as e:  # reported by the next step()
                self._error = e
                self._done.release()

        self._thread = threading.Thread(target=run, daemon=True, name="reference-steps")
        self._thread.start()

    def step(self) -> None:
        self._go.release()
        self._done.acquire()
        if self._error is not None:
            raise self._error

    def close(self) -> None:
        self._stop = True
        self._go.release()
        self._thread.join(timeout=60)


def interleaved_steps(depth: int, lab: LabConfig, steps: int) -> tuple[
        list[float], list[float], WorkerSummary]:
    """Durations of ``steps`` sync steps of worker0 against ps0 over the attested mesh and of
    as many single-process reference steps, alternating one by one (same initial weights,
    batches and data; each side has its own model)."""
    stream, num_train = worker_batches(lab, 0)
    model = build_resnet(depth, seed=lab.seed, bn_momentum=lab.bn_momentum)
    initial = model.get_weights()
    reference = ReferenceStepper(build_resnet(depth, seed=lab.seed, bn_momentum=lab.bn_momentum),
                                 initial, lab, stream, num_train)
    attested: list[float] = []
    resumed = [0.0]

    def on_event(event: LabEvent) -> None:
        if event.kind != "metrics":
            return
        if resumed[0]:  # the worker's own time since the last reference step
            attested.append(time.perf_counter() - resumed[0])
        reference.step()  # the worker waits meanwhile; ps0 idles until its next pull
        resumed[0] = time.perf_counter()

    try:
        with LabMesh(("ps0", "worker0")) as mesh:
            servicer = parameter_server(lab.replace(steps=steps + 10), num_train=num_train,
                                        model=model, initial_weights=initial)
            server, address = _served(mesh, servicer, 1)
            try:
                worker = Worker(
                    0, model, stream,
                    channel_factory(address, mesh.attest("worker0"), mesh.verifier("worker0")),
                    schedule=schedule_for(lab, num_train), momentum=lab.momentum,
                    weight_decay=lab.weight_decay, emit=on_event, max_steps=steps,
                )
                summary = worker.run()
            finally:
                server.stop(0).wait()
                servicer.close()
            per_step = {k: round(v / max(1, servicer.timings["pushes"]) * 1e3, 2)
                        for k, v in servicer.timings.items() if k.endswith("_s")}
            print(f"  ps0 per push (ms, mean over all steps): {per_step}", file=sys.stderr)
    finally:
        reference.close()
    if len(summary.steps) != steps or not all(s.accepted for s in summary.steps):
        raise AssertionError(f"worker0 did {len(summary.steps)} accepted steps of {steps}")
    return attested, reference.times, summary


def measure_step(ctx: BenchContext, *, depth: int, batch_size: int) -> Measurement:
    warmup = 2
    steps = ctx.repeats(10, 3)
    lab = _lab(depth, 1, batch_size, warmup + steps + 1)
    # attested step k (k >= 1) is timed from the end of reference step k-1
    attested, ref, summary = interleaved_steps(depth, lab, warmup + steps + 1)
    attested, ref = attested[warmup:], ref[warmup + 1:]
    parts = {part: statistics.median(getattr(r, part) for r in summary.steps[warmup + 1:])
             for part in ("compute_s", "push_s", "wait_s", "pull_s")}
    print(f"  P1-resnet{depth}: attested steps {np.round(attested, 3).tolist()} s, "
          f"reference steps {np.round(ref, 3).tolist()} s; worker0 medians "
          f"{ {k: round(v * 1e3, 1) for k, v in parts.items()} } ms", file=sys.stderr)
    return Measurement(statistics.median(attested), statistics.median(ref))


_P1 = ("attested sync step of ResNet-{depth}, 1 worker, batch {batch} (ps0 and worker0 in "
       "this process on threads, over the attested mesh: mesh mTLS + evidence check, "
       "chunked float32 pull and push, PS aggregation and MomentumSGD; TensorFlow default "
       "threads), median of {steps} steps after 2 warm-up ÷ the single-process step "
       "(trainer.reference: compute_gradients + MomentumSGD.apply + set_weights) on the same "
       "model, initial weights, batches and data; the two alternate step by step, s")


@benchmark("P1-resnet20", what=_P1.format(depth=20, batch=128, steps=10), unit="s",
           goal="<= 1.05", depth=20, batch_size=128)
@benchmark("P1-resnet56", what=_P1.format(depth=56, batch=128, steps=10), unit="s",
           goal="<= 1.05", depth=56, batch_size=128)
def step_time(ctx: BenchContext, *, depth: int, batch_size: int) -> Measurement:
    return measure_step(ctx, depth=depth, batch_size=batch_size)


# ------------------------------------------------------------------------------ P2


def fedavg_ps(arrays: Arrays) -> ParameterServer:
    """A PS holding ``arrays`` as its model, in FedAvg mode (a push replaces the weights)."""
    specs = [TensorSpec.of(name, array) for name, array in arrays.items()]
    variables = [VariableSpec(s.name, s.shape, "float32", True, False) for s in specs]
    options = PsOptions(mode=Mode.FEDAVG, num_workers=1, total_steps=1 << 40,
                        chunk_bytes=DEFAULT_CHUNK_BYTES)
    return ParameterServer(specs, arrays, MomentumSGD(variables, 0.1), options)


def raw_chunks(arrays: Arrays, chunk_bytes: int = DEFAULT_CHUNK_BYTES) -> list[bytes]:
    """The arrays' bytes in messages of the size the PS streams."""
    payload = b"".join(np.ascontiguousarray(a).tobytes() for a in arrays.values())
    return [payload[i:i + chunk_bytes] for i in range(0, len(payload), chunk_bytes)]


def measure_push_pull(ctx: BenchContext, *, arrays: Arrays, full_repeats: int) -> Measurement:
    total = sum(a.nbytes for a in arrays.values())
    specs = [TensorSpec.of(name, array) for name, array in arrays.items()]
    layout = flat_layout(specs)
    assert layout is not None  # float32 arrays
    # what a worker pushes: its model's flat buffer (compute_gradients hands it out as one)
    update = layout.gather(arrays)
    pki = PlainPki()
    echo, echo_port, _ = echo_server(pki.server_credentials("ps0"))
    plain = pki.channel(f"127.0.0.1:{echo_port}", "worker0", "ps0", MESSAGE_OPTIONS)
    chunks = raw_chunks(arrays)
    with LabMesh(("ps0", "worker0")) as mesh:
        servicer = fedavg_ps(arrays)
        server, address = _served(mesh, servicer, 1)
        conn = PsConnection(channel_factory(address, mesh.attest("worker0"),
                                            mesh.verifier("worker0"))())
        try:
            conn.register("worker0", 0)
            version = [servicer.version]

            def push_pull() -> None:
                header = pb.StreamHeader(kind=pb.UPDATE_KIND_WEIGHTS, model_version=version[0],
                                         worker_id="worker0", num_samples=1)
                reply, _, sent = conn.push(update, header)
                pulled = conn.pull("worker0", version[0] + 1, specs)
                if not reply.accepted or sent != total or pulled.nbytes != total:
                    raise AssertionError(f"push/pull moved {sent}/{pulled.nbytes} of {total} B")
                version[0] = pulled.version

            def echo_round() -> None:
                upload(plain, chunks)
                if download(plain) != total:
                    raise AssertionError("the echo lost bytes")

            medians = interleaved_medians({"ps": push_pull, "echo": echo_round},
                                          repeats=ctx.repeats(full_repeats), warmup=1)
            timings = {k: round(v, 3) for k, v in servicer.timings.items()}
            print(f"  P2 {total / 1e6:.1f} MB: PS push+pull {medians['ps'] * 1e3:.1f} ms, echo "
                  f"{medians['echo'] * 1e3:.1f} ms; PS timings (all rounds) {timings}",
                  file=sys.stderr)
        finally:
            conn.close()
            plain.close()
            server.stop(0).wait()
            echo.stop(0).wait()
            servicer.close()
    return Measurement(2 * total / medians["ps"], 2 * total / medians["echo"])


_P2 = ("PS push + pull of {size} float32 ({shapes}) as flat streams (the model's one buffer) "
       "through a real ParameterServer (FedAvg, "
       "1 worker, attested mesh, client and ps0 in this process; worker-side encode/decode, "
       "PS decode, aggregation, encode included) ÷ a raw gRPC mutual-TLS echo of the same "
       "bytes in the same 1 MiB messages (client-stream upload + server-stream download, "
       "generic bytes handlers, ordinary certificates), B/s, medians of interleaved rounds")


@benchmark("P2-100MB", what=_P2.format(size="100 MB", shapes="25 tensors of 4 MB"),
           unit="B/s", goal=">= 0.9", model="flat100MB", full_repeats=5)
@benchmark("P2-3.4MB", what=_P2.format(size="3.4 MB", shapes="ResNet-56 shapes"),
           unit="B/s", goal=">= 0.9", model="resnet56", full_repeats=21)
def push_pull_throughput(ctx: BenchContext, *, model: str, full_repeats: int) -> Measurement:
    arrays = resnet_arrays(9) if model == "resnet56" else flat_arrays(100_000_000)
    return measure_push_pull(ctx, arrays=arrays, full_repeats=full_repeats)


# ------------------------------------------------------------------------------ P4


def _pushes(specs: Sequence[TensorSpec], results: Sequence[Any], version: int,
            chunk_bytes: int) -> Iterator[tuple[str, list[bytes]]]:
    """What the workers stream to ps0 for step ``version``: their gradients and BN statistics,
    serialized as Worker._step sends them (the model's flat buffer)."""
    layout = flat_layout(specs)
    for i, result in enumerate(results):
        tensors = {**result.gradients, **result.non_trainable}
        flat = result.flat
        if flat is None or layout is None or not flat.layout.same_as(layout):
            flat = layout.gather(tensors) if layout is not None else tensors
        header = pb.StreamHeader(kind=pb.UPDATE_KIND_GRADIENTS, model_version=version,
                                 worker_id=f"worker{i}", num_samples=result.num_samples)
        yield f"worker{i}", [c.data for c in serialize_tensors(flat, header=header,
                                                                chunk_bytes=chunk_bytes)]


def ps_step(servicer: ParameterServer, pushes: Sequence[tuple[str, list[bytes]]],
            trainable: Sequence[str], frozen: Sequence[str]) -> None:
    """ps0's work for one sync step, as PushUpdate does it without the transport: parse and
    decode every push (as ps_server's handler and PushUpdate do), submit it to the aggregator;
    the last one completes the step and applies it."""
    for worker, messages in pushes:
        assembler = StreamAssembler(servicer.specs)
        for message in messages:
            chunk: WireChunk = parse_chunk(message)
            assembler.add(chunk)
        decoded = assembler.finish()
        tensors = decoded.tensors
        if isinstance(tensors, FlatTensors):  # as PushUpdate: views of the buffer's two parts
            update, stats = tensors.trainable, tensors.non_trainable
        else:
            update = {n: tensors[n] for n in trainable}  # type: ignore[assignment]
            stats = {n: tensors[n] for n in frozen}  # type: ignore[assignment]
        outcome = servicer.aggregator.submit(
            worker, decoded.header.model_version, update,
            num_samples=max(1, decoded.header.num_samples),
            non_trainable=stats,
            checked_finite=True,  # as PushUpdate: the decoder refused NaN/Inf already
        )
        if not outcome.accepted:
            raise AssertionError(f"{worker}'s update was refused: {outcome.reason}")


@benchmark(
    "P4",
    what="ps0's work per sync step with 8 workers, ResNet-56, batch 128 per worker: parse and "
    "decode 8 flat float32 pushes + Aggregator.submit ×8 + MomentumSGD apply (the real "
    "ParameterServer's aggregator and _apply, without the transport), median over steps ÷ "
    "one worker's compute for its batch (set_weights + batch + compute_gradients, TensorFlow "
    "default threads), median, s",
    unit="s",
    goal="<= 0.03",
)
def ps_share(ctx: BenchContext) -> Measurement:
    workers, warmup = 8, 1
    steps = ctx.repeats(5, 2)
    lab = _lab(56, workers, 128, 1000)
    stream, num_train = worker_batches(lab, 0)
    model = build_resnet(56, seed=lab.seed, bn_momentum=lab.bn_momentum)
    weights = model.get_weights()
    servicer = parameter_server(lab, num_train=num_train, model=model, initial_weights=weights)
    trainable = [spec.name for spec in servicer.specs if spec.trainable]
    frozen = [spec.name for spec in servicer.specs if not spec.trainable]
    compute: list[float] = []
    ps: list[float] = []
    results: list[Any] = []
    try:
        # one worker's step, then ps0's step, alternating: drift hits both alike
        for step in range(warmup + steps):
            started = time.perf_counter()  # what Worker._step counts as compute
            model.set_weights(weights)
            x, y = stream.batch(step)
            results = [*results[-3:], model.compute_gradients(x, y)]
            compute.append(time.perf_counter() - started)
            # 8 workers' gradients: real ones, reused round robin (values do not change the cost)
            sets = [results[i % len(results)] for i in range(workers)]
            pushes = list(_pushes(servicer.specs, sets, servicer.version, lab.chunk_bytes))
            started = time.perf_counter()
            ps_step(servicer, pushes, trainable, frozen)
            ps.append(time.perf_counter() - started)
        if servicer.version != warmup + steps:
            raise AssertionError(f"ps0 is at version {servicer.version}, not {warmup + steps}")
    finally:
        servicer.close()
    ps, compute = ps[warmup:], compute[warmup:]
    print(f"  P4: ps0 step {np.round(ps, 4).tolist()} s (update_s total "
          f"{servicer.timings['update_s']:.3f} s over {servicer.timings['updates']:.0f}), "
          f"worker compute {np.round(compute, 3).tolist()} s", file=sys.stderr)
    return Measurement(statistics.median(ps), statistics.median(compute))
