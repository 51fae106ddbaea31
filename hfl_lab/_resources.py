"""What every closable object of the lab shares: ``with`` closes it."""

from __future__ import annotations

from typing import Self

__all__ = ["ClosingContext"]


class ClosingContext:
    """A resource that ``with`` closes: ``__enter__`` returns it, ``__exit__`` calls
    :meth:`close`, also when the block raised (the exception goes on)."""

    def close(self) -> None:
        raise NotImplementedError

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
