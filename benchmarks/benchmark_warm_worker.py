"""The wait for a heatmap in one session: a new process per run vs the warm worker.

    python benchmarks/benchmark_warm_worker.py [--bundle dae] [--runs 3] [--contrast T2w]

Detects lesions in one demo scan `--runs` times each way, as the Slicer module does (one bundle
inference run per click): with a new Python process per run, then forked from one warm worker
(`medanomaly.bundles.warm`, started and ready before its first run; its start-up is printed
apart). Prints each run's wait and the bundle's own inference time (the evaluator's "Engine run
finished" time in the log), so the start-up each way is the difference.
"""

from __future__ import annotations

import argparse
import re
import tempfile
import time
from pathlib import Path

from medanomaly.benchmark import cohort_datalists, format_table
from medanomaly.bundles import BundleProcess, bundle_command
from medanomaly.bundles.warm import WarmWorker
from medanomaly.data import load_datalist

ENGINE_TIME = re.compile(r"Engine run finished\. Time taken: (\d+):(\d+):([\d.]+)")


def _run(start, bundle: str, scan: str, output_dir: Path) -> dict:
    command = bundle_command(bundle, "inference", {"input": scan, "output_dir": str(output_dir)})
    started = time.perf_counter()
    process = start(command)
    process.wait()
    wait = time.perf_counter() - started
    h, m, s = ENGINE_TIME.search(process.log_tail).groups()
    return {"wait (s)": wait, "inference (s)": 3600 * int(h) + 60 * int(m) + float(s)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bundle", default="dae")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--contrast", default="T2w")
    args = parser.parse_args()
    scan = load_datalist(cohort_datalists("demo", args.contrast)[args.contrast], "test_lesion")[0]["image"]
    rows, worker = [], WarmWorker()
    try:
        with tempfile.TemporaryDirectory() as folder:
            for way, start in (("new process", BundleProcess), ("warm worker", worker.start_bundle)):
                if way == "warm worker":
                    started = time.perf_counter()
                    assert worker.wait_ready(), "the warm worker did not start"
                    print(f"warm worker ready after {time.perf_counter() - started:.1f} s", flush=True)
                for run in range(1, args.runs + 1):
                    result = _run(start, args.bundle, scan, Path(folder) / f"{way}{run}")
                    rows.append({"way": way, "run": run, **{k: f"{v:.1f}" for k, v in result.items()},
                                 "wait / inference": f"{result['wait (s)'] / result['inference (s)']:.2f}"})
                    print(format_table([rows[-1]], tuple(rows[-1])), flush=True)
    finally:
        worker.close()
    print(f"\n{args.bundle}, one demo {args.contrast} scan ({Path(scan).name})")
    print(format_table(rows, tuple(rows[0])))


if __name__ == "__main__":
    main()
