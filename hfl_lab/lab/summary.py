"""The run folder's front page: summary.md and summary.html linking notebooks, plots and metrics."""

from __future__ import annotations

import html
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from hfl_lab.lab.sequence import LabRun

__all__ = ["PLOTS", "write_summary"]

#: plots a run may hold (relative to the run folder), in reading order, with a caption
PLOTS = (
    ("loss.png", "loss and accuracy per worker, and of the global model"),
    ("step_time.png", "step-time breakdown (compute, push, wait, pull)"),
    ("attestation_matrix.png", "attestation matrix of the training run"),
    ("confusion_matrix.png", "confusion matrix of the retrieved model"),
    ("sample_predictions.png", "sample predictions of the retrieved model"),
    ("attacks/attestation_matrix.png", "attacks and defenses: each refusal and its reason"),
)
FILES = (
    ("metrics.json", "training metrics (series, step times, verdicts)"),
    ("events.jsonl", "every event of the training run"),
    ("training.json", "how the training ended"),
    ("retrieval.json", "the retrieved model's evaluation"),
    ("attacks/attacks.json", "the attacks and why each was refused"),
    ("preflight.json", "preflight checks"),
    ("coco_plan.json", "CoCo stack: check, plan, apply"),
    ("trust/volume.json", "the LUKS model volume"),
    ("image/reference_policy.yaml", "reference values derived from the measured image"),
    ("lab_config.yaml", "the run's configuration"),
    ("run.json", "this run, machine-readable"),
    ("logs", "participants' logs"),
)


def _json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


@dataclass
class _Doc:
    """The summary's content, rendered as markdown or HTML."""

    title: str
    status: str
    lines: list[str] = field(default_factory=list)
    notebooks: list[tuple[str, str, str, str]] = field(default_factory=list)
    results: list[tuple[str, str]] = field(default_factory=list)
    plots: list[tuple[str, str]] = field(default_factory=list)
    files: list[tuple[str, str]] = field(default_factory=list)

    def markdown(self) -> str:
        out = [f"# {self.title}", "", f"**{self.status}**", "", *self.lines, ""]
        out += ["## Notebooks", "", "| notebook | status | time |", "|---|---|---|"]
        out += [f"| [{n}]({link}) | {s} | {t} |" for n, link, s, t in self.notebooks]
        if self.results:
            out += ["", "## Results", ""]
            out += [f"- **{k}**: {v}" for k, v in self.results]
        if self.plots:
            out += ["", "## Plots", ""]
            out += [f"### {caption}\n\n![{caption}]({path})\n" for path, caption in self.plots]
        out += ["", "## Files", ""]
        out += [f"- [{path}]({path}): {what}" for path, what in self.files]
        return "\n".join(out) + "\n"

    def html(self) -> str:
        e = html.escape
        rows = "".join(
            f"<tr><td><a href='{e(link)}'>{e(n)}</a></td><td>{e(s)}</td><td>{e(t)}</td></tr>"
            for n, link, s, t in self.notebooks
        )
        results = "".join(f"<li><b>{e(k)}</b>: {e(v)}</li>" for k, v in self.results)
        plots = "".join(
            f"<figure><img src='{e(p)}' alt='{e(c)}' style='max-width:100%'>"
            f"<figcaption>{e(c)}</figcaption></figure>"
            for p, c in self.plots
        )
        files = "".join(f"<li><a href='{e(p)}'>{e(p)}</a>: {e(w)}</li>" for p, w in self.files)
        lines = "".join(f"<p>{e(line)}</p>" for line in self.lines if line)
        return (
            "<!doctype html><html><head><meta charset='utf-8'>"
            f"<title>{e(self.title)}</title></head><body style='font-family:sans-serif'>"
            f"<h1>{e(self.title)}</h1><p><b>{e(self.status)}</b></p>{lines}"
            f"<h2>Notebooks</h2><table border='1' cellpadding='4'><tr><th>notebook</th>"
            f"<th>status</th><th>time</th></tr>{rows}</table>"
            + (f"<h2>Results</h2><ul>{results}</ul>" if results else "")
            + (f"<h2>Plots</h2>{plots}" if plots else "")
            + f"<h2>Files</h2><ul>{files}</ul></body></html>\n"
        )


def _results(run_dir: Path) -> list[tuple[str, str]]:
    out: list[tuple[str, str]] = []
    preflight = _json(run_dir / "preflight.json")
    if preflight:
        out.append(("preflight", f"backend {preflight['backend']}: "
                    + ("ready" if preflight["ok"] else "NOT ready")))
    coco = _json(run_dir / "coco_plan.json")
    if coco:
        statuses = sorted({s["status"] for s in coco["steps"]})
        out.append(("CoCo stack", f"{len(coco['steps'])} steps: {', '.join(statuses)}"))
    volume = _json(run_dir / "trust" / "volume.json")
    if volume:
        out.append(("trust service & volume", f"{volume['size_mb']} MB LUKS volume, opened with "
                    f"the released key: {'yes' if volume['opened_with_released_key'] else 'NO'}"))
    training = _json(run_dir / "training.json")
    if training:
        result = training.get("result") or {}
        accuracy = (result.get("evaluation") or {}).get("accuracy")
        losses = "; ".join(f"{r} {v[0]:.3f} → {v[1]:.3f}"
                           for r, v in sorted((training.get("losses") or {}).items()))
        out.append(("training", f"{result.get('final_step', '?')} of {training['total_steps']} "
                    f"steps in {training['seconds']:.0f} s; loss {losses}; test accuracy "
                    + (f"{accuracy:.1%}" if isinstance(accuracy, int | float) else "n/a")))
    retrieval = _json(run_dir / "retrieval.json")
    if retrieval:
        sealed = "from the LUKS volume" if retrieval["sealed"] else "NOT sealed (checkpoint folder)"
        out.append(("retrieval", f"step {retrieval['step']} {sealed}: test accuracy "
                    f"{retrieval['accuracy']:.1%} on {retrieval['num_samples']} images"))
    attacks = _json(run_dir / "attacks" / "attacks.json")
    if attacks:
        out.append(("attacks", f"{attacks['refused']} of {len(attacks['attacks'])} refused: "
                    + "; ".join(f"{a['name']} ({a['refused_by']})" for a in attacks["attacks"])))
    return out


def write_summary(run: LabRun) -> tuple[Path, Path]:
    """Write summary.md and summary.html into the run folder; returns both paths."""
    root = run.run_dir
    status = "OK: every notebook ran" if run.ok else (
        run.failure_message() or "in progress"
    )
    doc = _Doc(f"HFL-TDX Lab run {root.name}", status)
    doc.lines.append(run.config.describe())
    if run.config.backend == "local":
        doc.lines.append(
            "SIMULATED TDs: every verdict proves what ran, not that it ran on TDX hardware."
        )
    for nb in run.notebooks:
        link = nb.output.relative_to(root).as_posix() if nb.output.is_relative_to(root) else str(
            nb.output
        )
        status_text = (
            f"FAILED in cell {nb.cell}: {nb.error}" if nb.status == "failed" else nb.status
        )
        doc.notebooks.append((nb.name, link, status_text, f"{nb.seconds:.1f} s"))
    doc.results = _results(root)
    doc.plots = [(p, c) for p, c in PLOTS if (root / p).is_file()]
    doc.files = [(p, w) for p, w in FILES if (root / p).exists()]
    md, page = root / "summary.md", root / "summary.html"
    md.write_text(doc.markdown(), encoding="utf-8")
    page.write_text(doc.html(), encoding="utf-8")
    return md, page
