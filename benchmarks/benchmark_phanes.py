#!/usr/bin/env python
"""PHANES against its own stage 1 alone (the RA map, `--mode ra`) and against the dae baseline,
in one run, on one cohort (default: the synthetic demo cohort), with the shipped weights.

    python benchmarks/benchmark_phanes.py [--datalist demo] [--device cpu] [--model-dir runs/phanes/models]
                                          [--output-dir outputs/benchmark_phanes]

Each row is one `run_bundle(..., "evaluate", overrides)` in its own process; the numbers come from
its metrics.json: pooled [Dice] (max over thresholds), pixel AP, volume AUROC, seconds per volume.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from medanomaly.benchmark import format_table, summary_row
from medanomaly.bundles import run_bundle

RUNS = [  # (row name, bundle, extra overrides)
    ("phanes", "phanes", {}),
    ("phanes-stage1 (RA)", "phanes", {"mode": "ra"}),
    ("dae", "dae", {}),
]


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--datalist", default="demo", help="Decathlon-style JSON or a synthetic preset (default: demo)")
    parser.add_argument("--device", default=None, help="cpu, cuda (default: the bundle's: cuda when available)")
    parser.add_argument("--model-dir", default=None,
                        help="calibrated phanes weights to compare (default: the bundle's shipped models/)")
    parser.add_argument("--output-dir", default="outputs/benchmark_phanes")
    parser.add_argument("--n-bootstrap", type=int, default=200)
    args = parser.parse_args(argv)
    output_dir = Path(args.output_dir).resolve()
    rows = []
    for name, bundle, extra in RUNS:
        folder = name.split()[0].replace("(", "").replace(")", "")
        out = output_dir / folder / ("ra" if extra.get("mode") == "ra" else "")
        overrides = {"datalist": args.datalist, "output_dir": str(out), "n_bootstrap": args.n_bootstrap,
                     "device": args.device, "save_outputs": False, **extra}
        if bundle == "phanes" and args.model_dir:
            overrides["model_dir"] = str(Path(args.model_dir).resolve())
        started = time.perf_counter()
        print(f"== {name}: evaluating ...", flush=True)
        run_bundle(bundle, "evaluate", overrides)
        metrics = json.loads((out / "metrics.json").read_text())
        rows.append(summary_row(name, metrics, time.perf_counter() - started))
    print(format_table(rows))
    full, stage1 = rows[0], rows[1]
    better = [k for k in ("pooled_dice", "pixel_ap", "volume_auroc") if (full[k] or 0) > (stage1[k] or 0)]
    print(f"\nFull PHANES beats its stage 1 alone on {len(better)}/3 of pooled [Dice], pixel AP, volume AUROC"
          f" ({', '.join(better) or 'none'}).")
    (output_dir / "benchmark_phanes.json").write_text(json.dumps(rows, indent=2))
    return rows


if __name__ == "__main__":
    main()
