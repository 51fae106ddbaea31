"""TensorFlow for the trainer: the Keras backend checked, TensorFlow imported once and quietly,
its thread pools sized.

Importing TensorFlow writes, straight to file descriptor 2 and before its logging is configured,
notes that are no news on a CPU machine (oneDNN is on, no CUDA driver, CPU features), and the
GPU build then logs a failed ``cuInit`` as an error. On every participant's log and in every
notebook these read like faults. :func:`import_tensorflow` captures file descriptor 2 while
TensorFlow loads and looks for devices, drops exactly those notes and writes every other line
back, so a real warning or error still shows.
"""

from __future__ import annotations

import logging
import os
import re
import sys
import tempfile
import threading

from hfl_lab._exceptions import ConfigError

__all__ = ["BENIGN_NOTES", "import_tensorflow", "set_threads"]

log = logging.getLogger(__name__)

#: start-up notes of TensorFlow 2.21 on a machine without a GPU
BENIGN_NOTES = re.compile(
    r"All log messages before absl::InitializeLog\(\) is called are written to STDERR"
    r"|port\.cc:\d+\] oneDNN custom operations are on"
    r"|cudart_stub\.cc:\d+\] Could not find cuda drivers"
    r"|cuda_platform\.cc:\d+\] failed call to cuInit"
    r"|cuda_executor\.cc:\d+\] .*(no NVIDIA GPU|kernel driver does not appear)"
    r"|cpu_feature_guard\.cc:\d+\] This TensorFlow binary is optimized"
    r"|^To enable the following instructions: .* rebuild TensorFlow"
)

_lock = threading.Lock()


def _check_backend(name: str) -> None:
    if name != "tensorflow":
        raise ConfigError(
            f"Keras is set to run on the {name!r} backend; the trainer needs TensorFlow "
            "(compiled steps, SavedModel export).",
            fix="unset KERAS_BACKEND or set KERAS_BACKEND=tensorflow before starting Python.",
        )


def import_tensorflow() -> None:
    """Check the Keras backend, then ``import tensorflow`` with its benign start-up notes
    filtered out (see the module doc); later imports of it find it loaded.

    Keras 3 picks its backend once, at its first import; the lab's engine is TensorFlow (also
    Keras' default). Another explicit choice is refused here, before Keras loads it, and so is
    a Keras that was already imported with another backend.
    """
    _check_backend(os.environ.setdefault("KERAS_BACKEND", "tensorflow"))
    # TensorFlow's own INFO and WARNING logs would fill every participant's log; errors show.
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    keras = sys.modules.get("keras")
    if keras is not None:
        _check_backend(keras.backend.backend())
    with _lock:
        if "tensorflow" in sys.modules:
            return
        sys.stderr.flush()
        saved = os.dup(2)
        with tempfile.TemporaryFile() as captured:
            os.dup2(captured.fileno(), 2)
            try:
                import tensorflow as tf

                tf.config.list_physical_devices()  # where the GPU build tries cuInit, once
            finally:  # a failed import still shows what TensorFlow said
                sys.stderr.flush()
                os.dup2(saved, 2)
                os.close(saved)
                captured.seek(0)
                _write_back(captured.read().decode("utf-8", errors="replace"))


def _write_back(text: str) -> None:
    kept = [line for line in text.splitlines() if line and not BENIGN_NOTES.search(line)]
    if kept:
        sys.stderr.write("\n".join(kept) + "\n")
        sys.stderr.flush()


def set_threads(num_threads: int | None) -> int:
    """Size TensorFlow's CPU thread pools (``None`` keeps its default); returns the count used.

    A TD usually has few vCPUs shared with gRPC threads, so participants pass their vCPU budget
    here instead of letting TensorFlow size its pools from the host: ``num_threads`` threads
    inside each operation and one operation at a time (a ResNet's graph is a chain, so a second
    inter-op thread would only compete for the same cores). TensorFlow fixes its pools when it
    runs its first operation; asking for another size after that keeps the pools and says so.
    """
    import_tensorflow()
    import tensorflow as tf

    if num_threads is not None:
        if num_threads < 1:
            raise ConfigError(
                f"num_threads must be >= 1, got {num_threads}.",
                fix="pass a positive thread count or None for TensorFlow's default.",
            )
        pools = tf.config.threading
        if pools.get_intra_op_parallelism_threads() != num_threads:
            try:
                pools.set_intra_op_parallelism_threads(num_threads)
                pools.set_inter_op_parallelism_threads(1)
            except RuntimeError:
                log.warning(
                    "TensorFlow already started with %s intra-op threads; %d asked for now is "
                    "ignored in this process (set the thread count before building a model).",
                    pools.get_intra_op_parallelism_threads() or "its default",
                    num_threads,
                )
    configured = int(tf.config.threading.get_intra_op_parallelism_threads())
    return configured or (os.cpu_count() or 1)
