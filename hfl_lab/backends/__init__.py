"""Backends: where the lab's participants run (local processes, or pods on Kubernetes)."""

from __future__ import annotations

from hfl_lab._exceptions import ConfigError
from hfl_lab.backends.base import Backend, PreflightCheck, ProgressCallback
from hfl_lab.config import LabConfig

__all__ = ["Backend", "PreflightCheck", "ProgressCallback", "create_backend"]


def create_backend(config: LabConfig) -> Backend:
    """The backend a :class:`hfl_lab.config.LabConfig` asks for, not yet started."""
    if config.backend == "local":
        from hfl_lab.backends.local import LocalBackend

        local: Backend = LocalBackend(config)
        return local
    if config.backend == "kubernetes":
        from hfl_lab.backends.kubernetes.backend import KubernetesBackend
        from hfl_lab.backends.kubernetes.settings import KubernetesSettings

        cluster: Backend = KubernetesBackend(KubernetesSettings.from_config(config))
        return cluster
    raise ConfigError(
        f"unknown backend {config.backend!r}.", fix="use backend='local' or 'kubernetes'."
    )
