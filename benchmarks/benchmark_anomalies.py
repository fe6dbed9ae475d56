#!/usr/bin/env python
"""Milliseconds per 128 x 128 slice of the synthetic training anomalies, on one core.

    python benchmarks/benchmark_anomalies.py [--repeats 50] [--size 128] [--seed 0]

Prints the median time (and the 90th percentile) of:
* each cDDPM task alone (`SyntheticAnomaly` with that one task, one anomaly, no clean slices:
  region sampling included), the default task mix (1-4 anomalies, 20 % clean) and FPI;
  the Poisson tasks with the default solver ("box", the reference's bounding-box DST solve), with
  "auto" (the exact blend: DST on rectangles, else conjugate gradients) and forced to CG;
* `poisson_blend` on centred square patches of several sides and on the task's star-shaped
  regions: conjugate gradients (today's solver) vs the DST direct solve, with their max abs
  difference. Star-shaped regions are no Dirichlet rectangle: "auto" solves them by CG; "box"
  solves their bounding box by one DST (mean |box - CG| inside the region against the mean change).

Everything is seeded; BLAS, OpenMP and torch are limited to one thread.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
from scipy import ndimage
from threadpoolctl import threadpool_limits

from medanomaly.anomalies import TASK_NAMES, SyntheticAnomaly, foreign_patch_interpolation, sample_region
from medanomaly.anomalies.poisson import poisson_blend, warp_source


def brain_slice(size: int, seed: int, invert: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """An elliptic 'brain' with smooth texture and stripes, 0 outside (as in the tests)."""
    rng = np.random.default_rng(seed)
    rows, cols = np.mgrid[:size, :size] / size
    brain = ((rows - 0.5) / 0.4) ** 2 + ((cols - 0.5) / 0.32) ** 2 < 1
    texture = ndimage.gaussian_filter(rng.random((size, size)), 3)
    texture = (texture - texture.min()) / np.ptp(texture)
    image = 0.35 + 0.35 * texture + 0.15 * np.sin(10 * np.pi * cols) * np.cos(8 * np.pi * rows)
    return (1.0 - image if invert else image) * brain, brain


def timed(function, repeats: int) -> tuple[float, float]:
    """Median and 90th percentile of `repeats` calls, in milliseconds (one warm-up call first)."""
    function()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        function()
        times.append(time.perf_counter() - start)
    return 1e3 * float(np.median(times)), 1e3 * float(np.percentile(times, 90))


def row(name: str, stats: tuple[float, float], extra: str = "") -> None:
    print(f"  {name:<40s} {stats[0]:8.2f} ms  (p90 {stats[1]:7.2f}){extra}")


def bench_tasks(image, brain, others, repeats: int, seed: int) -> None:
    print("Synthetic anomalies, ms per slice:")
    for task in TASK_NAMES:
        solvers = ("box", "auto", "cg") if task.startswith("poisson") else (None,)
        for solver in solvers:
            options = {task: {"solver": solver}} if solver else {}
            anomaly = SyntheticAnomaly([task], clean_fraction=0.0, max_anomalies=1, seed=seed,
                                       other_source=others, task_options=options)
            name = f"{task}" + (f" (solver {solver})" if solver else "")
            row(name, timed(lambda anomaly=anomaly: anomaly(image, brain), repeats))
    mix = SyntheticAnomaly(seed=seed, other_source=others)
    row("default mix (1-4 anomalies, 20 % clean)", timed(lambda: mix(image, brain), repeats))
    rng = np.random.default_rng(seed)
    row("FPI", timed(lambda: foreign_patch_interpolation(image, others[0], brain, rng=rng), repeats))


def bench_poisson(image, brain, others, repeats: int, seed: int) -> None:
    size = image.shape[0]
    centre = np.array([size / 2, size / 2])
    source = warp_source(others[0], centre + 5, centre, image.shape, rotation=0.3)
    print("poisson_blend (mixed gradients), ms per solve: CG (today) vs DST")
    for side in (8, 16, 32, 64, 96):
        region = np.zeros(image.shape, dtype=bool)
        start = size // 2 - side // 2
        region[start:start + side, start:start + side] = True
        def blend(solver, region=region):
            return poisson_blend(image, source, region, mixed_gradients=True, solver=solver)

        cg_stats = timed(lambda: blend("cg"), repeats)
        dst_stats = timed(lambda: blend("dst"), repeats)
        difference = np.abs(poisson_blend(image, source, region, mixed_gradients=True, solver="cg")
                            - poisson_blend(image, source, region, mixed_gradients=True, solver="dst")).max()
        row(f"square {side} x {side}, CG", cg_stats)
        row(f"square {side} x {side}, DST", dst_stats, f"  speed-up {cg_stats[0] / dst_stats[0]:5.1f}x, "
                                                        f"max |CG - DST| {difference:.1e}")
    rng = np.random.default_rng(seed)
    regions = [r.mask(image.shape) for r in (sample_region(brain, rng) for _ in range(repeats)) if r is not None]
    for solver in ("cg", "box"):
        def blend_all(solver=solver):
            return [poisson_blend(image, source, r, brain, True, solver=solver) for r in regions]

        stats = timed(blend_all, 1)
        row(f"task regions (star-shaped, {solver}), per solve", tuple(s / len(regions) for s in stats))
    exact = [poisson_blend(image, source, r, brain, True, solver="cg") for r in regions]
    boxed = [poisson_blend(image, source, r, brain, True, solver="box") for r in regions]
    gap = np.mean([np.abs(b - e)[r].mean() for b, e, r in zip(boxed, exact, regions)])
    change = np.mean([np.abs(e - image)[r].mean() for e, r in zip(exact, regions)])
    print(f"  box vs CG inside the region: mean |box - CG| {gap:.4f} against a mean change of {change:.4f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=50)
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(1)
    image, brain = brain_slice(args.size, args.seed)
    others = [brain_slice(args.size, args.seed + k, invert=True)[0] for k in (1, 2)]
    with threadpool_limits(limits=1):
        bench_tasks(image, brain, others, args.repeats, args.seed)
        bench_poisson(image, brain, others, args.repeats, args.seed)


if __name__ == "__main__":
    main()
