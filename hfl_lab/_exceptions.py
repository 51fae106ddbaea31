"""The lab's exception tree: every error a user can see is one of these.

    HflLabError                  base; ``str(e)`` is one sentence naming the problem and the fix
    ├── ConfigError              a parameter is missing, unknown or of the wrong type/value
    ├── AttestationError         evidence could not be obtained, parsed or verified
    │   └── QuoteFormatError     a quote/TDREPORT is truncated or inconsistent (field + offset)
    ├── PolicyViolation          evidence is genuine but does not satisfy the policy
    ├── VaultError               the LUKS model volume or a checkpoint in it is unusable
    └── BackendError             a participant process / pod could not be started or died

Catch ``HflLabError`` at a boundary (notebook cell, CLI command) and show ``str(e)``; every
other exception is a bug in the lab.
"""

from __future__ import annotations


class HflLabError(Exception):
    """Base class of every error the lab raises on purpose."""

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


class AttestationError(HflLabError):
    """Evidence could not be obtained, parsed or cryptographically verified.

    ``check`` names the failing check; ``expected``/``actual`` hold the values compared
    where there are any.
    """

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


class PolicyViolation(HflLabError):
    """Evidence is authentic but its claims do not satisfy the attestation policy."""


class VaultError(HflLabError):
    """The LUKS model volume, its key, or a checkpoint inside it is unusable."""


class BackendError(HflLabError):
    """A participant could not be started, died, or the backend is unreachable."""
