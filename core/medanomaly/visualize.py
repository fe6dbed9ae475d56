"""Pictures a person would rather look at than read: slice panels of a detection."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure


def lesion_slice(label: np.ndarray, axis: int) -> int:
    """Index of the slice along `axis` with the largest lesion area (the middle if none)."""
    other = tuple(a for a in range(label.ndim) if a != axis)
    area = (label > 0).sum(axis=other)
    return int(area.argmax()) if area.any() else label.shape[axis] // 2


def _display(volume: np.ndarray, axis: int, index: int) -> np.ndarray:
    """One slice, rotated so that anterior is up (RAS arrays: first axis left-right)."""
    return np.rot90(np.take(volume, index, axis=axis))


def save_detection_panels(path: str | Path, image: np.ndarray, heatmap: np.ndarray, axis: int,
                          pseudo_healthy: np.ndarray | None = None, label: np.ndarray | None = None,
                          segmentation: np.ndarray | None = None, title: str = "") -> Path:
    """Input | pseudo-healthy | heatmap over input | ground truth (red) and segmentation
    (yellow) outlines, on the axial slice with the largest lesion."""
    index = lesion_slice(label if label is not None else heatmap > np.percentile(heatmap, 99.9), axis)
    panels = [("input", image, None)]
    if pseudo_healthy is not None:
        panels.append(("pseudo-healthy", pseudo_healthy, None))
    panels += [("anomaly heatmap", image, heatmap), ("ground truth / segmentation", image, None)]
    figure = Figure(figsize=(3.2 * len(panels), 3.6), dpi=110)
    FigureCanvasAgg(figure)
    vmax = float(np.percentile(image[image > 0], 99.5)) if np.any(image > 0) else 1.0
    for i, (name, background, overlay) in enumerate(panels):
        ax = figure.add_subplot(1, len(panels), i + 1)
        ax.imshow(_display(background, axis, index), cmap="gray", vmin=0, vmax=vmax)
        if overlay is not None:
            shown = _display(overlay, axis, index)
            heat = ax.imshow(np.ma.masked_less_equal(shown, 0), cmap="hot", alpha=0.7,
                             vmin=0, vmax=max(float(np.percentile(heatmap[heatmap > 0], 99.5)), 1e-6)
                             if np.any(heatmap > 0) else 1.0)
            figure.colorbar(heat, ax=ax, fraction=0.046, pad=0.02)
        if name.startswith("ground truth"):
            for outline, colour in ((label, "red"), (segmentation, "yellow")):
                if outline is not None and np.any(_display(outline, axis, index)):
                    ax.contour(_display(outline, axis, index) > 0, levels=[0.5], colors=colour, linewidths=1.0)
        ax.set_title(name, fontsize=9)
        ax.axis("off")
    figure.suptitle(f"{title}  (axial slice {index})", fontsize=10)
    figure.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path)
    return path
