"""The ``local`` backend: every participant a process with a simulated TD, on loopback."""

from hfl_lab.backends.local.backend import (
    LocalBackend,
    ParticipantProcess,
    TrainingResult,
    free_port,
)

__all__ = ["LocalBackend", "ParticipantProcess", "TrainingResult", "free_port"]
