"""HFL-TDX Lab: horizontal federated learning inside Intel TDX confidential containers."""

from hfl_lab._exceptions import (
    AttestationError,
    BackendError,
    ConfigError,
    HflLabError,
    PolicyViolation,
    QuoteFormatError,
    VaultError,
)

__version__ = "0.1.0"

__all__ = [
    "AttestationError",
    "BackendError",
    "ConfigError",
    "HflLabError",
    "PolicyViolation",
    "QuoteFormatError",
    "VaultError",
    "__version__",
]
