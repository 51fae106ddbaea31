"""Where the dashboard shows itself: widgets in a Jupyter front end, else text and images."""

from __future__ import annotations

import html
import io
import os
import sys
from collections.abc import Callable
from typing import Any, Protocol, TextIO

from matplotlib.figure import Figure
from tqdm import tqdm

from hfl_lab.dashboard.figures import VERDICT_COLORS
from hfl_lab.dashboard.state import AttestationRecord, RunState
from hfl_lab.tee.verdict import mark_html, value_html

__all__ = [
    "AttestationWidget",
    "FigureView",
    "ProgressView",
    "TextProgress",
    "WidgetProgress",
    "display",
    "has_front_end",
    "in_ipython_kernel",
    "mark_cell_busy",
]

_TRUE, _FALSE = {"1", "true", "yes", "on"}, {"0", "false", "no", "off"}
_HEADLESS_BACKENDS = {"agg", "pdf", "ps", "svg", "cairo", "template"}


def in_ipython_kernel() -> bool:
    """True inside an IPython kernel (JupyterLab, or papermill's), not a terminal or pytest."""
    try:
        from IPython import get_ipython
    except ImportError:
        return False
    shell = get_ipython()
    return shell is not None and getattr(shell, "kernel", None) is not None


def has_front_end() -> bool:
    """Whether a person is watching: a kernel with widgets and an interactive matplotlib backend.

    ``HFL_LAB_FRONTEND=1``/``0`` decides outright. Otherwise a kernel counts as headless when
    ``MPLBACKEND`` names a file backend (``agg``), which is how papermill runs of the lab are made.
    """
    forced = os.environ.get("HFL_LAB_FRONTEND", "").strip().lower()
    if forced in _TRUE | _FALSE:
        return forced in _TRUE
    if not in_ipython_kernel():
        return False
    if os.environ.get("MPLBACKEND", "").strip().lower() in _HEADLESS_BACKENDS:
        return False
    try:
        import ipywidgets  # noqa: F401
    except ImportError:
        return False
    return True


def mark_cell_busy() -> bool:
    """Tell the front end again that the kernel is busy with the running cell; False outside a
    kernel or a cell.

    ipykernel 7 publishes a busy → idle pair of its own around every control-channel request
    (JupyterLab sends some while a cell runs) and around each shell message it answers while a
    cell runs (widget comm traffic). JupyterLab shows the newest status, so a long training cell
    read "Idle" in its status bar although it ran. Publishing "busy" again, with the running
    cell's request as the parent, as ipykernel itself does when the cell starts, puts it right
    within one refresh; the cell's own final "idle" still ends it.
    """
    try:
        from IPython import get_ipython
    except ImportError:  # pragma: no cover - IPython is a dependency of the lab
        return False
    kernel = getattr(get_ipython(), "kernel", None)
    session = getattr(kernel, "session", None)
    if kernel is None or session is None:
        return False
    parent = kernel.get_parent("shell")
    if not parent or parent.get("header", {}).get("msg_type") != "execute_request":
        return False
    session.send(kernel.iopub_socket, "status", {"execution_state": "busy"}, parent=parent,
                 ident=kernel._topic("status"))
    return True


def display(obj: object, *, display_id: bool = False) -> Any:
    """IPython's display (one seam, so tests can replace it); returns the DisplayHandle."""
    from IPython import display as ipython

    show: Callable[..., Any] = ipython.display  # untyped in IPython
    return show(obj, display_id=display_id)


class _PngFrame:
    """A figure as IPython shows it: PNG rendered when displayed, whatever MPLBACKEND is."""

    def __init__(self, figure: Figure, name: str) -> None:
        self.figure = figure
        self.name = name

    def __repr__(self) -> str:
        return f"<dashboard figure {self.name}>"

    def _repr_png_(self) -> bytes:
        buffer = io.BytesIO()
        self.figure.savefig(buffer, format="png", dpi=90)
        return buffer.getvalue()


class FigureView:
    """One figure in the notebook: displayed once with a display id, then updated in place."""

    def __init__(self, figure: Figure, name: str = "figure") -> None:
        self.frame = _PngFrame(figure, name)
        self.handle: Any = None

    def update(self) -> None:
        if self.handle is None:
            self.handle = display(self.frame, display_id=True)
        else:
            self.handle.update(self.frame)


class ProgressView(Protocol):
    """A progress bar plus a place for notable one-line messages."""

    def update(self, done: int, total: int, status: str) -> None: ...

    def write(self, line: str) -> None: ...

    def close(self, ok: bool) -> None: ...


class TextProgress:
    """tqdm on a text stream, for papermill, the CLI and tests."""

    def __init__(self, total: int, stream: TextIO | None = None) -> None:
        self.stream = stream if stream is not None else sys.stderr
        self.bar = tqdm(
            total=total or None,
            desc="training",
            unit="step",
            file=self.stream,
            mininterval=0.5,
            dynamic_ncols=False,
            ncols=100,
        )

    def update(self, done: int, total: int, status: str) -> None:
        if total and self.bar.total != total:
            self.bar.total = total
        self.bar.n = done
        self.bar.set_postfix_str(status, refresh=False)
        self.bar.refresh()

    def write(self, line: str) -> None:
        self.bar.write(line, file=self.stream)

    def close(self, ok: bool) -> None:
        self.bar.close()


