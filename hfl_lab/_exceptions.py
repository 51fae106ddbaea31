"""The lab's exception tree: every error a user can see is one of these.

    HflLabError                  base; ``str(e)`` is one sentence naming the problem and the fix
    ├── ConfigError              a parameter is missing, unknown or of the wrong type/value
    ├── AttestationError         evidence could not be obtained, parsed or verified
    │   ├── QuoteFormatError     a quote/TDREPORT is truncated or inconsistent (field + offset)
    │   ├── PeerUnreachable      the peer whose certificate is checked cannot be reached
    │   └── TooManyChallenges    the trust service hands out no more challenges for now
    ├── PolicyViolation          evidence is genuine but does not satisfy the policy
    ├── VaultError               the LUKS model volume or a checkpoint in it is unusable
    ├── BackendError             a participant process / pod could not be started or died
    ├── ImageError               the workload image could not be built, pushed, signed or pulled
    │   └── ImageRefused         a pull refused the image: unsigned, tampered, or no layer key
    ├── ApiError                 the Kubernetes API server answered with an error status (the
    │                            backend maps it to a BackendError that says what failed)
    ├── TensorValidationError    a tensor stream or tensor is not what the model expects
    ├── WireFormatError          the bytes are not a well-formed TensorChunk (also ValueError)
    └── WorkerError              a worker cannot go on (refused, misconfigured, PS gone)

Each class carries the exit code ``hfl-lab`` returns for it (:class:`ExitCode`). Foreign
errors are mapped into the tree where they enter: gRPC failures at the CLI's handler and the
trainer's channels, the kubernetes client's answers in
``backends/kubernetes/cluster_api.py``, OSError at the vault. Catch ``HflLabError`` at a
boundary (notebook cell, CLI command) and show ``str(e)``; every other exception is a bug in the
lab.
"""

from __future__ import annotations

from enum import IntEnum
from typing import TYPE_CHECKING, ClassVar

if TYPE_CHECKING:
    import grpc

__all__ = [
    "ApiError",
    "AttestationError",
    "BackendError",
    "ConfigError",
    "ExitCode",
    "HflLabError",
    "ImageError",
    "ImageRefused",
    "PeerUnreachable",
    "PolicyViolation",
    "QuoteFormatError",
    "TensorValidationError",
    "TooManyChallenges",
    "VaultError",
    "WireFormatError",
    "WorkerError",
]


class ExitCode(IntEnum):
    """What ``hfl-lab`` returns; ``hfl_lab.cli.EXIT_CODE_HELP`` says what each one means."""

    SUCCESS = 0
    REJECTED = 1
    INVALID_INPUT = 2
    UNAVAILABLE = 3
    FAILED = 4


class HflLabError(Exception):
    """Base class of every error the lab raises on purpose."""

    #: what ``hfl-lab`` exits with when this error ends a command
    exit_code: ClassVar[ExitCode] = ExitCode.FAILED
    #: what the user can do about it; appended to the message when set
    fix: str | None = None

    def __init__(self, message: str, *, fix: str | None = None) -> None:
        self.message = message
        if fix is not None:
            self.fix = fix
        super().__init__(message)

    def __str__(self) -> str:
        if self.fix:
            return f"{self.message} Fix: {self.fix}"
        return self.message

    def one_line(self) -> str:
        """The message, then the fix, on one line: what the CLI and the notebooks print."""
        message = " ".join(self.message.split())
        if self.fix:
            if not message.endswith((".", "!", "?")):
                message += "."
            message += f" Fix: {' '.join(self.fix.split())}"
        return message


class ConfigError(HflLabError):
    """A configuration value is missing, unknown, or has the wrong type or range."""

    exit_code = ExitCode.INVALID_INPUT


class AttestationError(HflLabError):
    """Evidence could not be obtained, parsed or cryptographically verified.

    ``check`` names the failing check; ``expected``/``actual`` hold the values compared
    where there are any.
    """

    exit_code = ExitCode.INVALID_INPUT

    def __init__(
        self,
        message: str,
        *,
        check: str = "attestation",
        expected: object = None,
        actual: object = None,
        fix: str | None = None,
    ) -> None:
        super().__init__(message, fix=fix)
        self.check = check
        self.expected = expected
        self.actual = actual


class QuoteFormatError(AttestationError):
    """A TDX quote or TDREPORT is truncated or inconsistent; names the field and offset."""

    def __init__(self, message: str, *, field: str, offset: int) -> None:
        super().__init__(
            f"malformed quote: {message} (field '{field}' at offset {offset})",
            check="quote_format",
        )
        self.field = field
        self.offset = offset


class PeerUnreachable(AttestationError):
    """The peer whose certificate and evidence are to be checked cannot be reached."""

    exit_code = ExitCode.UNAVAILABLE

    def __init__(self, message: str, *, fix: str | None = None) -> None:
        super().__init__(message, check="connection", fix=fix)


class TooManyChallenges(AttestationError):
    """The trust service hands out no more challenges for now (a rate or a total is spent)."""

    exit_code = ExitCode.UNAVAILABLE


class PolicyViolation(HflLabError):
    """Evidence is authentic but its claims do not satisfy the attestation policy."""

    exit_code = ExitCode.REJECTED


class VaultError(HflLabError):
    """The LUKS model volume, its key, or a checkpoint inside it is unusable."""


class BackendError(HflLabError):
    """A participant could not be started, died, or the backend is unreachable."""


class ImageError(HflLabError):
    """The workload image could not be built, pushed, encrypted, signed, pulled or unpacked
    (a tool is missing or failed; the message names the command and its last line)."""


class ImageRefused(ImageError):
    """A pull refused the image: its signature is missing or does not verify, a layer does not
    match the signed manifest, or its layer key was not released (or does not decrypt it)."""

    exit_code = ExitCode.REJECTED


class ApiError(HflLabError):
    """A non-2xx answer of the Kubernetes API server (status, reason and the Status message)."""

    exit_code = ExitCode.UNAVAILABLE

    def __init__(self, status: int, reason: str, message: str) -> None:
        super().__init__(f"{status} {reason}: {message}")
        self.status = status
        self.reason = reason
        #: the API server's Status message alone (``str(e)`` has status and reason too)
        self.message = message

    def __str__(self) -> str:
        return f"{self.status} {self.reason}: {self.message}"


class TensorValidationError(HflLabError):
    """A tensor stream or a tensor in it is not what the model expects.

    ``code`` is the gRPC status the receiving side should answer with; ``tensor`` names the
    offending tensor (None for stream-level problems); ``expected``/``actual`` are the values
    compared.
    """

    exit_code = ExitCode.INVALID_INPUT

    def __init__(
        self,
        message: str,
        *,
        code: grpc.StatusCode,
        tensor: str | None = None,
        expected: object = None,
        actual: object = None,
        fix: str | None = None,
    ) -> None:
        super().__init__(message, fix=fix)
        self.code = code
        self.tensor = tensor
        self.expected = expected
        self.actual = actual


class WireFormatError(HflLabError, ValueError):
    """The bytes are not a well-formed TensorChunk (gRPC answers such a message INTERNAL)."""

    exit_code = ExitCode.INVALID_INPUT


class WorkerError(HflLabError):
    """The worker cannot go on (refused by the PS, misconfigured, PS gone for good)."""
