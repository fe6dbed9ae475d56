#!/usr/bin/env python
"""Peak memory of one detection: a normal scan vs the same brain in a mostly empty 512 x 512 x 400 grid.

    python benchmarks/benchmark_memory.py [--bundle dae] [--contrast T2w] [--size 512 512 400]

The brain is a `tiny` cohort test scan (generated on first use), pasted into the middle of an
empty float32 grid of `--size` voxels at the scan's own spacing: the volume a scanner console or
a careless export produces. Each case runs `medanomaly detect` in a fresh process; the peak
resident memory of the bundle process (the largest of the command's processes) is printed, with
the wall time. The target (issue: memory grows with the grid, not the brain): under 3 GiB for
the large case on a 2-core, 24 GiB CPU machine.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import SimpleITK as sitk

# run in a fresh interpreter: RUSAGE_CHILDREN is the largest resident set of the processes it waited for
_MEASURE = """
import resource, subprocess, sys, json, time
started = time.perf_counter()
code = subprocess.run(sys.argv[1:], capture_output=True, text=True)
peak_mb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
print(json.dumps({"returncode": code.returncode, "peak_mb": round(peak_mb),
                  "seconds": round(time.perf_counter() - started, 1), "stderr_tail": code.stderr[-1500:]}))
"""


def padded_copy(scan: Path, size: tuple[int, int, int], target: Path) -> Path:
    """The scan in the middle of an empty grid of `size` voxels (same spacing and axes)."""
    image = sitk.ReadImage(str(scan), sitk.sitkFloat32)
    array = sitk.GetArrayFromImage(image)  # (z, y, x)
    big = np.zeros(size[::-1], np.float32)
    start = [(b - a) // 2 for a, b in zip(array.shape, big.shape)]
    big[tuple(slice(s, s + n) for s, n in zip(start, array.shape))] = array
    padded = sitk.GetImageFromArray(big)
    padded.SetSpacing(image.GetSpacing())
    padded.SetDirection(image.GetDirection())
    offset = np.asarray(image.GetDirection()).reshape(3, 3) @ (np.asarray(start[::-1]) * np.asarray(image.GetSpacing()))
    padded.SetOrigin(tuple(np.asarray(image.GetOrigin()) - offset))
    sitk.WriteImage(padded, str(target), useCompression=True)
    return target


def measure(bundle: str, scan: Path, output_dir: Path) -> dict:
    command = [sys.executable, "-m", "medanomaly.cli", "detect", bundle, str(scan), "--device", "cpu",
               "--output-dir", str(output_dir)]
    result = subprocess.run([sys.executable, "-c", _MEASURE, *command], capture_output=True, text=True, check=True)
    return json.loads(result.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bundle", default="dae")
    parser.add_argument("--contrast", default="T2w")
    parser.add_argument("--size", type=int, nargs=3, default=[512, 512, 400])
    args = parser.parse_args()

    from medanomaly.data import ensure_cohort, load_datalist

    scan = Path(load_datalist(ensure_cohort("tiny", contrast=args.contrast), "test_lesion")[0]["image"])
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        big = padded_copy(scan, tuple(args.size), tmp / f"padded_{'x'.join(map(str, args.size))}.nii.gz")
        print(f"{args.bundle} detect, peak resident memory of the bundle process (this machine):")
        for label, path in (("normal scan " + "x".join(map(str, sitk.ReadImage(str(scan)).GetSize())), scan),
                            ("same brain in an empty " + "x".join(map(str, args.size)) + " grid", big)):
            result = measure(args.bundle, path, tmp / label.split()[0])
            status = "ok" if result["returncode"] == 0 else f"FAILED ({result['stderr_tail'][-300:]})"
            print(f"  {label:<45} {result['peak_mb'] / 1024:6.2f} GiB  {result['seconds']:6.1f} s  {status}")


if __name__ == "__main__":
    main()
