"""Assertions shared by the bundles' tests."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import SimpleITK as sitk


def assert_same_grid(image: sitk.Image, reference: sitk.Image) -> None:
    """`image` lies on `reference`'s voxel grid: size, spacing, origin and direction."""
    assert image.GetSize() == reference.GetSize()
    np.testing.assert_allclose(image.GetSpacing(), reference.GetSpacing(), atol=1e-6)
    np.testing.assert_allclose(image.GetOrigin(), reference.GetOrigin(), atol=1e-5)
    np.testing.assert_allclose(image.GetDirection(), reference.GetDirection(), atol=1e-6)


def pixel_metrics(metrics_file: Path) -> tuple[dict, float]:
    """The pooled voxel metrics of an evaluation's metrics.json and the lesion prevalence (chance AP)."""
    pixel = json.loads(Path(metrics_file).read_text())["pixel"]
    return pixel, pixel["n_pos"] / (pixel["n_pos"] + pixel["n_neg"])
