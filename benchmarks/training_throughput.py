"""Training throughput of every bundle's demo configuration on this machine.

For each bundle the demo training config is built in-process exactly as `medanomaly train BUNDLE
--demo` builds it, its training data loader is wrapped so that the time spent waiting for each
batch is measured, and a few iterations run (validation, checkpoints and the wall-clock budget off).
Prints, per bundle: the start-up (building the cached training set: cold = preprocessing every
volume, warm = reading the persistent cache of an earlier run), training steps per second,
samples (slices) per second, the fraction of the step time spent waiting for data, and the
process's peak memory.

    python benchmarks/training_throughput.py [--bundles cddpm dae ...] [--iterations 20] [--contrast T2w]

Runs on the synthetic demo cohort (generated on first use) with `$MEDANOMALY_HOME` as usual; a
private cache folder makes the cold start-up really cold.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

import torch

from medanomaly.benchmark import format_table
from medanomaly.bundles import bundle_scripts, find_bundle

BUNDLES = ("dae", "cddpm", "phanes", "sagan", "scrps", "supervised")
LOADER = "train#dataloader"  # every bundle's training data loader (sagan's labelled / healthy one)
TRAINER = {"phanes": "trainer"}  # PHANES runs its own two-stage loop (stage 1 here)


class TimedLoader:
    """An iterable over a data loader that adds up the time spent in `next()`."""

    def __init__(self, loader):
        self.loader, self.waiting, self.batches = loader, 0.0, 0

    def __len__(self):
        return len(self.loader)

    def __iter__(self):
        iterator = iter(self.loader)
        while True:
            start = time.perf_counter()
            try:
                batch = next(iterator)
            except StopIteration:
                return
            self.waiting += time.perf_counter() - start
            self.batches += 1
            yield batch

    def __getattr__(self, name):  # batch_size, sampler, ... of the wrapped loader
        return getattr(self.loader, name)


def _config(bundle: str, overrides: dict):
    from monai.bundle import ConfigParser

    info = find_bundle(bundle)
    parser = ConfigParser()
    parser.read_config([str(info.config_file("train")), str(info.config_file("demo"))])
    parser.update(overrides)
    return parser


def _overrides(bundle: str, iterations: int, output_dir: str, contrast: str, device: str) -> dict:
    common = {"output_dir": output_dir, "device": device, "resume": False, "max_train_seconds": None,
              "contrast": contrast}
    if bundle == "phanes":
        return {**common, "stage": "1", "stage1_iterations": iterations, "checkpoint_interval": 10 ** 9,
                "log_interval": 10 ** 9}
    return {**common, "num_iterations": iterations, "epoch_length": iterations, "val_interval": 10 ** 9}


def measure(bundle: str, iterations: int, contrast: str, device: str) -> dict:
    with tempfile.TemporaryDirectory() as output_dir, tempfile.TemporaryDirectory() as cache_dir, \
            bundle_scripts(bundle):
        os.environ["MEDANOMALY_PREPROCESSED_CACHE"] = cache_dir  # a private cache: the first start is cold
        starts = []
        for _ in range(2):  # cold, then warm (reading the persistent cache of the first)
            parser = _config(bundle, _overrides(bundle, iterations, output_dir, contrast, device))
            start = time.perf_counter()
            loader = parser.get_parsed_content(LOADER)
            starts.append(time.perf_counter() - start)
        timed = TimedLoader(loader)
        parser[LOADER] = timed
        parser.parse(reset=True)
        trainer = parser.get_parsed_content(TRAINER.get(bundle, "train#trainer"))
        torch.manual_seed(0)
        start = time.perf_counter()
        trainer.run()
        seconds = time.perf_counter() - start
    slices = loader.batch_size * parser.get_parsed_content("slices_per_volume")
    steps = timed.batches
    return {"bundle": bundle, "start-up cold (s)": f"{starts[0]:.1f}", "start-up warm (s)": f"{starts[1]:.1f}",
            "steps / s": f"{steps / seconds:.2f}", "samples / s": f"{steps * slices / seconds:.1f}",
            "data wait": f"{100 * timed.waiting / seconds:.0f} %",
            "peak memory (GB)": f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20:.1f}"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bundles", nargs="+", default=list(BUNDLES), choices=BUNDLES)
    parser.add_argument("--iterations", type=int, default=20)
    parser.add_argument("--contrast", default="T2w")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--json", action="store_true", help="one bundle, measured in this process, as JSON")
    args = parser.parse_args()
    if args.json:
        print(json.dumps(measure(args.bundles[0], args.iterations, args.contrast, args.device)))
        return
    rows = []
    for bundle in args.bundles:  # one process each: peak memory is the bundle's own
        command = [sys.executable, __file__, "--json", "--bundles", bundle, "--iterations", str(args.iterations),
                   "--contrast", args.contrast, "--device", args.device]
        result = subprocess.run(command, capture_output=True, text=True)
        if result.returncode:
            raise SystemExit(f"{bundle} failed:\n{result.stderr[-3000:]}")
        rows.append(json.loads(result.stdout.strip().splitlines()[-1]))
        print(format_table([rows[-1]], tuple(rows[-1])), flush=True)
    print(f"\n{os.cpu_count()} CPU threads, torch {torch.__version__}, {args.iterations} iterations each, "
          f"contrast {args.contrast}, device {args.device}")
    print(format_table(rows, tuple(rows[0])))


if __name__ == "__main__":
    sys.exit(main())
