"""Dashboard: headless files and text, throttling, widgets with a fake display, report figures."""

from __future__ import annotations

import io
import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from matplotlib import image as mpimg

from hfl_lab.dashboard import (
    Dashboard,
    confusion_matrix,
    frontend,
    has_front_end,
    render_confusion_matrix,
    render_sample_predictions,
    summarize_run,
)
from hfl_lab.events import LabEvent

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
FIGURES = ("loss.png", "step_time.png", "attestation_matrix.png")
ROLES = ("ps0", "worker0", "worker1")
REFUSAL = "mr_td: measurement 9f… is not allowed by the policy"


def checks(passed: bool = True) -> list[dict[str, Any]]:
    return [
        {
            "name": "quote_signature",
            "passed": True,
            "expected": "valid",
            "actual": "valid",
            "reason": "signed by the lab attestation key",
        },
        {
            "name": "report_data",
            "passed": True,
            "expected": "sha512(pubkey|nonce)",
            "actual": "sha512(pubkey|nonce)",
            "reason": "binds the TLS key",
        },
        {
            "name": "mr_td",
            "passed": passed,
            "expected": "ab" * 48,
            "actual": ("ab" if passed else "9f") * 48,
            "reason": "" if passed else "MR_TD 9f… is not in the policy's allowed list",
        },
    ]


def attestation(verifier: str, subject: str, *, accepted: bool = True) -> LabEvent:
    return LabEvent(
        "attestation",
        verifier,
        {
            "verifier": verifier,
            "subject": subject,
            "accepted": accepted,
            "reason": "accepted (SIMULATED TD)" if accepted else REFUSAL,
            "simulated": True,
            "measurements": {"mr_td": ("ab" if accepted else "9f") * 48},
            "checks": checks(accepted),
        },
    )


def run_events(steps: int = 30) -> list[LabEvent]:
    """A realistic small run: lifecycle, pairwise attestation, a refusal, training, evaluation."""
    events = [
        LabEvent("lifecycle", role, {"state": "ready", "pid": 100 + i, "detail": ""})
        for i, role in enumerate(ROLES)
    ]
    events += [attestation("trust", role) for role in ROLES]
    events += [attestation(a, b) for a in ROLES for b in ROLES if a != b]
    events.append(attestation("trust", "worker2", accepted=False))
    events.append(
        LabEvent(
            "audit",
            "trust",
            {
                "action": "issue_certificate",
                "allowed": False,
                "reason": "worker2 failed attestation",
            },
        )
    )
    for step in range(1, steps + 1):
        for w in range(2):
            events.append(
                LabEvent(
                    "metrics",
                    f"worker{w}",
                    {
                        "role": f"worker{w}",
                        "step": step,
                        "loss": 2.3 * math.exp(-step / 12) + 0.05 * w,
                        "accuracy": min(0.9, 0.1 + step / 40),
                        "lr": 0.05,
                        "compute_s": 0.040 + 0.01 * w,
                        "push_s": 0.005,
                        "wait_s": 0.002 * (1 - w),
                        "pull_s": 0.004,
                        "bytes_sent": 312_000,
                        "bytes_received": 312_000,
                    },
                )
            )
        if step % 10 == 0:
            events.append(
                LabEvent(
                    "evaluation",
                    "ps0",
                    {
                        "step": step,
                        "loss": 2.3 * math.exp(-step / 12),
                        "accuracy": 0.1 + step / 40,
                        "num_samples": 846,
                    },
                )
            )
        events.append(
            LabEvent(
                "progress",
                "ps0",
                {"done": step, "total": steps, "unit": "step", "label": "training"},
            )
        )
    events.append(LabEvent("log", "ps0", {"level": "info", "message": "done"}))
    return events


def assert_real_png(path: Path) -> None:
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE, f"{path.name} is not a PNG"
    assert len(data) > 5_000, f"{path.name} is suspiciously small"
    pixels = mpimg.imread(path)
    assert pixels.ndim == 3 and pixels.shape[0] > 200 and pixels.shape[1] > 300
    rgb = (pixels[..., :3] * 255).astype(np.int64)
    colours = np.unique(rgb[..., 0] << 16 | rgb[..., 1] << 8 | rgb[..., 2])
    assert len(colours) > 10, f"{path.name} is nearly one flat colour"


