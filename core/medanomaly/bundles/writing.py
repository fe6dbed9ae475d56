"""Writing one detection's outputs: heatmap, thresholded segmentation and pseudo-healthy image,
on exactly the input file's grid, all or nothing."""

from __future__ import annotations

import functools
import os
from pathlib import Path
from typing import Callable, Hashable, Mapping

import numpy as np
from monai.transforms import MapTransform

from medanomaly import io
from medanomaly.bundles.outputs import output_paths
from medanomaly.bundles.predictions import (
    PRED,
    item_subject_name,
    scored_heatmap,
    source_file,
    supplied_brain_mask,
    to_numpy,
)
from medanomaly.data import IMAGE, intensity_window


class SaveAnomalyOutputsd(MapTransform):
    """Writes the heatmap, the thresholded segmentation and the pseudo-healthy image of one
    inverted prediction on exactly the input file's grid, and records their paths."""

    def __init__(self, output_dir: str | None, threshold: float | None, extension: str = ".nii.gz",
                 pseudo_healthy: bool = True, enabled: bool = True):
        super().__init__(keys=[PRED])
        self.output_dir, self.threshold, self.extension = output_dir, threshold, extension
        self.pseudo_healthy, self.enabled = pseudo_healthy, enabled and output_dir is not None

    def __call__(self, data: Mapping[Hashable, object]) -> dict:
        d = dict(data)
        if not self.enabled:
            return d
        source, name = source_file(d), item_subject_name(d)
        brain = supplied_brain_mask(d)

        @functools.cache
        def heatmap() -> np.ndarray:  # made once, after the pseudo-healthy image (one input-sized copy at a time)
            values = scored_heatmap(d)
            values *= brain
            return values

        writers = {}
        if self.pseudo_healthy:
            writers["pseudo_healthy"] = lambda path: io.write_volume(self._scanner_intensities(d, brain), source, path)
        writers["heatmap"] = lambda path: io.write_heatmap(heatmap(), source, path)
        if self.threshold is not None:
            writers["segmentation"] = lambda path: io.write_segmentation(heatmap() > self.threshold, source, path)
        paths = output_paths(self.output_dir, name, self.extension)
        written = write_together({kind: paths[kind] for kind in writers}, writers)
        d["outputs"] = {"subject": name, "input": str(source), "threshold": self.threshold,
                        "volume_score": float(heatmap()[brain].mean()) if brain.any() else 0.0, **written}
        return d

    @staticmethod
    def _scanner_intensities(d: Mapping, brain: np.ndarray) -> np.ndarray:
        """The pseudo-healthy image in the input's intensities (the normalisation undone), 0 outside the brain."""
        reconstruction = to_numpy(d[PRED][1]).astype(np.float32)  # a copy, changed in place below
        window = intensity_window(d[IMAGE])
        if window is not None:
            reconstruction *= window[1] - window[0]
            reconstruction += window[0]
        reconstruction *= brain
        return reconstruction


def write_together(paths: Mapping[str, Path], writers: Mapping[str, Callable[[Path], object]]) -> dict[str, str]:
    """Writes a set of outputs all or nothing: each to a hidden partial file first, then all renamed
    into place, so a failure (full disk) never leaves a new heatmap beside an old segmentation."""
    partial = {kind: path.parent / f".{path.name}.partial{''.join(path.suffixes[-2:])}" for kind, path in paths.items()}
    try:
        for kind, writer in writers.items():
            writer(partial[kind])
        for kind, path in paths.items():
            os.replace(partial[kind], path)
    finally:
        for path in partial.values():
            path.unlink(missing_ok=True)
    return {kind: str(path) for kind, path in paths.items()}
