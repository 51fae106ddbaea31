"""P6: a 100 MB checkpoint through the user-space LUKS path ÷ plain file I/O of the same bytes.

Write: ``ModelVault.write_checkpoint`` on an open volume (debugfs allocates the payload's blocks,
the data is encrypted straight into them, the metadata goes through the redo journal, fsync;
``keep_last=1``, so each write also drops the previous checkpoint) against writing the
same bytes to a new plain file with fsync (and then removing the previous one); each round
writes new bytes, as training does. Read:
``latest_checkpoint()`` on the open volume (MAC check, copy out of the decrypted image, SHA-256
verification) against reading the plain file back. Both sides run on the same file system,
interleaved, and the page cache is warm for both reads. ``X-vault-open`` adds what the read
leaves out: unlocking the key slot and decrypting the whole data segment when a volume is opened.
"""

from __future__ import annotations

import gc
import os
import statistics
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from bench.registry import BenchContext, Measurement, benchmark
from bench.timing import interleaved_medians
from hfl_lab.vault import ModelVault, new_passphrase

CHECKPOINT_BYTES = 100_000_000
# Room for the checkpoint being written beside the one it replaces (keep_last=1).
VOLUME_MB = 256
# The passphrase is 256 random bits, so key stretching protects nothing; the figure is about
# the data path, not about PBKDF2 (whose cost cryptsetup calibrates to ~0.5 s by default).
KDF_ITERATIONS = 1000

_WHAT = (
    "100 MB checkpoint {what} through the user-space LUKS path ({how}) ÷ plain file I/O of the "
    "same bytes ({plain}), B/s"
)


@contextmanager
def _volume(payload: bytes) -> Iterator[tuple[ModelVault, Path, Path, bytes]]:
    """An open user-space vault holding one checkpoint, and the same bytes in a plain file."""
    with tempfile.TemporaryDirectory(prefix="hfl-bench-vault-") as folder:
        root = Path(folder)
        passphrase = new_passphrase()
        vault = ModelVault.create(
            root / "model.luks",
            passphrase,
            VOLUME_MB,
            path_kind="userspace",
            kdf_iterations=KDF_ITERATIONS,
            keep_last=1,
        )
        try:
            vault.write_checkpoint(0, payload, {"step": 0})
            plain = root / "plain-0.bin"
            _write_plain(plain, payload)
            yield vault, root, plain, passphrase
        finally:
            vault.close()


def _write_plain(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    try:
        view = memoryview(data)
        done = 0
        while done < len(view):
            done += os.write(fd, view[done:])
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_medians(
    vault: ModelVault, root: Path, payload: bytes, *, repeats: int, warmup: int = 1
) -> dict[str, float]:
    """Median seconds of a vault write and of a plain write, alternating, with new bytes each
    round (made outside the timed calls): a checkpoint's weights change every time, and the
    vault would re-encrypt nothing where a write left the same bytes in the same blocks."""
    base = np.frombuffer(payload, dtype=np.uint8)
    times: dict[str, list[float]] = {"vault": [], "plain": []}
    for round_ in range(1, warmup + repeats + 1):
        data = np.roll(base, round_ * 4099).tobytes()
        gc.collect()
        start = time.perf_counter()
        vault.write_checkpoint(round_, data, {"step": round_})
        vault_s = time.perf_counter() - start
        gc.collect()
        start = time.perf_counter()
        # Like the vault with keep_last=1: the new file is durable, then the old one goes.
        _write_plain(root / f"plain-{round_}.bin", data)
        (root / f"plain-{round_ - 1}.bin").unlink()
        plain_s = time.perf_counter() - start
        if round_ > warmup:
            times["vault"].append(vault_s)
            times["plain"].append(plain_s)
    return {name: statistics.median(values) for name, values in times.items()}


@benchmark(  # registered second: decorators apply bottom-up
    "P6-read",
    what=_WHAT.format(
        what="read",
        how="latest_checkpoint() on the open volume: MAC check, copy out, SHA-256 check",
        plain="read back from the page cache",
    ),
    unit="B/s",
    goal=">= 0.5",
    direction="read",
)
@benchmark(
    "P6-write",
    what=_WHAT.format(
        what="write",
        how="write_checkpoint(): blocks allocated by debugfs and filled in place, XTS, journal, "
        "fsync",
        plain="new file + fsync",
    ),
    unit="B/s",
    goal=">= 0.5",
    direction="write",
)
def vault_throughput(ctx: BenchContext, *, direction: str) -> Measurement:
    payload = os.urandom(CHECKPOINT_BYTES)  # serialized weights do not compress either
    with _volume(payload) as (vault, root, plain, _):
        if direction == "write":
            medians = _write_medians(vault, root, payload, repeats=ctx.repeats(9))
        else:
            assert vault.latest_checkpoint().payload == payload  # a fast wrong read is no figure
            fns: dict[str, Callable[[], object]] = {
                "vault": lambda: vault.latest_checkpoint().payload,
                "plain": plain.read_bytes,
            }
            medians = interleaved_medians(fns, repeats=ctx.repeats(9))
    return Measurement(CHECKPOINT_BYTES / medians["vault"], CHECKPOINT_BYTES / medians["plain"])


@benchmark(
    "X-vault-open",
    what=f"ModelVault.open (key slot with PBKDF2 at {KDF_ITERATIONS} iterations, decrypt the "
    f"whole {VOLUME_MB} MB data segment) + latest_checkpoint() of a 100 MB checkpoint ÷ plain "
    "read of the same bytes from the page cache, B/s",
    unit="B/s",
    goal="report",
)
def vault_open_throughput(ctx: BenchContext) -> Measurement:
    payload = os.urandom(CHECKPOINT_BYTES)
    with _volume(payload) as (vault, _, plain, passphrase):
        path = vault.path
        vault.close()  # the writer's exclusive lock would keep readers out

        def open_and_read() -> None:
            with ModelVault.open(path, passphrase, "userspace", read_only=True) as reader:
                reader.latest_checkpoint()

        medians = interleaved_medians(
            {"vault": open_and_read, "plain": plain.read_bytes}, repeats=ctx.repeats(5)
        )
    return Measurement(CHECKPOINT_BYTES / medians["vault"], CHECKPOINT_BYTES / medians["plain"])
