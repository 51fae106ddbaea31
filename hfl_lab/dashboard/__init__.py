"""Live dashboard of a run: loss, step time and attestation matrix, as widgets or text + files.

Fed by the backend's LabEvent stream (never by parsing logs); always writes loss.png,
step_time.png, attestation_matrix.png, metrics.json and events.jsonl into the run folder.
"""

from hfl_lab.dashboard.dashboard import Dashboard
from hfl_lab.dashboard.evaluation_figures import (
    confusion_matrix,
    render_confusion_matrix,
    render_sample_predictions,
)
from hfl_lab.dashboard.frontend import has_front_end
from hfl_lab.dashboard.state import AttestationRecord, RunState
from hfl_lab.dashboard.text import summarize_run, text_summary

__all__ = [
    "AttestationRecord",
    "Dashboard",
    "RunState",
    "confusion_matrix",
    "has_front_end",
    "render_confusion_matrix",
    "render_sample_predictions",
    "summarize_run",
    "text_summary",
]
