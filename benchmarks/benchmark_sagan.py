#!/usr/bin/env python
"""SAGAN against Brainomaly, each position-code variant and the Swin generator, in one run, on one
cohort (default: the synthetic demo cohort).

    python benchmarks/benchmark_sagan.py [--datalist demo] [--device cpu] [--rows sagan brainomaly rope ...]
        [--train-iterations 300] [--retrain] [--output-dir outputs/benchmark_sagan]

Rows with shipped demo weights (sagan: models/, brainomaly: models/brainomaly/) are evaluated as
they are. The other variants have no shipped weights: they are trained here, briefly, with the
demo overlay (`--train-iterations` critic iterations; `--calibrate` also calibrates their
thresholds, which the table does not need) -- or, with `--train-iterations 0`, listed as "not trained".
`--retrain` trains every row with the same short budget, the like-for-like comparison. Each evaluation is one
`run_bundle("sagan", "evaluate", ...)` in its own process; the table holds the paper's metrics
(volume AUROC and AP, the subject score being the mean anomaly map), pooled [Dice] and seconds per
volume, with each row's training iterations, so short-trained rows are not mistaken for shipped ones.
Trainings and evaluations an earlier run left in the output folder are reused (`--fresh` redoes
them), so an interrupted benchmark resumes.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from medanomaly.benchmark import format_table, summary_row
from medanomaly.bundles import find_bundle, run_bundle
from medanomaly.bundles.model_info import has_weights, read_model_info, weights_file
from medanomaly.data import resolve_datalist

ROWS = {  # name: switches
    "sagan": {},
    "brainomaly": {"model": "brainomaly"},
    "sinusoidal": {"positional_encoding": "sinusoidal"},
    "learned": {"positional_encoding": "learned"},
    "rope": {"positional_encoding": "rope"},
    "alibi": {"positional_encoding": "alibi"},
    "attention_bias": {"positional_encoding": "attention_bias"},
    "swin": {"generator": "swin"},
}
SHIPPED = {"sagan": "models", "brainomaly": "models/brainomaly"}
COLUMNS = ["row", "weights", "iterations", "volume_auroc", "volume_ap", "pooled_dice", "pixel_ap",
           "seconds_per_volume"]


def train_row(name: str, switches: dict, datalist: Path, device: str | None, iterations: int, folder: Path,
              calibrate: bool = False) -> Path:
    """Demo-overlay training of one variant for `iterations` critic iterations (AUCp selection once,
    at the end), optionally calibrated (the table's metrics need no threshold)."""
    common = {"datalist": str(datalist), "device": device}
    run_bundle("sagan", "train", {**common, **switches, "output_dir": str(folder), "num_iterations": iterations,
                                  "epoch_length": iterations}, demo=True)
    model_dir = folder / "models"
    if calibrate:
        run_bundle("sagan", "calibrate", {**common, "model_dir": str(model_dir),
                                          "output_dir": str(folder / "calibration")}, demo=True)
    return model_dir


def _trained(model_dir: Path, iterations: int) -> bool:
    return has_weights(model_dir) and read_model_info(model_dir).get("iterations_done") == iterations


def _evaluated(out: Path, model_dir: Path) -> bool:
    metrics, weights = out / "metrics.json", weights_file(model_dir)
    return metrics.is_file() and weights.is_file() and metrics.stat().st_mtime > weights.stat().st_mtime


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--datalist", default="demo", help="Decathlon-style JSON or a synthetic preset (default: demo)")
    parser.add_argument("--device", default=None, help="cpu, cuda (default: cuda when available)")
    parser.add_argument("--rows", nargs="+", choices=list(ROWS), default=list(ROWS))
    parser.add_argument("--train-iterations", type=int, default=300,
                        help="critic iterations for rows without shipped weights (0: list them as not trained)")
    parser.add_argument("--retrain", action="store_true", help="train every row here, shipped ones too")
    parser.add_argument("--calibrate", action="store_true", help="calibrate the thresholds of rows trained here")
    parser.add_argument("--score-reduction", default="mean", choices=["mean", "top_percentile"],
                        help="subject score: mean map over the brain (the paper) or mean of its top 1 %%")
    parser.add_argument("--fresh", action="store_true",
                        help="train and evaluate again even where an earlier run of this script left results")
    parser.add_argument("--output-dir", default="outputs/benchmark_sagan")
    parser.add_argument("--n-bootstrap", type=int, default=200)
    args = parser.parse_args(argv)

    output_dir = Path(args.output_dir).resolve()
    datalist = resolve_datalist(args.datalist)
    bundle = find_bundle("sagan")
    rows = []
    for name in args.rows:
        switches = ROWS[name]
        shipped = bundle.root / SHIPPED[name] if name in SHIPPED else None
        if shipped is not None and has_weights(shipped) and not args.retrain:
            model_dir, weights = shipped, "shipped demo"
        elif args.train_iterations > 0:
            folder = output_dir / name / "train"
            if not args.fresh and _trained(folder / "models", args.train_iterations):
                print(f"== {name}: reusing the {args.train_iterations}-iteration training in {folder}", flush=True)
                model_dir = folder / "models"
            else:
                print(f"== {name}: training {args.train_iterations} iterations (demo overlay) ...", flush=True)
                model_dir = train_row(name, switches, datalist, args.device, args.train_iterations, folder,
                                      args.calibrate)
            weights = "trained here"
        else:
            rows.append({"row": name, "bundle": name, "weights": "not trained"})
            continue
        info = read_model_info(model_dir)
        shipped_suffix = "-shipped" if weights == "shipped demo" else ""
        out = output_dir / name / f"evaluate-{args.score_reduction}{shipped_suffix}"
        started = time.perf_counter()
        if args.fresh or not _evaluated(out, Path(model_dir)):
            print(f"== {name}: evaluating ({weights}) ...", flush=True)
            # the weights' model_info.json selects the network; the switches pick the shipped weights
            run_bundle("sagan", "evaluate", {"datalist": str(datalist), "output_dir": str(out), "device": args.device,
                                             "n_bootstrap": args.n_bootstrap, "save_outputs": False,
                                             "model_dir": str(model_dir), "score_reduction": args.score_reduction,
                                             **switches}, demo=True)
        else:
            print(f"== {name}: reusing the evaluation in {out} (newer than the weights)", flush=True)
        metrics = json.loads((out / "metrics.json").read_text())
        row = summary_row(name, metrics, time.perf_counter() - started, model_info=info)
        row.update(row=name, weights=weights, iterations=info.get("iterations_done"), score=args.score_reduction)
        rows.append(row)

    print(format_table(rows, tuple(COLUMNS)))
    by_name = {r["row"]: r for r in rows}
    a, b = by_name.get("sagan", {}), by_name.get("brainomaly", {})
    if a.get("volume_auroc") is not None and b.get("volume_auroc") is not None:
        same = a.get("iterations") == b.get("iterations")
        beats = (a["volume_auroc"], a["volume_ap"]) > (b["volume_auroc"], b["volume_ap"])
        verdict = "beats" if beats else "does not beat"
        print(f"\nsagan {verdict} brainomaly on this cohort: volume AUROC {a['volume_auroc']:.3f} vs "
              f"{b['volume_auroc']:.3f}, volume AP {a['volume_ap']:.3f} vs {b['volume_ap']:.3f}, pooled [Dice] "
              f"{a['pooled_dice']:.3f} vs {b['pooled_dice']:.3f}"
              + ("" if same else f" (training iterations differ: {a.get('iterations')} vs {b.get('iterations')})"))
    if any(r.get("weights") == "trained here" for r in rows):
        print("Rows 'trained here' had a short training in this run: compare them with each other and read "
              "the iterations column before comparing them with shipped weights.")
    output_dir.mkdir(parents=True, exist_ok=True)
    (output_dir / "benchmark_sagan.json").write_text(json.dumps(rows, indent=2))
    return rows


if __name__ == "__main__":
    main()
