"""HFL-TDX Lab: horizontal federated learning inside Intel TDX confidential containers."""

from typing import TYPE_CHECKING

from hfl_lab._exceptions import (
    AttestationError,
    BackendError,
    ConfigError,
    HflLabError,
    ImageError,
    ImageRefused,
    PolicyViolation,
    QuoteFormatError,
    VaultError,
)

if TYPE_CHECKING:  # the lazily loaded names below, for type checkers and IDEs
    from hfl_lab.config import LabConfig, validate_notebook_parameters
    from hfl_lab.dashboard import Dashboard, summarize_run
    from hfl_lab.lab import (
        ATTACKS,
        AttestationBoard,
        HostedRun,
        JoinLinks,
        LabTrustService,
        LocalJoiners,
        RemoteWorkerSite,
        VerdictView,
        brief_errors,
        coco_stack,
        create_model_volume,
        ensure_trained,
        host_workshop,
        join_kubernetes,
        join_run,
        measure_image,
        retrieve_and_evaluate,
        run_attacks,
        run_lab,
        run_preflight,
        run_training,
        session_run,
        show,
        show_image,
        watch_workshop,
    )

__version__ = "0.1.0"

__all__ = [
    "ATTACKS",
    "AttestationBoard",
    "AttestationError",
    "BackendError",
    "ConfigError",
    "Dashboard",
    "HflLabError",
    "HostedRun",
    "ImageError",
    "ImageRefused",
    "JoinLinks",
    "LabConfig",
    "LabTrustService",
    "LocalJoiners",
    "PolicyViolation",
    "QuoteFormatError",
    "RemoteWorkerSite",
    "VaultError",
    "VerdictView",
    "__version__",
    "brief_errors",
    "coco_stack",
    "create_model_volume",
    "ensure_trained",
    "host_workshop",
    "join_kubernetes",
    "join_run",
    "measure_image",
    "retrieve_and_evaluate",
    "run_attacks",
    "run_lab",
    "run_preflight",
    "run_training",
    "session_run",
    "show",
    "show_image",
    "summarize_run",
    "validate_notebook_parameters",
    "watch_workshop",
]

#: where the notebooks' API (the names in ``__all__`` not defined above) is found, in order
_LAZY_SOURCES = ("hfl_lab.config", "hfl_lab.dashboard", "hfl_lab.lab")


def __getattr__(name: str) -> object:
    """The notebooks' API, imported when first used (PEP 562): a name of ``__all__`` from the
    first of ``_LAZY_SOURCES`` that exports it."""
    if name in __all__:
        import importlib

        for source in _LAZY_SOURCES:
            module = importlib.import_module(source)
            if name in getattr(module, "__all__", ()):
                value = getattr(module, name)
                globals()[name] = value
                return value
    raise AttributeError(f"module 'hfl_lab' has no attribute {name!r}")
