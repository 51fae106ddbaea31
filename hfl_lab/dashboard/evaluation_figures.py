"""Evaluation figures of a trained model: confusion matrix and sample predictions (notebook 05)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import numpy.typing as npt
from matplotlib.figure import Figure

from hfl_lab.dashboard.figures import save_png

__all__ = ["confusion_matrix", "render_confusion_matrix", "render_sample_predictions"]


def _labels(name: str, values: npt.ArrayLike, num_classes: int) -> npt.NDArray[np.int64]:
    array = np.asarray(values)
    if array.ndim != 1 or not np.issubdtype(array.dtype, np.integer):
        raise ValueError(
            f"{name} must be a 1-D array of integer labels, got {array.dtype} "
            f"of shape {array.shape}"
        )
    if array.size and (array.min() < 0 or array.max() >= num_classes):
        raise ValueError(f"{name} holds labels outside 0..{num_classes - 1}")
    return array.astype(np.int64)


def confusion_matrix(
    y_true: npt.ArrayLike, y_pred: npt.ArrayLike, num_classes: int
) -> npt.NDArray[np.int64]:
    """``m[t, p]`` = how many images of true class ``t`` were predicted as ``p``."""
    true = _labels("y_true", y_true, num_classes)
    pred = _labels("y_pred", y_pred, num_classes)
    if true.shape != pred.shape:
        raise ValueError(f"y_true has {true.size} labels but y_pred has {pred.size}")
    matrix = np.zeros((num_classes, num_classes), dtype=np.int64)
    np.add.at(matrix, (true, pred), 1)
    return matrix


def render_confusion_matrix(
    y_true: npt.ArrayLike,
    y_pred: npt.ArrayLike,
    class_names: Sequence[str],
    path: str | Path,
    *,
    title: str = "",
) -> Figure:
    """Plot the confusion matrix (row-normalised colours, counts annotated) into ``path``."""
    matrix = confusion_matrix(y_true, y_pred, len(class_names))
    totals = matrix.sum(axis=1, keepdims=True)
    share = np.divide(matrix, totals, out=np.zeros(matrix.shape), where=totals > 0)
    accuracy = float(np.trace(matrix) / max(int(matrix.sum()), 1))
    n = len(class_names)
    figure = Figure(figsize=(max(5.0, 0.7 * n + 2), max(4.5, 0.65 * n + 1.5)), layout="constrained")
    ax = figure.subplots()
    image = ax.imshow(share, cmap="Blues", vmin=0, vmax=1)
    figure.colorbar(image, ax=ax, label="share of the true class")
    for t in range(n):
        for p in range(n):
            if matrix[t, p]:
                color = "white" if share[t, p] > 0.5 else "black"
                ax.text(p, t, str(matrix[t, p]), ha="center", va="center", fontsize=8, color=color)
    ax.set_xticks(range(n), class_names, rotation=45, ha="right")
    ax.set_yticks(range(n), class_names)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(f"{title + ': ' if title else ''}accuracy {accuracy:.1%} on {matrix.sum()} images")
    save_png(figure, Path(path))
    return figure


def _displayable(image: npt.NDArray[np.generic]) -> npt.NDArray[np.float64]:
    """An HWC image in [0, 1]: uint8 scaled, floats (e.g. standardized) min-max stretched."""
    if image.ndim == 3 and image.shape[0] in (1, 3) and image.shape[-1] not in (1, 3):
        image = np.transpose(image, (1, 2, 0))  # CHW → HWC
    if np.issubdtype(image.dtype, np.integer):
        return np.clip(image.astype(np.float64) / 255.0, 0, 1)
    low, high = float(np.min(image)), float(np.max(image))
    return (image.astype(np.float64) - low) / (high - low) if high > low else np.zeros(image.shape)


def render_sample_predictions(
    images: npt.ArrayLike,
    y_true: npt.ArrayLike,
    y_pred: npt.ArrayLike,
    class_names: Sequence[str],
    path: str | Path,
    *,
    max_images: int = 16,
    columns: int = 8,
) -> Figure:
    """A grid of images titled "predicted (true)", green when right and red when wrong."""
    array = np.asarray(images)
    true = _labels("y_true", y_true, len(class_names))
    pred = _labels("y_pred", y_pred, len(class_names))
    if array.ndim != 4 or not len(array) == len(true) == len(pred):
        raise ValueError(
            f"images must be (N, H, W, C) with N = len(y_true) = len(y_pred); got {array.shape}, "
            f"{len(true)} and {len(pred)} labels"
        )
    count = min(max_images, len(array))
    if count == 0:
        raise ValueError("no images to show")
    cols = min(columns, count)
    rows = -(-count // cols)
    figure = Figure(figsize=(1.6 * cols, 1.8 * rows + 0.4), layout="constrained")
    axes = np.atleast_1d(figure.subplots(rows, cols)).reshape(-1)
    for i, ax in enumerate(axes):
        ax.set_axis_off()
        if i >= count:
            continue
        ax.imshow(_displayable(array[i]).squeeze(), cmap="gray" if array.shape[-1] == 1 else None)
        right = true[i] == pred[i]
        ax.set_title(
            f"{class_names[pred[i]]}\n({class_names[true[i]]})",
            fontsize=8,
            color="#1a7f37" if right else "#cf222e",
        )
    correct = int(np.sum(true[:count] == pred[:count]))
    figure.suptitle(f"predicted (true): {correct} of {count} right")
    save_png(figure, Path(path))
    return figure