class WidgetProgress:
    """An IntProgress bar with a status label and the latest notable messages."""

    def __init__(self, total: int, *, keep_lines: int = 8) -> None:
        import ipywidgets as widgets

        self.bar = widgets.IntProgress(value=0, min=0, max=max(total, 1), description="training")
        self.label = widgets.Label(value=f"0/{total or '?'} steps")
        self.log = widgets.HTML(value="")
        self.keep_lines = keep_lines
        self.lines: list[str] = []
        self.written = 0
        self.box = widgets.VBox([widgets.HBox([self.bar, self.label]), self.log])
        display(self.box)

    def update(self, done: int, total: int, status: str) -> None:
        if total:
            self.bar.max = total
        self.bar.value = min(done, self.bar.max)
        self.label.value = f"{done}/{total or '?'} steps  {status}".rstrip()

    def write(self, line: str) -> None:
        self.written += 1
        self.lines = [*self.lines, line][-self.keep_lines :]
        hidden = self.written - len(self.lines)
        more = (f"<i>… {hidden} earlier message(s): all are in events.jsonl in the run "
                "folder</i><br>" if hidden else "")
        body = "<br>".join(html.escape(x) for x in self.lines)
        self.log.value = f"<div style='font-family:monospace;font-size:90%'>{more}{body}</div>"

    def close(self, ok: bool) -> None:
        self.bar.bar_style = "success" if ok else "danger"


class AttestationWidget:
    """The attestation matrix as an HTML table (checks on hover) and a pair picker (on click)."""

    def __init__(self) -> None:
        import ipywidgets as widgets

        self.table = widgets.HTML(value="<i>no attestation yet</i>")
        self.pairs = widgets.Dropdown(options=[], description="checks of")
        self.details = widgets.HTML(value="")
        self.pairs.observe(self._on_select, names="value")
        self.box = widgets.VBox([self.table, self.pairs, self.details])
        self._state: RunState | None = None
        display(self.box)

    def update(self, state: RunState) -> None:
        self._state = state
        self.table.value = matrix_html(state)
        options = [(f"{v} → {s}", (v, s)) for v, s in sorted(state.matrix)]
        if [o[1] for o in options] != [o[1] for o in self.pairs.options]:
            chosen = self.pairs.value
            self.pairs.options = options
            if chosen not in state.matrix:  # a table from the start: a refusal, else the first
                refused = [(r.verifier, r.subject) for r in state.refused]
                chosen = refused[-1] if refused else options[0][1] if options else None
            if chosen is not None:
                self.pairs.value = chosen
        self._show(self.pairs.value)

    def _on_select(self, change: dict[str, Any]) -> None:
        self._show(change.get("new"))

    def _show(self, pair: Any) -> None:
        record = self._state.matrix.get(pair) if self._state is not None and pair else None
        self.details.value = checks_html(record) if record is not None else ""


def _cell_title(record: AttestationRecord) -> str:
    lines = [f"{record.verifier} → {record.subject}: {record.verdict.upper()}", record.reason]
    for check in record.checks:
        mark = "✓" if check.get("passed") else "✗"
        lines.append(f"{mark} {check.get('name', '?')} {check.get('reason', '')}".rstrip())
    return "\n".join(lines)


def matrix_html(state: RunState) -> str:
    """The matrix as an HTML table; each cell's title attribute lists its checks."""
    verifiers, subjects = state.verifiers(), state.subjects()
    if not verifiers:
        return "<i>no attestation yet</i>"
    head = "".join(f"<th>{html.escape(s)}</th>" for s in subjects)
    rows = []
    for verifier in verifiers:
        cells = []
        for subject in subjects:
            record = state.matrix.get((verifier, subject))
            if record is None:
                cells.append("<td style='background:#eaeef2;text-align:center'>—</td>")
                continue
            label = {"simulated-pass": "SIMULATED PASS"}.get(record.verdict, record.verdict.upper())
            cells.append(
                f"<td title='{html.escape(_cell_title(record), quote=True)}' style='background:"
                f"{VERDICT_COLORS[record.verdict]};color:white;font-weight:bold;"
                f"text-align:center;padding:4px 10px;cursor:help'>{label}</td>"
            )
        rows.append(f"<tr><th>{html.escape(verifier)}</th>{''.join(cells)}</tr>")
    banner = (
        "<div style='background:#fff3cd;padding:2px 6px'><b>SIMULATED</b> TD evidence: proves "
        "what runs, not that it runs on TDX hardware</div>"
        if state.simulated
        else ""
    )
    return (
        f"{banner}<table><tr><th>verifier \\ subject</th>{head}</tr>{''.join(rows)}</table>"
        "<small>hover a cell for its checks, or pick a pair below</small>"
    )


def checks_html(record: AttestationRecord) -> str:
    """Every check of one verdict: expected, actual, reason."""
    rows = "".join(
        f"<tr><td>{html.escape(str(c.get('name', '?')))}</td>"
        f"<td>{mark_html(bool(c.get('passed')))}</td>"
        f"<td>{value_html(c.get('expected', ''), 40)}</td>"
        f"<td>{value_html(c.get('actual', ''), 40)}</td>"
        f"<td>{html.escape(str(c.get('reason', '')))}</td></tr>"
        for c in record.checks
    )
    sim = " <b>[SIMULATED]</b>" if record.simulated else ""
    return (
        f"<b>{html.escape(record.verifier)} → {html.escape(record.subject)}</b>: "
        f"{record.verdict.upper()}{sim} — {html.escape(record.reason)}"
        "<table><tr><th>check</th><th></th><th>expected</th><th>actual</th><th>reason</th></tr>"
        f"{rows}</table>"
    )
