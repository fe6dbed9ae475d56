#!/usr/bin/env python
"""cDDPM sampled three ways (DDPM through all 1000 steps, DDIM with 50 and with 10 steps) next
to the dae baseline, in one run, on one cohort (default: the synthetic demo cohort), with the
shipped weights.

    python benchmarks/benchmark_cddpm.py [--datalist demo] [--device cpu] [--rows ddim10 dae]
        [--max-volumes N] [--slow-max-volumes M] [--output-dir outputs/benchmark_cddpm]
        [--set KEY=VALUE ...]   (bundle config overrides for every row, e.g. sw_batch_size=128)

Each row is one `run_bundle(..., "evaluate", overrides)` in its own process; the numbers come from
its metrics.json: pooled [Dice] (max over thresholds), pixel AP, volume AUROC, seconds per volume.
Sampling costs one UNet pass per step and slice, so 1000-step DDPM is ~100 x the 10-step DDIM
cost: on a CPU it runs on a subset (`--slow-max-volumes`, default 1 volume on CPU) or is left
out; rows on a subset say so and are not comparable with full-cohort rows. The optional row
`ddim10-ssim255` uses the reference code's SSIM data range (255 on [0, 1] images).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from medanomaly.benchmark import format_table, summary_row
from medanomaly.bundles import run_bundle
from medanomaly.console import parse_overrides
from medanomaly.data import load_datalist, resolve_datalist
from medanomaly.data.datalist import TEST_KEYS, first_test_volumes

ROWS = {  # name: (bundle, overrides, slow)
    "ddpm1000": ("cddpm", {"sampler": "ddpm", "num_inference_steps": 1000}, True),
    "ddim50": ("cddpm", {"sampler": "ddim", "num_inference_steps": 50}, True),
    "ddim10": ("cddpm", {"sampler": "ddim", "num_inference_steps": 10}, False),
    "dae": ("dae", {}, False),
    # optional: the reference code's SSIM on [0, 1] images with data range 255 (not run by default)
    "ddim10-ssim255": ("cddpm", {"sampler": "ddim", "num_inference_steps": 10, "ssim_max_val": 255.0,
                                 "map_range": [0.0, 0.05]}, False),
}
DEFAULT_ROWS = ["ddpm1000", "ddim50", "ddim10", "dae"]
COLUMNS = ["row", "volumes", "pooled_dice", "pixel_ap", "volume_auroc", "seconds_per_volume"]


def _cuda_device(device: str | None) -> bool:
    if device is not None:
        return device.startswith("cuda")
    import torch

    return torch.cuda.is_available()


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--datalist", default="demo", help="Decathlon-style JSON or a synthetic preset (default: demo)")
    parser.add_argument("--device", default=None, help="cpu, cuda (default: cuda when available)")
    parser.add_argument("--rows", nargs="+", choices=list(ROWS), default=DEFAULT_ROWS,
                        help=f"which rows to run (default: {' '.join(DEFAULT_ROWS)})")
    parser.add_argument("--max-volumes", type=int, help="evaluate every row on the first N test volumes only")
    parser.add_argument("--slow-max-volumes", type=int,
                        help="cap for the DDPM-1000 and DDIM-50 rows (default: none on a GPU, 1 volume on a CPU)")
    parser.add_argument("--output-dir", default="outputs/benchmark_cddpm")
    parser.add_argument("--n-bootstrap", type=int, default=200)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="a bundle config override for every row (MONAI command-line syntax)")
    args = parser.parse_args(argv)
    common = parse_overrides(args.set)

    output_dir = Path(args.output_dir).resolve()
    datalist = resolve_datalist(args.datalist)
    n_all = sum(len(load_datalist(datalist, key)) for key in TEST_KEYS)
    slow_cap = args.slow_max_volumes
    if slow_cap is None:
        slow_cap = None if _cuda_device(args.device) else 1
    rows = []
    for name in args.rows:
        bundle, extra, slow = ROWS[name]
        caps = [c for c in (args.max_volumes, slow_cap if slow else None) if c is not None]
        cap = min(caps) if caps else None
        if cap == 0:
            print(f"== {name}: skipped (--slow-max-volumes 0)")
            continue
        rows_datalist, n_volumes = datalist, n_all
        if cap is not None and cap < n_all:
            rows_datalist, n_volumes = first_test_volumes(datalist, cap, output_dir / f"subset_{cap}")
        out = output_dir / (name if cap is None or cap >= n_all else f"{name}-{cap}volumes")
        overrides = {"datalist": str(rows_datalist), "output_dir": str(out), "n_bootstrap": args.n_bootstrap,
                     "device": args.device, "save_outputs": False, **common, **extra}
        print(f"== {name}: evaluating {n_volumes} of {n_all} test volumes ...", flush=True)
        started = time.perf_counter()
        run_bundle(bundle, "evaluate", overrides)
        metrics = json.loads((out / "metrics.json").read_text())
        row = summary_row(name, metrics, time.perf_counter() - started)
        row.update(row=name, volumes=f"{n_volumes}/{n_all}" + ("" if n_volumes == n_all else " (subset)"))
        rows.append(row)

    print(format_table(rows, COLUMNS))
    if any(r["volumes"].endswith("(subset)") for r in rows):
        print("\nRows marked (subset) ran on the first test volumes only: compare them with each other, not with "
              "full-cohort rows.")
    by_name = {r["row"]: r for r in rows}
    if "ddim10" in by_name and "dae" in by_name and by_name["ddim10"]["volumes"] == by_name["dae"]["volumes"]:
        cddpm, dae = by_name["ddim10"], by_name["dae"]
        print("\ncddpm (DDIM 10) minus dae: " + ", ".join(
            f"{k} {cddpm[k] - dae[k]:+.3f}" for k in ("pooled_dice", "pixel_ap", "volume_auroc")
            if cddpm[k] is not None and dae[k] is not None))
    output_dir.mkdir(parents=True, exist_ok=True)
    (output_dir / "benchmark_cddpm.json").write_text(json.dumps(rows, indent=2))
    return rows


if __name__ == "__main__":
    main()
