"""TensorFlow, imported once and quietly: its C++ start-up notes are filtered, nothing else is.

Importing TensorFlow writes, straight to file descriptor 2 and before its logging is configured,
notes that are no news on a CPU machine (oneDNN is on, no CUDA driver, CPU features), and the
GPU build then logs a failed ``cuInit`` as an error. On every participant's log and in every
notebook these read like faults. :func:`import_tensorflow` captures file descriptor 2 while
TensorFlow loads and looks for devices, drops exactly those notes and writes every other line
back, so a real warning or error still shows.
"""

from __future__ import annotations

import os
import re
import sys
import tempfile
import threading

__all__ = ["BENIGN_NOTES", "import_tensorflow"]

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


def import_tensorflow() -> None:
    """``import tensorflow`` with its benign start-up notes filtered out (see module doc);
    later imports of it find it loaded."""
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
