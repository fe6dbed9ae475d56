"""Training and evaluation at 1 and N processes (PyTorch distributed, gloo on CPUs / NCCL on GPUs):
the ratio of throughputs, not absolute speed, is what this prints.

For each process count it runs, as a user would, `medanomaly train BUNDLE --demo --nproc N`
(a short training, no validation, no calibration) and `medanomaly evaluate BUNDLE --nproc N` on
the demo cohort, and reads the trainer's own clock (model_info.json `train_seconds`: the
iterations, not the start-up) and the evaluation's (metrics.json `timing.seconds`: every volume,
merge included).

    python benchmarks/distributed_scaling.py [--bundle dae] [--nproc 1 2] [--iterations 40] [--contrast T2w]

On a CPU machine each process gets cores / N threads (the launcher's `threads_per_process`), so
N processes share the same cores: the ratio says what sharding costs or saves there. On N GPUs
the ratio approaches N when data loading keeps up.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from medanomaly.benchmark import format_table
from medanomaly.bundles import find_bundle
from medanomaly.bundles.runner import threads_per_process


def _medanomaly(*arguments: str) -> None:
    result = subprocess.run([sys.executable, "-m", "medanomaly.cli", *arguments], capture_output=True, text=True)
    if result.returncode:
        raise SystemExit(f"medanomaly {' '.join(arguments)} failed:\n{result.stderr[-3000:]}")


def _slices_per_iteration(bundle: str) -> int:
    """Training slices one process sees per iteration in the demo configuration."""
    from monai.bundle import ConfigParser

    info = find_bundle(bundle)
    parser = ConfigParser()
    parser.read_config([str(info.config_file("train")), str(info.config_file("demo"))])
    per_volume = int(parser.get("slices_per_volume", 1))
    return max(1, int(parser["batch_size"]) // per_volume) * per_volume  # the loader's volumes x their slices


def measure(bundle: str, nproc: int, iterations: int, contrast: str, folder: Path) -> dict:
    threads = threads_per_process(nproc).get("OMP_NUM_THREADS", os.environ.get("OMP_NUM_THREADS", "all"))
    distributed = ["--nproc", str(nproc)] if nproc > 1 else []
    run = folder / f"train{nproc}"
    _medanomaly("train", bundle, "--demo", "--datalist", "demo", "--contrast", contrast, "--no-calibrate",
                "--output-dir", str(run), "--set", f"num_iterations={iterations}", "--set",
                f"epoch_length={iterations}", "--set", "val_interval=1000000", *distributed)
    train_seconds = json.loads((run / "models" / "model_info.json").read_text())["train_seconds"]
    evaluation = folder / f"evaluate{nproc}"
    _medanomaly("evaluate", bundle, "--datalist", "demo", "--contrast", contrast, "--output-dir", str(evaluation),
                "--set", "n_bootstrap=10", *distributed)
    metrics = json.loads((evaluation / "metrics.json").read_text())
    volumes = metrics["n_lesion_volumes"] + metrics["n_healthy_volumes"]
    samples = iterations * nproc * _slices_per_iteration(bundle)
    return {"processes": nproc, "threads each": threads, "training samples / s": samples / train_seconds,
            "evaluation volumes / s": volumes / metrics["timing"]["seconds"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bundle", default="dae")
    parser.add_argument("--nproc", nargs="+", type=int, default=[1, 2])
    parser.add_argument("--iterations", type=int, default=40)
    parser.add_argument("--contrast", default="T2w")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        rows = [measure(args.bundle, n, args.iterations, args.contrast, Path(folder)) for n in args.nproc]
    base = dict(rows[0])  # the numbers, before the rows are formatted
    for row in rows:
        for key in ("training samples / s", "evaluation volumes / s"):
            row[key.replace(" / s", " ratio")] = f"{row[key] / base[key]:.2f}"
            row[key] = f"{row[key]:.2f}"
    print(f"{args.bundle}, demo configuration, contrast {args.contrast}, {os.cpu_count()} CPU threads, "
          f"{args.iterations} training iterations per run")
    print(format_table(rows, tuple(rows[0])))


if __name__ == "__main__":
    main()
