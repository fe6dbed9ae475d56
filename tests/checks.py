"""Assertions shared by the bundles' tests."""

from __future__ import annotations

import ast
import json
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from medanomaly import io
from medanomaly.bundles import run_bundle


def assert_same_grid(image: sitk.Image, reference: sitk.Image, atol: float | None = None) -> None:
    """`image` lies on `reference`'s voxel grid: size, spacing, origin and direction, within `atol`
    (default: 1e-6 for spacing and direction, 1e-5 mm for the origin)."""
    assert image.GetSize() == reference.GetSize()
    np.testing.assert_allclose(image.GetSpacing(), reference.GetSpacing(), atol=1e-6 if atol is None else atol)
    np.testing.assert_allclose(image.GetOrigin(), reference.GetOrigin(), atol=1e-5 if atol is None else atol)
    np.testing.assert_allclose(image.GetDirection(), reference.GetDirection(), atol=1e-6 if atol is None else atol)


def pixel_metrics(metrics_file: Path) -> tuple[dict, float]:
    """The pooled voxel metrics of an evaluation's metrics.json and the lesion prevalence (chance AP)."""
    pixel = json.loads(Path(metrics_file).read_text())["pixel"]
    return pixel, pixel["n_pos"] / (pixel["n_pos"] + pixel["n_neg"])


def infer_on_nrrd(bundle: str, scan: Path, out_dir: Path, threshold: float, overrides: dict) -> tuple[np.ndarray, list]:
    """Runs `bundle`'s inference (demo overlay) on the .nrrd `scan` with .nrrd outputs and checks what
    every bundle owes: progress up to 100 %, a heatmap on the scan's grid, and the segmentation equal
    to heatmap > `threshold`. Returns the heatmap's values and the segmentation's segments."""
    progress = []
    overrides = {**overrides, "input": str(scan), "output_dir": str(out_dir), "output_ext": ".nrrd"}
    run_bundle(bundle, "inference", overrides, demo=True,
               on_progress=lambda fraction, message: progress.append(fraction))
    assert progress and progress[-1] == 1.0
    stem = Path(scan).name.removesuffix(".nrrd")
    heatmap = io.read_volume(Path(out_dir) / f"{stem}_heatmap.nrrd", allow_constant=True)
    assert_same_grid(heatmap, io.read_volume(scan))
    values = io.volume_array(heatmap)
    segmentation, segments = io.read_segmentation(Path(out_dir) / f"{stem}_anomaly.seg.nrrd")
    np.testing.assert_array_equal(segmentation > 0, values > threshold)
    return values, segments



def write_dicom_series(image: sitk.Image, directory: Path, series_uid: str, skip: int | None = None) -> None:
    """Write a 3D image as an int16 DICOM series, one file per slice (geometry kept in each slice's
    header); `skip` leaves that slice out (a series with a missing slice)."""
    directory.mkdir(parents=True, exist_ok=True)
    image = sitk.Cast(image, sitk.sitkInt16)
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    for k in range(image.GetDepth()):
        if k == skip:
            continue
        slice_ = image[:, :, k:k + 1]
        for tag, value in {"0008|0060": "MR", "0020|000d": "1.2.3.4.5", "0020|000e": series_uid,
                           "0008|0018": f"{series_uid}.{k + 1}", "0020|0013": str(k + 1)}.items():
            slice_.SetMetaData(tag, value)
        writer.SetFileName(str(directory / f"{series_uid}_{k:03d}.dcm"))
        writer.Execute(slice_)


def config_names(command: list[str]) -> list[str]:
    """The file names of a `monai.bundle run` command's --config_file, in order."""
    configs = command[command.index("--config_file") + 1]
    return [Path(c).name for c in (ast.literal_eval(configs) if configs.startswith("[") else [configs])]


class NoProcess:
    """Stands in for subprocess.Popen: records the command, runs nothing, exits 0."""

    started: list[list[str]] = []

    def __init__(self, command, **kwargs):
        self.started.append(list(command))
        self.stdout, self.pid = iter(()), 0

    def wait(self, timeout=None):
        return 0

    def poll(self):
        return 0
