"""The notebook boundary: lab errors as one sentence plus the fix, tables that render anywhere."""

from __future__ import annotations

import html
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hfl_lab._exceptions import HflLabError
from hfl_lab.dashboard.frontend import display

__all__ = ["Table", "brief_errors", "error_sentence", "show", "show_image"]


def error_sentence(error: HflLabError) -> str:
    """``HflLabError`` as one line: what is wrong, then ``Fix: ...`` (the CLI prints the same)."""
    return error.one_line()


def _error_lines(error: HflLabError) -> str:
    """The error output's text: the error in bold red, then its fix on its own line (JupyterLab
    and the classic notebook render the ANSI colours; papermill's evalue stays one line)."""
    message = " ".join(error.message.split())
    fix = " ".join((error.fix or "").split())
    text = f"\x1b[1;31m{type(error).__name__}\x1b[0m: {message}"
    return text + (f"\n\x1b[1;32mFix:\x1b[0m {fix}" if fix else "")


def _handler(
    shell: Any, etype: type[BaseException], value: BaseException, tb: Any, tb_offset: Any = None
) -> list[str]:
    assert isinstance(value, HflLabError)
    stb = [_error_lines(value)]
    # One box: the cell's error output, in place of the 60-line traceback. Sending it is what
    # makes the cell fail, so papermill (and "Run All") still stop here and report this cell.
    shell._showtraceback(etype, value, stb)
    return stb


def brief_errors() -> None:
    """In an IPython kernel, show every ``HflLabError`` as one sentence and its fix.

    The cell still fails (papermill exits non-zero and names it); only the 60-line traceback is
    replaced. Any other exception is a bug of the lab and keeps its full traceback. Outside a
    kernel it does nothing.
    """
    try:
        from IPython import get_ipython
    except ImportError:  # pragma: no cover - IPython is a dependency of the lab
        return
    shell = get_ipython()
    if shell is not None:
        shell.set_custom_exc((HflLabError,), _handler)


def _in_kernel() -> bool:
    try:
        from IPython import get_ipython
    except ImportError:  # pragma: no cover - IPython is a dependency of the lab
        return False
    return get_ipython() is not None


def show(obj: object) -> None:
    """IPython's display in a kernel; ``print`` of the text form anywhere else."""
    if not _in_kernel():
        print(obj, file=sys.stdout)
        return
    display(obj)


def show_image(path: str | Path) -> None:
    """A PNG the lab wrote (a plot in the run folder), inline in a notebook; its path elsewhere."""
    file = Path(path)
    if not _in_kernel():
        print(file)
        return
    from IPython import display as ipython

    image: Any = ipython.Image
    display(image(filename=str(file)))


class TableReport:
    """A step's result that shows as its :meth:`table`: HTML in a notebook, text elsewhere."""

    def table(self) -> Table:
        raise NotImplementedError

    def __repr__(self) -> str:
        return self.table().to_text()

    def _repr_html_(self) -> str:
        return self.table()._repr_html_()


@dataclass
class Table:
    """A small table that renders as HTML in a notebook and as aligned text everywhere else."""

    columns: Sequence[str]
    rows: list[Sequence[object]] = field(default_factory=list)
    title: str = ""
    note: str = ""
    #: per row, a CSS background colour (or "") for the HTML form
    colors: list[str] = field(default_factory=list)

    def add(self, *cells: object, color: str = "") -> None:
        self.rows.append(cells)
        self.colors.append(color)

    def to_text(self) -> str:
        cells = [[str(c) for c in self.columns]] + [[_cell(c) for c in r] for r in self.rows]
        widths = [max(len(r[i]) for r in cells) for i in range(len(self.columns))]
        lines = [self.title] if self.title else []
        for i, row in enumerate(cells):
            lines.append("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())
            if i == 0:
                lines.append("  ".join("-" * w for w in widths))
        if self.note:
            lines.append(self.note)
        return "\n".join(lines)

    def __repr__(self) -> str:
        return self.to_text()

    def _repr_html_(self) -> str:
        head = "".join(
            f"<th style='text-align:left'>{html.escape(str(c))}</th>" for c in self.columns
        )
        body = []
        for i, row in enumerate(self.rows):
            color = self.colors[i] if i < len(self.colors) else ""
            style = f" style='background:{color}'" if color else ""
            tds = "".join(
                f"<td style='text-align:left'>{html.escape(_cell(c))}</td>" for c in row
            )
            body.append(f"<tr{style}>{tds}</tr>")
        title = f"<b>{html.escape(self.title)}</b>" if self.title else ""
        note = f"<div><small>{html.escape(self.note)}</small></div>" if self.note else ""
        return f"<div>{title}<table><tr>{head}</tr>{''.join(body)}</table>{note}</div>"


def _cell(value: object) -> str:
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.4g}"
    return " ".join(str(value).split()) if value is not None else ""
