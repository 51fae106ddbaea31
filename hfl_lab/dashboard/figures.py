"""The dashboard's matplotlib figures: created once, redrawn from a RunState on every refresh."""

from __future__ import annotations

import textwrap
from collections.abc import Sequence
from pathlib import Path

from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.patches import Patch, Rectangle

from hfl_lab.dashboard.state import FAIL, PASS, SIMULATED_PASS, STEP_PARTS, RunState

__all__ = [
    "VERDICT_COLORS",
    "AttestationFigure",
    "DashboardFigure",
    "LossFigure",
    "StepTimeFigure",
    "robust_top",
    "save_png",
]

VERDICT_COLORS = {PASS: "#2da44e", FAIL: "#cf222e", SIMULATED_PASS: "#e3a008"}
VERDICT_LABELS = {PASS: "PASS", FAIL: "FAIL", SIMULATED_PASS: "SIMULATED\nPASS"}
EMPTY_COLOR = "#eaeef2"
PART_COLORS = {
    "compute_s": "#0969da",
    "push_s": "#8250df",
    "wait_s": "#bf8700",
    "pull_s": "#1a7f37",
}
SIMULATED_BANNER = "SIMULATED TD evidence: proves what runs, not that it runs on TDX hardware"
_DPI = 100
#: head room above the slowest usual step when slow ones are clipped
_TOP_MARGIN = 1.35


def save_png(figure: Figure, path: Path) -> None:
    """Write ``figure`` to ``path`` atomically (readers never see half a PNG)."""
    tmp = path.with_name(f".{path.name}.tmp")
    figure.savefig(tmp, format="png", dpi=_DPI)
    tmp.replace(path)


class DashboardFigure:
    """A figure made once and redrawn in place; ``filename`` is its PNG in the run folder."""

    filename = "figure.png"

    def __init__(self, size: tuple[float, float]) -> None:
        self.figure = Figure(figsize=size, layout="constrained")

    def draw(self, state: RunState) -> None:
        self.figure.clear()
        self._draw(state)
        if state.simulated:
            self.figure.suptitle(SIMULATED_BANNER, color="#9a6700", fontweight="bold")

    def _draw(self, state: RunState) -> None:
        raise NotImplementedError


class LossFigure(DashboardFigure):
    """Training loss/accuracy per worker (thin) and test loss/accuracy of the global model."""

    filename = "loss.png"

    def __init__(self) -> None:
        super().__init__((11, 4))

    def _draw(self, state: RunState) -> None:
        ax_loss, ax_acc = self.figure.subplots(1, 2)
        for ax, key, label in ((ax_loss, "loss", "loss"), (ax_acc, "accuracy", "accuracy")):
            for role, series in sorted(state.workers.items()):
                points = [
                    (s, v)
                    for s, v in zip(series["step"], series[key], strict=True)
                    if v is not None
                ]
                if points:
                    xs, ys = zip(*points, strict=True)
                    ax.plot(xs, ys, linewidth=1, alpha=0.8, label=f"{role} (train batch)")
            evaluated = [
                (s, v)
                for s, v in zip(state.evaluation["step"], state.evaluation[key], strict=True)
                if v is not None
            ]
            if evaluated:
                xs, ys = zip(*evaluated, strict=True)
                ax.plot(xs, ys, "o-", color="black", linewidth=2, label="global model (test set)")
            ax.set_xlabel("step")
            ax.set_ylabel(label)
            ax.set_title(f"{label} per worker and global")
            ax.grid(alpha=0.3)
            if ax.lines:
                ax.legend(fontsize="small")
            else:
                ax.text(0.5, 0.5, "waiting for metrics…", ha="center", transform=ax.transAxes)
            if state.total_steps:
                ax.set_xlim(0, state.total_steps)
        if any(ax_acc.lines):
            ax_acc.set_ylim(0, 1)


class StepTimeFigure(DashboardFigure):
    """Where a step's time goes: compute/push/wait/pull per worker, recent window and over time."""

    filename = "step_time.png"

    def __init__(self) -> None:
        super().__init__((11, 4))

    def _draw(self, state: RunState) -> None:
        ax_bars, ax_series = self.figure.subplots(1, 2)
        window = state.step_time_window
        totals = [t for role in state.workers for t in state.step_totals(role, window)
                  if t is not None]
        top = robust_top(totals)  # a slow step (a checkpoint) would make the mean misleading
        cut = top / _TOP_MARGIN if top is not None else None
        means = state.step_time_means(window, below_s=cut)
        left_out = sum(1 for t in totals if cut is not None and t > cut)
        roles = sorted(means)
        for i, role in enumerate(roles):
            left = 0.0
            for part in STEP_PARTS:
                width = means[role].get(part, 0.0) * 1000
                ax_bars.barh(
                    i,
                    width,
                    left=left,
                    color=PART_COLORS[part],
                    label=part.removesuffix("_s") if i == 0 else None,
                )
                left += width
            ax_bars.text(left, i, f" {left:.0f} ms", va="center", fontsize="small")
        ax_bars.set_yticks(range(len(roles)), roles)
        ax_bars.set_xlabel("ms per step")
        title = f"step time, mean of the last {window} steps"
        if left_out:
            title += f"\n({left_out} slow step(s) left out, marked ▲ on the right)"
        ax_bars.set_title(title, fontsize="medium")
        if roles:
            ax_bars.legend(fontsize="small", loc="best")
            ax_bars.margins(x=0.2)
        else:
            ax_bars.text(0.5, 0.5, "waiting for metrics…", ha="center", transform=ax_bars.transAxes)
        lines: dict[str, list[tuple[float, float]]] = {}
        for role, series in sorted(state.workers.items()):
            points: list[tuple[float, float]] = []
            for i, step in enumerate(series["step"]):
                parts = [series[p][i] for p in STEP_PARTS]
                if step is not None and any(v is not None for v in parts):
                    points.append((step, sum(v for v in parts if v is not None) * 1000))
            if points:
                lines[role] = points
        for role, points in lines.items():
            xs, ys = zip(*points, strict=True)
            ax_series.plot(xs, ys, linewidth=1, label=role)
        ax_series.set_xlabel("step")
        ax_series.set_ylabel("ms")
        ax_series.set_title("step time per worker")
        ax_series.grid(alpha=0.3)
        if ax_series.lines:
            ax_series.set_ylim(bottom=0)
            ax_series.legend(fontsize="small")
            _clip_slow_steps(ax_series, lines)


