"""Backends: where the lab's participants run (local processes, or pods on Kubernetes)."""

from __future__ import annotations

from hfl_lab._exceptions import ConfigError
from hfl_lab.backends.base import Backend, PreflightCheck, ProgressCallback
from hfl_lab.backends.kubernetes.settings import KubernetesSettings
from hfl_lab.backends.local import LocalBackend
from hfl_lab.config import LabConfig

__all__ = ["Backend", "PreflightCheck", "ProgressCallback", "create_backend"]


def create_backend(config: LabConfig) -> Backend:
    """The backend a :class:`hfl_lab.config.LabConfig` asks for, not yet started."""
    if config.backend == "local":
        local: Backend = LocalBackend(config)
        return local
    if config.backend == "kubernetes":
        # lazy: the kubernetes client (~2 s) loads only for backend=kubernetes, never with
        # `from hfl_lab import ...` in a notebook or for the local backend
        from hfl_lab.backends.kubernetes.backend import KubernetesBackend

        cluster: Backend = KubernetesBackend(KubernetesSettings.from_config(config))
        return cluster
    raise ConfigError(
        f"unknown backend {config.backend!r}.", fix="use backend='local' or 'kubernetes'."
    )
