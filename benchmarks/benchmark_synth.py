#!/usr/bin/env python
"""How long the synthetic cohort takes to make: one preset, from scratch, in a temporary folder.

    python benchmarks/benchmark_synth.py [--preset demo] [--contrasts all] [--workers 2]

Prints the wall-clock seconds, the number of subjects and files, and seconds per subject. The
cohort is written to a temporary folder and removed, so nothing cached is reused or changed.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from medanomaly.data import generate_cohort
from medanomaly.data.contrast import check_contrasts
from medanomaly.data.synth import PRESETS


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="demo", choices=sorted(PRESETS))
    parser.add_argument("--contrasts", nargs="+", default=["all"])
    parser.add_argument("--workers", type=int, default=None)
    args = parser.parse_args()
    contrasts = check_contrasts(args.contrasts)
    with tempfile.TemporaryDirectory(prefix="medanomaly-synth-") as tmp:
        start = time.perf_counter()
        generate_cohort(Path(tmp) / args.preset, args.preset, workers=args.workers, progress=False,
                        contrasts=contrasts)
        seconds = time.perf_counter() - start
        files = sum(1 for p in Path(tmp).rglob("*.nii.gz"))
    subjects = sum(PRESETS[args.preset].values())
    print(f"preset {args.preset}, contrasts {' '.join(contrasts)}: {subjects} subjects, {files} volumes, "
          f"{seconds:.1f} s ({seconds / subjects:.2f} s per subject)")


if __name__ == "__main__":
    main()