def robust_top(values: Sequence[float]) -> float | None:
    """An upper axis limit that keeps the usual steps readable, or None when no value is far
    above them: a value over three times the median (the first step compiles the model, a
    checkpoint step waits for the volume) would squash every other one."""
    if len(values) < 4:
        return None
    ordered = sorted(values)
    cut = 3 * ordered[len(ordered) // 2]
    usual = [v for v in ordered if v <= cut]
    if not usual or len(usual) == len(ordered) or usual[-1] <= 0:
        return None
    return usual[-1] * _TOP_MARGIN


def _clip_slow_steps(ax: Axes, lines: dict[str, list[tuple[float, float]]]) -> None:
    """Clip the step-time axis to :func:`robust_top`; each step above it is a marker at the top
    with its time written beside it, so its value is still on the plot."""
    top = robust_top([y for points in lines.values() for _, y in points])
    if top is None:
        return
    ax.set_ylim(0, top)
    colors = {line.get_label(): line.get_color() for line in ax.get_lines()}
    slow = sorted(((y, x, role) for role, points in lines.items() for x, y in points if y > top),
                  reverse=True)
    for rank, (y, x, role) in enumerate(slow):
        ax.plot([x], [top], marker="^", color=colors.get(role, "black"), markersize=7,
                clip_on=False, zorder=5)
        if rank < 4:  # the slowest few, written out; the rest are markers
            ax.annotate(f"{y / 1000:.1f} s" if y >= 1000 else f"{y:.0f} ms", (x, top),
                        xytext=(0, -12 - 10 * (rank % 2)), textcoords="offset points",
                        ha="center", fontsize="x-small", color=colors.get(role, "black"))
    ax.set_title(f"step time per worker ({len(slow)} slow step(s) marked ▲ above the axis)",
                 fontsize="medium")


class AttestationFigure(DashboardFigure):
    """Rows verifier, columns subject, cell = latest verdict, annotated with its reason."""

    filename = "attestation_matrix.png"

    def __init__(self) -> None:
        super().__init__((8, 5))

    def _draw(self, state: RunState) -> None:
        ax = self.figure.subplots()
        verifiers, subjects = state.verifiers(), state.subjects()
        if not verifiers:
            ax.text(0.5, 0.5, "no attestation yet", ha="center", va="center")
            ax.set_axis_off()
            return
        width = max(6.0, 1.9 * len(subjects) + 2.5)
        height = max(3.5, 1.2 * len(verifiers) + 2.0)
        self.figure.set_size_inches(width, height)
        for row, verifier in enumerate(verifiers):
            for col, subject in enumerate(subjects):
                record = state.matrix.get((verifier, subject))
                color = VERDICT_COLORS[record.verdict] if record else EMPTY_COLOR
                ax.add_patch(
                    Rectangle((col, row), 1, 1, facecolor=color, edgecolor="white", linewidth=2)
                )
                if record is None:
                    text = "—"
                elif record.verdict == FAIL and record.difference:
                    # which measurement, expected vs got: what a room reads off the screen
                    name, _, values = record.difference.partition(": ")
                    text = "FAIL\n" + name + "\n" + values.replace(", ", "\n")
                elif record.verdict == FAIL:
                    text = "FAIL\n" + textwrap.shorten(record.reason, 60, placeholder="…")
                    text = "\n".join(textwrap.wrap(text, 20)[:4])
                else:
                    text = VERDICT_LABELS[record.verdict]
                ax.text(
                    col + 0.5,
                    row + 0.5,
                    text,
                    ha="center",
                    va="center",
                    fontsize=8,
                    color="white" if record else "#57606a",
                    fontweight="bold",
                )
        ax.set_xlim(0, len(subjects))
        ax.set_ylim(len(verifiers), 0)
        ax.set_xticks([c + 0.5 for c in range(len(subjects))],
                      [textwrap.fill(s, 16) for s in subjects])  # long names: an attack's
        ax.set_yticks([r + 0.5 for r in range(len(verifiers))], verifiers)
        ax.tick_params(length=0)
        ax.set_xlabel("subject (evidence verified)")
        ax.set_ylabel("verifier")
        ax.xaxis.set_label_position("top")
        ax.xaxis.tick_top()
        for spine in ax.spines.values():
            spine.set_visible(False)
        ax.set_aspect("auto")
        ax.legend(
            handles=[
                Patch(color=c, label=VERDICT_LABELS[v].replace("\n", " "))
                for v, c in VERDICT_COLORS.items()
            ],
            loc="upper center",
            bbox_to_anchor=(0.5, -0.02),
            ncol=3,
            fontsize="small",
            frameon=False,
        )
        refused = len(state.refused)
        ax.set_title(
            f"attestation: latest verdict per pair ({len(state.attestations)} verifications, "
            f"{refused} refused)",
            fontsize="medium",
        )