@pytest.fixture(autouse=True)
def headless(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MPLBACKEND", "agg")
    monkeypatch.delenv("HFL_LAB_FRONTEND", raising=False)


# ---------------------------------------------------------------------- headless run


def test_headless_run_writes_figures_metrics_and_events(tmp_path: Path) -> None:
    events = run_events()
    out = io.StringIO()
    dashboard = Dashboard(tmp_path, total_steps=30, interactive=False, stream=out)

    fed = dashboard.feed_all(events)
    dashboard.close()

    assert fed == len(events)
    for name in FIGURES:
        assert_real_png(tmp_path / name)
    lines = (tmp_path / "events.jsonl").read_text().splitlines()
    assert len(lines) == len(events)
    assert [LabEvent.from_json(line) for line in lines] == events


def test_metrics_json_records_falling_loss_and_every_verdict(tmp_path: Path) -> None:
    events = run_events()
    with Dashboard(tmp_path, total_steps=30, interactive=False, stream=io.StringIO()) as board:
        board.feed_all(events)

    metrics = json.loads((tmp_path / "metrics.json").read_text())

    for worker in ("worker0", "worker1"):
        series = metrics["workers"][worker]
        assert series["step"] == list(range(1, 31))
        assert series["loss"][-1] < series["loss"][0] / 4
    assert metrics["evaluation"]["step"] == [10, 20, 30]
    assert metrics["evaluation"]["loss"] == sorted(metrics["evaluation"]["loss"], reverse=True)
    assert metrics["steps_done"] == 30 and metrics["finished"] is True
    assert metrics["simulated"] is True
    means = metrics["step_time_means"]["worker1"]
    assert means["compute_s"] == pytest.approx(0.05)
    assert means["total_s"] == pytest.approx(0.05 + 0.005 + 0.0 + 0.004)
    matrix = metrics["attestation_matrix"]
    assert matrix["verifiers"] == ["ps0", "trust", "worker0", "worker1"]
    assert "worker2" in matrix["subjects"]
    cells = {(c["verifier"], c["subject"]): c for c in matrix["cells"]}
    assert len(cells) == 3 + 6 + 1
    refused = cells[("trust", "worker2")]
    assert (refused["verdict"], refused["accepted"], refused["reason"]) == ("fail", False, REFUSAL)
    assert [c["passed"] for c in refused["checks"]] == [True, True, False]
    assert cells[("worker0", "ps0")]["verdict"] == "simulated-pass"
    assert len(metrics["attestations"]) == 10
    counts = metrics["counts"]
    assert counts["events"] == len(events)
    assert counts["attestations_refused"] == 1 and counts["audit_denied"] == 1
    assert counts["by_kind"]["metrics"] == 60 and counts["ignored"] == 0


def test_headless_text_shows_progress_refusals_and_summary(tmp_path: Path) -> None:
    out = io.StringIO()
    with Dashboard(tmp_path, total_steps=30, interactive=False, stream=out) as board:
        board.feed_all(run_events())

    text = out.getvalue()

    assert "✗ attestation trust → worker2: FAIL — " + REFUSAL in text
    assert "✓ attestation worker0 → ps0: PASS (SIMULATED)" in text
    assert "evaluation at step 30" in text
    assert "30/30" in text  # tqdm bar
    assert "*** SIMULATED ***" in text
    assert "denied issue_certificate" in text
    assert summarize_run(tmp_path) in text


def test_simulated_label_only_when_evidence_is_simulated(tmp_path: Path) -> None:
    real = LabEvent(
        "attestation",
        "ps0",
        {
            "verifier": "ps0",
            "subject": "worker0",
            "accepted": True,
            "simulated": False,
            "checks": [],
        },
    )
    with Dashboard(tmp_path / "real", total_steps=1, interactive=False, stream=io.StringIO()) as a:
        a.feed(real)
    with Dashboard(tmp_path / "sim", total_steps=1, interactive=False, stream=io.StringIO()) as b:
        b.feed(attestation("ps0", "worker0"))

    assert json.loads((tmp_path / "real" / "metrics.json").read_text())["simulated"] is False
    assert a.figures["attestation"].figure.get_suptitle() == ""
    assert "SIMULATED" in b.figures["attestation"].figure.get_suptitle()
    assert "SIMULATED" in b.figures["loss"].figure.get_suptitle()
    cell = json.loads((tmp_path / "real" / "metrics.json").read_text())["attestation_matrix"]
    assert cell["cells"][0]["verdict"] == "pass"


def test_malformed_and_numpy_events_are_kept_not_fatal(tmp_path: Path) -> None:
    events = [
        LabEvent("telemetry", "ps0", {"x": 1}),  # unknown kind
        LabEvent("metrics", "worker0", {"loss": 1.0}),  # no step
        LabEvent("attestation", "ps0", {"accepted": True}),  # no subject
        LabEvent(
            "metrics",
            "worker0",
            {
                "step": np.int64(1),
                "loss": np.float32(1.5),
                "compute_s": np.float64(0.1),
                "accuracy": float("nan"),
            },
        ),
        LabEvent("log", "ps0", {"level": "warning", "message": "raw", "blob": b"\x00\x01"}),
    ]
    with Dashboard(tmp_path, total_steps=5, interactive=False, stream=io.StringIO()) as board:
        board.feed_all(events)

    metrics = json.loads((tmp_path / "metrics.json").read_text())
    lines = (tmp_path / "events.jsonl").read_text().splitlines()

    assert metrics["counts"]["ignored"] == 3 and len(metrics["problems"]) == 3
    assert metrics["workers"]["worker0"]["loss"] == [1.5]
    assert metrics["workers"]["worker0"]["accuracy"] == [None]  # NaN is not valid JSON
    assert len(lines) == 5
    assert json.loads(lines[4])["data"]["blob"] == "0001"


def test_refusal_without_reason_is_explained_by_its_failed_checks(tmp_path: Path) -> None:
    event = attestation("trust", "worker2", accepted=False)
    del event.data["reason"]
    with Dashboard(tmp_path, total_steps=1, interactive=False, stream=io.StringIO()) as board:
        board.feed(event)

    cell = json.loads((tmp_path / "metrics.json").read_text())["attestation_matrix"]["cells"][0]

    assert cell["reason"] == "mr_td: MR_TD 9f… is not in the policy's allowed list"


def test_feeding_a_closed_dashboard_is_an_error(tmp_path: Path) -> None:
    board = Dashboard(tmp_path, total_steps=1, interactive=False, stream=io.StringIO())
    board.close()
    board.close()  # idempotent

    with pytest.raises(RuntimeError, match="closed"):
        board.feed(LabEvent("log", "ps0", {"level": "info", "message": "late"}))


# ---------------------------------------------------------------------- throttling


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_refresh_is_throttled(tmp_path: Path) -> None:
    clock = FakeClock()
    board = Dashboard(
        tmp_path,
        total_steps=30,
        interactive=False,
        stream=io.StringIO(),
        clock=clock,
        refresh_interval_s=0.5,
        save_interval_s=10.0,
    )
    events = run_events()

    board.feed_all(events[:50])
    frames_at_once = board.frames
    clock.now += 0.4
    board.feed_all(events[50:60])
    frames_before_interval = board.frames
    clock.now += 0.2
    board.feed(events[60])
    frames_after_interval = board.frames
    written_early = (tmp_path / "metrics.json").exists()
    clock.now += 10.0
    board.feed(events[61])
    written_later = json.loads((tmp_path / "metrics.json").read_text())
    forced = board.refresh(force=True)

    assert frames_at_once == 1
    assert frames_before_interval == 1
    assert frames_after_interval == 2
    assert not written_early  # files only every save_interval_s
    assert written_later["counts"]["events"] == 62
    assert forced and board.frames == 4
    board.close()


# ---------------------------------------------------------------------- front end


class FakeHandle:
    def __init__(self, obj: object) -> None:
        self.objects = [obj]

    def update(self, obj: object) -> None:
        self.objects.append(obj)


def test_front_end_detection(monkeypatch: pytest.MonkeyPatch) -> None:
    assert has_front_end() is False  # pytest has no IPython kernel
    monkeypatch.setenv("HFL_LAB_FRONTEND", "1")
    assert has_front_end() is True
    monkeypatch.setenv("HFL_LAB_FRONTEND", "0")
    assert has_front_end() is False


def test_interactive_dashboard_with_fake_display(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    shown: list[object] = []
    handles: list[FakeHandle] = []

    def fake_display(obj: object, *, display_id: bool = False) -> FakeHandle | None:
        shown.append(obj)
        if not display_id:
            return None
        handles.append(FakeHandle(obj))
        return handles[-1]

    monkeypatch.setattr(frontend, "display", fake_display)
    board = Dashboard(tmp_path, total_steps=30, interactive=True, figure_interval_s=0)
    events = run_events()

    board.feed_all(events)
    board.close()

    widget = board._matrix_widget
    assert widget is not None
    assert "title=" in widget.table.value and "SIMULATED" in widget.table.value
    assert "is not in the policy" in widget.table.value  # refusal details on hover
    assert widget.pairs.value == ("trust", "worker2")  # "checks of": the refusal, unasked
    assert "<table>" in widget.details.value
    widget.pairs.value = ("trust", "worker2")
    assert "mr_td" in widget.details.value and "FAIL" in widget.details.value
    progress = board._progress
    assert isinstance(progress, frontend.WidgetProgress)
    assert (progress.bar.value, progress.bar.max) == (30, 30)
    assert any("FAIL" in line for line in progress.lines)
    # loss and step-time figures: displayed once with a display id, then updated in place
    assert len(handles) == 2
    for handle in handles:
        assert len(handle.objects) >= 2
        png = handle.objects[-1]._repr_png_()  # type: ignore[attr-defined]
        assert png[:8] == PNG_SIGNATURE
    for name in FIGURES:
        assert_real_png(tmp_path / name)


# ---------------------------------------------------------------------- notebook 05 figures


CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def test_confusion_matrix_counts_and_png(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    y_true = rng.integers(0, 10, 500)
    y_pred = np.where(rng.random(500) < 0.7, y_true, rng.integers(0, 10, 500))

    matrix = confusion_matrix(y_true, y_pred, 10)
    figure = render_confusion_matrix(y_true, y_pred, CLASSES, tmp_path / "confusion.png")

    assert matrix.sum() == 500
    assert np.trace(matrix) == int(np.sum(y_true == y_pred))
    assert matrix[int(y_true[0]), int(y_pred[0])] >= 1
    assert_real_png(tmp_path / "confusion.png")
    assert "accuracy" in figure.axes[0].get_title()


def test_confusion_matrix_rejects_mismatched_labels(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="y_pred has 2"):
        confusion_matrix([1, 2, 3], [1, 2], 10)
    with pytest.raises(ValueError, match=r"outside 0\.\.9"):
        confusion_matrix([1, 12], [1, 2], 10)


def test_sample_predictions_png(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    images = rng.integers(0, 256, (20, 32, 32, 3), dtype=np.uint8)
    y_true = rng.integers(0, 10, 20)
    y_pred = y_true.copy()
    y_pred[:5] = (y_pred[:5] + 1) % 10

    figure = render_sample_predictions(images, y_true, y_pred, CLASSES, tmp_path / "s.png")
    standardized = render_sample_predictions(
        images.astype(np.float32) / 64 - 2,
        y_true,
        y_pred,
        CLASSES,
        tmp_path / "f.png",
        max_images=4,
    )

    assert_real_png(tmp_path / "s.png")
    assert "11 of 16 right" in figure.get_suptitle()
    assert "4 of 4" not in standardized.get_suptitle()  # the first 4 include wrong ones
    assert (tmp_path / "f.png").read_bytes()[:8] == PNG_SIGNATURE
    with pytest.raises(ValueError, match="images must be"):
        render_sample_predictions(images[:3], y_true, y_pred, CLASSES, tmp_path / "x.png")
