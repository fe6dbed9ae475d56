#!/usr/bin/env python
"""Volume AUROC of a finished benchmark's heatmaps under each volume-score reduction.

    python benchmarks/volume_reductions.py [--output-dir outputs/benchmark] [--cohort demo]

A bundle's volume score reduces its heatmap over the brain: the mean (cDDPM, PHANES, SAGAN and
SCRPS papers) or the mean of the top 1 % (the project's choice for dae, intensity, supervised).
This rescoring of the heatmaps `medanomaly benchmark` saved (no model is run) shows how much of
a row's volume AUROC is the reduction rather than the map: for every row of every contrast found
under the output folder it prints the volume AUROC with the mean, the top 1 %, the top 0.1 % and
the maximum, over all test volumes and over the healthy ones against those of the largest lesion
size group (`medanomaly.metrics.SIZE_GROUPS_ML`: 10 ml or more) only.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import nibabel as nib
import numpy as np

from medanomaly.benchmark import cohort_datalists
from medanomaly.data import load_datalist
from medanomaly.metrics import SIZE_GROUPS_ML, detection_metrics, size_group, volume_score

REDUCTIONS = {"mean": ("mean", 0.0), "top 1 %": ("top_percentile", 99.0),
              "top 0.1 %": ("top_percentile", 99.9), "max": ("top_percentile", 100.0)}
LARGE = SIZE_GROUPS_ML[-1][1]


def row_scores(row_dir: Path, volumes: list[dict]) -> dict[str, np.ndarray] | None:
    """Each reduction's scores of the row's saved heatmaps (None when any heatmap is missing)."""
    heatmaps = [row_dir / f"{v['subject']}_heatmap.nii.gz" for v in volumes]
    if not all(p.exists() for p in heatmaps):
        return None
    scores = {name: [] for name in REDUCTIONS}
    for path, volume in zip(heatmaps, volumes):
        heatmap = np.asarray(nib.load(path).dataobj, dtype=np.float32)
        brain = np.asarray(nib.load(volume["mask"]).dataobj) > 0
        for name, (reduction, percentile) in REDUCTIONS.items():
            scores[name].append(volume_score(heatmap, brain, reduction, percentile))
    return {name: np.array(values) for name, values in scores.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output-dir", type=Path, default=Path("outputs/benchmark"))
    parser.add_argument("--cohort", default="demo")
    args = parser.parse_args()
    header = " | ".join(f"{name}: all / large" for name in REDUCTIONS)
    for contrast, datalist in cohort_datalists(args.cohort, "all").items():
        folder = args.output_dir / contrast
        if not folder.is_dir():
            continue
        volumes = load_datalist(datalist, "test_lesion") + load_datalist(datalist, "test_healthy")
        lesion = np.array([v["lesion_voxels"] > 0 for v in volumes])
        in_large_test = ~lesion | np.array([size_group(v["lesion_ml"]) == LARGE for v in volumes])
        print(f"\n{contrast}: {lesion.sum()} lesion volumes ({(lesion & in_large_test).sum()} {LARGE}), "
              f"{(~lesion).sum()} healthy; volume AUROC\n| row | {header} |")
        for row_dir in sorted(p for p in folder.iterdir() if p.is_dir()):
            scores = row_scores(row_dir, volumes)
            if scores is None:
                continue
            cells = [f"{detection_metrics(s, lesion)['auroc']:.3f} / "
                     f"{detection_metrics(s[in_large_test], lesion[in_large_test])['auroc']:.3f}"
                     for s in scores.values()]
            print(f"| {row_dir.name} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
