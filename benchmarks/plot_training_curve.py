"""Training curve of a bundle run, from the log MONAI's StatsHandler writes (what `medanomaly
train ... > run.log` captures): the training loss (moving average over 50 iterations) against the
iteration, and every validation metric against the iteration it was computed at.

    python benchmarks/plot_training_curve.py runs/cddpm-t2w.log --output monai_bundles/cddpm/docs/training_curve.png

A run resumed from its checkpoint (`--set resume=true`) logged into another file: pass the logs in
order (`run.log run-resumed.log`) for one curve.

Prints the best validation value and where it was reached, so the docs can quote it.
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path

import numpy as np

ITERATION = re.compile(r"Epoch: (\d+)/\d+, Iter: (\d+)/(\d+) -- (\w+): ([-\d.eE+]+)")
VALIDATION = re.compile(r"Epoch\[(\d+)\] Metrics -- (\w+): ([-\d.eE+]+)")
# StatsHandler rounds metrics to 4 decimals; the checkpoint saver logs a new best one in full
BEST = re.compile(r"Key metric: (\w+) best value: ([-\d.eE+]+) at epoch: (\d+)")


def read_log(*paths: str | Path) -> tuple[dict[str, list[tuple[int, float]]], dict[str, list[tuple[int, float]]]]:
    """(training series, validation series): name -> [(iteration, value)], over the logs in order."""
    train: dict[str, list[tuple[int, float]]] = {}
    validation: dict[str, dict[int, float]] = {}
    epoch_length = None
    seen = set()
    lines = [line for path in paths for line in Path(path).read_text(errors="replace").splitlines()]
    for line in lines:
        for epoch, it, length, name, value in ITERATION.findall(line):
            epoch_length = int(length)
            step = (int(epoch) - 1) * epoch_length + int(it)
            if (name, step) not in seen:  # a resumed run repeats nothing; a progress bar may repeat a line
                seen.add((name, step))
                train.setdefault(name, []).append((step, float(value)))
        for epoch, name, value in VALIDATION.findall(line):
            validation.setdefault(name, {}).setdefault(int(epoch) * (epoch_length or 1), float(value))
        for name, value, epoch in BEST.findall(line):
            validation.setdefault(name, {})[int(epoch) * (epoch_length or 1)] = float(value)
    return train, {name: sorted(series.items()) for name, series in validation.items()}


def moving_average(values: np.ndarray, window: int = 50) -> np.ndarray:
    window = max(1, min(window, len(values)))
    return np.convolve(values, np.ones(window) / window, mode="valid")


def plot(train, validation, output: str | Path, title: str, lower_is_better: bool) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    for name, series in train.items():
        steps, values = np.array(series).T
        smooth = moving_average(values)
        axes[0].plot(steps[len(steps) - len(smooth):], smooth, label=f"{name} (moving average, 50)")
    axes[0].set_xlabel("iteration")
    axes[0].set_yscale("log")  # losses fall over orders of magnitude
    axes[0].set_title("training")
    axes[0].legend(fontsize=8)
    for name, series in validation.items():
        steps, values = np.array(series).T
        axes[1].plot(steps, values, "o-", label=name)
        best = int(np.argmin(values) if lower_is_better else np.argmax(values))
        axes[1].plot(steps[best], values[best], "r*", markersize=12, label=f"best {values[best]:.4g}")
    axes[1].set_xlabel("iteration")
    if lower_is_better:
        axes[1].set_yscale("log")
    axes[1].set_title("validation (model selection)")
    if validation:
        axes[1].legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    Path(output).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(output, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("logs", nargs="+", help="the run's log, then the logs of its resumed runs")
    parser.add_argument("--output", required=True)
    parser.add_argument("--title", default=None)
    parser.add_argument("--higher-is-better", action="store_true", help="the validation metric is a score, not a loss")
    args = parser.parse_args()
    train, validation = read_log(*args.logs)
    if not train:
        raise SystemExit(f"{' '.join(args.logs)}: no training lines of MONAI's StatsHandler found.")
    plot(train, validation, args.output, args.title or Path(args.logs[0]).stem, not args.higher_is_better)
    for name, series in validation.items():
        steps, values = np.array(series).T
        best = int(np.argmax(values) if args.higher_is_better else np.argmin(values))
        print(f"{name}: best {values[best]:.5g} at iteration {int(steps[best])} of {int(steps[-1])} "
              f"({len(values)} validations)")
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
