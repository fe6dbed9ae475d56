"""How well each perceptual backbone separates a lesion-like anomaly from Gaussian noise of equal
MSE (`medanomaly.perceptual.separation`) on held-back healthy slices: the healthy validation
volumes of a synthetic cohort (default `tiny`, generated with another seed than the `demo` cohort
the committed backbone was trained on) in T1w, T2w and FLAIR, at the demo geometry (64 px, 3 mm).

    python benchmarks/benchmark_perceptual.py [--cohort tiny] [--seeds 0 1 2]

Rows: `medanomaly` (the committed weights), `random` (the same encoder, random), `imagenet` LPIPS
(VGG16) when its weights are in the torch hub cache. docs/PERCEPTUAL.md quotes this output.
"""

from __future__ import annotations

import argparse

from medanomaly import perceptual
from medanomaly.benchmark import format_table
from medanomaly.data import CONTRASTS, ensure_cohort
from medanomaly.scoring import PerceptualDistance, PerceptualWeightsMissing


def backbones(seed: int) -> dict:
    found = {"medanomaly": perceptual.FeatureDistance(perceptual.load_backbone()),
             f"random (seed {seed})": perceptual.FeatureDistance(perceptual.random_backbone(seed))}
    try:
        found["imagenet (LPIPS VGG16)"] = PerceptualDistance("vgg", backbone="imagenet")
    except PerceptualWeightsMissing:
        print("imagenet: no VGG16 weights in the torch hub cache (offline); row left out")
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cohort", default="tiny")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="anomaly / noise draws")
    args = parser.parse_args()
    images, brains = perceptual.held_back_slices([ensure_cohort(args.cohort, contrast=c) for c in CONTRASTS])
    rows = []
    for name, distance in backbones(0).items():
        for seed in args.seeds:
            result = perceptual.separation(distance, images, brains, seed)
            rows.append({"backbone": name, "draw": seed, "slices": result["slices"],
                         "anomaly farther": f"{result['anomaly_farther']:.2f}",
                         "median distance ratio": f"{result['median_ratio']:.2f}"})
    print(f"{args.cohort} cohort, healthy validation slices, 64 px / 3 mm, T1w + T2w + FLAIR")
    print(format_table(rows, tuple(rows[0])))


if __name__ == "__main__":
    main()
