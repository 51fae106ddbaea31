"""HFL-TDX Lab: horizontal federated learning inside Intel TDX confidential containers."""

from typing import TYPE_CHECKING

from hfl_lab._exceptions import (
    AttestationError,
    BackendError,
    ConfigError,
    HflLabError,
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
        LabTrustService,
        VerdictView,
        brief_errors,
        coco_stack,
        create_model_volume,
        ensure_trained,
        measure_image,
        retrieve_and_evaluate,
        run_attacks,
        run_lab,
        run_preflight,
        run_training,
        show,
        show_image,
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
    "LabConfig",
    "LabTrustService",
    "PolicyViolation",
    "QuoteFormatError",
    "VaultError",
    "VerdictView",
    "__version__",
    "brief_errors",
    "coco_stack",
    "create_model_volume",
    "ensure_trained",
    "measure_image",
    "retrieve_and_evaluate",
    "run_attacks",
    "run_lab",
    "run_preflight",
    "run_training",
    "show",
    "show_image",
    "summarize_run",
    "validate_notebook_parameters",
]

_LAZY = {
    "LabConfig": "hfl_lab.config",
    "validate_notebook_parameters": "hfl_lab.config",
    "Dashboard": "hfl_lab.dashboard",
    "summarize_run": "hfl_lab.dashboard",
    **{
        name: "hfl_lab.lab"
        for name in (
            "ATTACKS", "AttestationBoard", "LabTrustService", "VerdictView", "brief_errors",
            "coco_stack", "create_model_volume", "ensure_trained", "measure_image",
            "retrieve_and_evaluate", "run_attacks", "run_lab", "run_preflight", "run_training",
            "show", "show_image",
        )
    },
}


def __getattr__(name: str) -> object:
    """The notebooks' API, imported when first used (PEP 562)."""
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'hfl_lab' has no attribute {name!r}")
