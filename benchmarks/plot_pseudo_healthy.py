#!/usr/bin/env python
"""A picture of what a method does: input, pseudo-healthy image, heatmap and lesion mask of a few
subjects, each at the axial slice through most of its lesion (the middle slice for healthy ones).

    python benchmarks/plot_pseudo_healthy.py EVALUATION_DIR DATALIST OUT.png [--subjects sub-0049 sub-0045 ...]

EVALUATION_DIR is the output folder of an `evaluate` run that saved its outputs (`<subject>_heatmap`,
`<subject>_pseudo_healthy`); DATALIST the cohort's datalist (the subjects' images and labels).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from medanomaly import io  # noqa: E402
from medanomaly.data import load_datalist  # noqa: E402


def _array(path) -> np.ndarray:
    return io.volume_array(io.read_volume(path, allow_constant=True))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("evaluation_dir", type=Path)
    parser.add_argument("datalist", type=Path)
    parser.add_argument("output", type=Path)
    parser.add_argument("--subjects", nargs="+",
                        help="default: the first subject of each lesion family and one healthy")
    parser.add_argument("--title", default="")
    args = parser.parse_args()

    items = {item["subject"]: item for key in ("test_lesion", "test_healthy")
             for item in load_datalist(args.datalist, key)}
    subjects = args.subjects or list({item.get("family", "healthy"): s for s, item in reversed(items.items())}.values())
    fig, axes = plt.subplots(len(subjects), 4, figsize=(10, 2.6 * len(subjects)), squeeze=False)
    for row, subject in zip(axes, subjects):
        item = items[subject]
        image = _array(item["image"])
        pseudo = _array(args.evaluation_dir / f"{subject}_pseudo_healthy.nii.gz")
        heatmap = _array(args.evaluation_dir / f"{subject}_heatmap.nii.gz")
        label = _array(item["label"]) if "label" in item else np.zeros_like(image)
        z = int(np.argmax(label.sum((0, 1)))) if label.any() else image.shape[2] // 2
        top = np.percentile(image[image > 0], 99)
        panels = [("input", image, dict(cmap="gray", vmin=0, vmax=top)),
                  ("pseudo-healthy", pseudo, dict(cmap="gray", vmin=0, vmax=top)),
                  ("heatmap", heatmap, dict(cmap="inferno", vmin=0, vmax=np.percentile(heatmap[heatmap > 0], 99.5))),
                  ("lesion", label, dict(cmap="gray", vmin=0, vmax=1))]
        for ax, (name, volume, style) in zip(row, panels):
            ax.imshow(np.rot90(volume[:, :, z]), **style)
            ax.set_title(f"{subject} ({item.get('family', 'healthy')}): {name}", fontsize=8)
            ax.axis("off")
    if args.title:
        fig.suptitle(args.title)
    fig.tight_layout()
    args.output.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.output, dpi=90)
    print(args.output)


if __name__ == "__main__":
    main()
