"""`medanomaly benchmark`: every bundle's evaluate workflow on one cohort, one table, one report.

Each bundle runs in its own process (exactly as `python -m monai.bundle run` would), so one
method's memory or CUDA state never leaks into the next, and one that fails (or has no
weights) is reported in the table with the root cause of its failure instead of stopping the
others. The numbers come from each run's `metrics.json`, `per_volume.json` and
`histograms.npz` (written by `medanomaly.bundles.engine.CohortMetricsHandler`); the cost
columns from the run (wall time, peak memory) and the weights' `model_info.json` (training time).

Output folder: `results.json` (everything, per volume and per lesion family / size group),
`results.csv` (one row per bundle), `results_by_group.csv`, `report.html` + `figures/`
(see `medanomaly.report`), and one evaluation folder per bundle.
"""

from __future__ import annotations

import csv
import datetime
import json
import os
import platform
import re
import resource
import sys
import threading
import time
from pathlib import Path

from medanomaly.bundles import BundleRunError, find_bundle, list_bundles, start_bundle
from medanomaly.bundles.registry import MODEL_FILE, BundleInfo, BundleNotFound, read_model_info
from medanomaly.data import PRESETS, ensure_cohort

OK, NO_WEIGHTS, NO_EVALUATE, FAILED = "ok", "no weights", "no evaluate config", "failed"
RESULTS_JSON, RESULTS_CSV, GROUPS_CSV = "results.json", "results.csv", "results_by_group.csv"
CI_METHOD = "95 % percentile bootstrap over volumes (seed 0)"

COLUMNS = [
    "bundle", "status", "variant", "volume_auroc", "volume_ap", "slice_auroc", "slice_ap",
    "pixel_ap", "pixel_ap_ci_low", "pixel_ap_ci_high", "pixel_auroc",
    "pooled_dice", "pooled_dice_ci_low", "pooled_dice_ci_high",
    "dice_per_volume", "dice_per_volume_std", "dice_per_volume_ci_low", "dice_per_volume_ci_high",
    "threshold", "dice_at_threshold", "healthy_fpr",
    "train_seconds", "seconds_per_volume", "peak_rss_mb", "cuda_max_allocated_mb", "wall_seconds", "device",
    "error",
]
GROUP_COLUMNS = ["bundle", "kind", "group", "n_lesion_volumes", "pixel_ap", "pixel_auroc", "max_dice",
                 "max_dice_per_volume", "volume_auroc"]


def train_seconds(model_info: dict) -> float | None:
    """Training wall time recorded with the weights: `train_seconds`, else the sum of the
    stages' `*_seconds` (multi-stage trainers); None when nothing was recorded."""
    if model_info.get("train_seconds") is not None:
        return float(model_info["train_seconds"])
    stages = [v for k, v in model_info.items() if k.endswith("_seconds") and isinstance(v, (int, float))]
    return float(sum(stages)) if stages else None


def _ci(values: dict | None, key: str = "ci") -> tuple:
    ci = (values or {}).get(key) or [None, None]
    return ci[0], ci[1]


def summary_row(bundle: str, metrics: dict, wall_seconds: float | None = None, model_info: dict | None = None,
                peak_rss_mb: float | None = None) -> dict:
    """The benchmark's columns from one metrics.json."""
    model_info = model_info or {}
    at = metrics.get("at_threshold") or {}
    timing = metrics.get("timing", {})
    pixel, per_volume = metrics["pixel"], metrics["max_dice_per_volume"]
    row = dict.fromkeys(COLUMNS)
    row.update({
        "bundle": bundle, "status": OK, "variant": model_info.get("variant"),
        "volume_auroc": metrics["volume"].get("auroc"), "volume_ap": metrics["volume"].get("ap"),
        "slice_auroc": metrics.get("slice", {}).get("auroc"), "slice_ap": metrics.get("slice", {}).get("ap"),
        "pixel_ap": pixel["ap"], "pixel_auroc": pixel["auroc"], "pooled_dice": pixel["max_dice"]["dice"],
        "dice_per_volume": per_volume["mean"], "dice_per_volume_std": per_volume.get("std"),
        "threshold": at.get("threshold"), "dice_at_threshold": at.get("dice"), "healthy_fpr": at.get("fpr_healthy"),
        "train_seconds": train_seconds(model_info), "seconds_per_volume": timing.get("seconds_per_volume"),
        "peak_rss_mb": timing.get("peak_rss_mb", peak_rss_mb),
        "cuda_max_allocated_mb": timing.get("cuda_max_allocated_mb"),
        "wall_seconds": None if wall_seconds is None else round(wall_seconds, 1), "device": timing.get("device"),
    })
    row["pixel_ap_ci_low"], row["pixel_ap_ci_high"] = _ci(pixel, "ap_ci")
    row["pooled_dice_ci_low"], row["pooled_dice_ci_high"] = _ci(pixel["max_dice"])
    row["dice_per_volume_ci_low"], row["dice_per_volume_ci_high"] = _ci(per_volume)
    return row


def failed_row(bundle: str, status: str, error: str, wall_seconds: float | None = None,
               model_info: dict | None = None) -> dict:
    row = dict.fromkeys(COLUMNS)
    row.update(bundle=bundle, status=status, error=error, variant=(model_info or {}).get("variant"),
               train_seconds=train_seconds(model_info or {}),
               wall_seconds=None if wall_seconds is None else round(wall_seconds, 1))
    return row


def group_rows(bundle: str, metrics: dict) -> list[dict]:
    """One row per lesion family and size group (healthy volumes have no lesion metrics)."""
    rows = []
    for kind in ("families", "sizes"):
        for group, values in (metrics.get(kind) or {}).items():
            if values.get("n_lesion_volumes"):
                rows.append({"bundle": bundle, "kind": kind[:-1] if kind == "sizes" else "family", "group": group,
                             **{c: values.get(c) for c in GROUP_COLUMNS[3:]}})
    return rows


def format_table(rows: list[dict], columns: tuple = ("bundle", "status", "volume_auroc", "slice_auroc",
                                                      "pixel_ap", "pooled_dice", "dice_per_volume",
                                                      "dice_at_threshold", "healthy_fpr", "seconds_per_volume",
                                                      "peak_rss_mb")) -> str:
    def cell(value) -> str:
        return "n/a" if value is None else f"{value:.3f}" if isinstance(value, float) else str(value)

    widths = {c: max(len(c), *(len(cell(r.get(c))) for r in rows)) for c in columns}
    lines = ["  ".join(c.ljust(widths[c]) for c in columns)]
    lines += ["  ".join(cell(r.get(c)).ljust(widths[c]) for c in columns) for r in rows]
    lines += [f"{r['bundle']}: {r['status']}: {r['error']}" for r in rows if r.get("error")]
    return "\n".join(lines)


def _model_dir(bundle: BundleInfo, models_root: Path | None) -> Path:
    """`models_root/<bundle>/models` (what `medanomaly train` writes under runs/) when it holds
    weights, else the bundle's own `models/`."""
    if models_root is not None:
        for candidate in (models_root / bundle.name / "models", models_root / bundle.name):
            if (candidate / MODEL_FILE).is_file():
                return candidate
    return bundle.model_dir


def _read_json(path: Path) -> dict:
    return json.loads(path.read_text()) if path.is_file() else {}


def _children_max_rss_mb() -> float:
    """The largest peak resident memory of the waited-for child processes so far (MB)."""
    rss = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return round(rss / (2**20 if sys.platform == "darwin" else 2**10), 1)


def _short_error(error: BaseException) -> str:
    if isinstance(error, BundleRunError):
        return error.cause or str(error).splitlines()[0]
    return f"{type(error).__name__}: {error}".splitlines()[0]


def _run_evaluation(bundle: BundleInfo, overrides: dict, demo: bool | None, log_file: Path, on_progress,
                    timeout_minutes: float | None) -> None:
    """The evaluate workflow in its own process, its log into `log_file`; stopped (and
    reported as such) when it runs past `timeout_minutes`."""
    with open(log_file, "w") as log:
        process = start_bundle(bundle, "evaluate", overrides, demo)
        timer = threading.Timer(60 * timeout_minutes, process.cancel) if timeout_minutes else None
        if timer is not None:
            timer.start()
        try:
            process.wait(on_line=lambda line: print(line, file=log, flush=True), on_progress=on_progress)
        finally:
            if timer is not None:
                timer.cancel()
    if process.cancelled:
        raise TimeoutError(f"stopped after {timeout_minutes:g} min (--timeout-minutes)")


def evaluate_bundle(name: str, datalist: Path, run_dir: Path, device: str | None = None, demo: bool | None = None,
                    n_bootstrap: int = 200, models_root: Path | None = None, on_progress=None,
                    timeout_minutes: float | None = None) -> dict:
    """Runs one bundle's evaluate workflow in its own process; returns its result entry
    (`row`, `groups`, `metrics`, `per_volume`), with the status and error when it could not run."""
    started = time.perf_counter()
    try:
        bundle = find_bundle(name)
    except BundleNotFound as error:
        return {"row": failed_row(str(name), FAILED, str(error).splitlines()[0])}
    model_dir = _model_dir(bundle, models_root)
    model_info = read_model_info(model_dir)
    if not (model_dir / MODEL_FILE).is_file():
        return {"row": failed_row(bundle.name, NO_WEIGHTS, f"no {MODEL_FILE} in {model_dir}: train the bundle first "
                                  f"(medanomaly train {bundle.name})", model_info=model_info)}
    if demo is False and model_info.get("variant") == "demo":
        where = "its own models/" if model_dir == bundle.model_dir else str(model_dir)
        return {"row": failed_row(bundle.name, NO_WEIGHTS, f"only demo weights ({where}); --paper-scale needs weights "
                                  f"trained with the paper-scale config: `medanomaly train {bundle.name}`, then "
                                  "--models-root runs", model_info=model_info)}
    if not (bundle.configs_dir / "evaluate.yaml").is_file():
        return {"row": failed_row(bundle.name, NO_EVALUATE, f"no configs/evaluate.yaml in {bundle.root}",
                                  model_info=model_info)}
    overrides = {"datalist": str(datalist), "output_dir": str(run_dir), "device": device, "n_bootstrap": n_bootstrap}
    if model_dir != bundle.model_dir:
        overrides["model_dir"] = str(model_dir)  # the runner picks the overlay those weights were trained with
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "metrics.json").unlink(missing_ok=True)  # never report an earlier run's numbers
    try:
        _run_evaluation(bundle, overrides, demo, run_dir / "benchmark.log", on_progress, timeout_minutes)
        metrics = json.loads((run_dir / "metrics.json").read_text())
    except Exception as error:  # a failing bundle never stops the others
        return {"row": failed_row(bundle.name, FAILED, _short_error(error), time.perf_counter() - started, model_info),
                "log": str(run_dir / "benchmark.log")}
    wall = time.perf_counter() - started
    return {
        "row": summary_row(bundle.name, metrics, wall, model_info, peak_rss_mb=_children_max_rss_mb()),
        "groups": group_rows(bundle.name, metrics),
        "run_dir": str(run_dir),
        "metrics": metrics,
        "per_volume": _read_json(run_dir / "per_volume.json") if (run_dir / "per_volume.json").is_file() else [],
        "model_info": model_info,
        "log": str(run_dir / "benchmark.log"),
    }


def write_tables(results: dict, output_dir: Path) -> None:
    rows = [entry["row"] for entry in results["bundles"]]
    (output_dir / RESULTS_JSON).write_text(json.dumps(results, indent=1))
    for name, columns, table in ((RESULTS_CSV, COLUMNS, rows),
                                 (GROUPS_CSV, GROUP_COLUMNS,
                                  [g for entry in results["bundles"] for g in entry.get("groups", [])])):
        with open(output_dir / name, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=columns)
            writer.writeheader()
            writer.writerows(table)


def resolve_cohort(cohort: str | Path) -> Path:
    """A synthetic preset's datalist (generated on first use) or a datalist JSON."""
    if str(cohort) in PRESETS:
        return ensure_cohort(str(cohort))
    path = Path(cohort)
    if not path.is_file():
        raise SystemExit(f"error: --cohort {cohort} is neither a preset ({', '.join(PRESETS)}) nor a datalist file.")
    return path.resolve()


def run_benchmark(bundles: list[str] | None = None, cohort: str = "demo", output_dir: Path = Path("outputs/benchmark"),
                  device: str | None = None, demo: bool | None = None, n_bootstrap: int = 200,
                  models_root: Path | None = None, report: bool = True, command: str | None = None,
                  timeout_minutes: float | None = None, merge: bool = False) -> dict:
    """Evaluates `bundles` (default: every bundle found) on `cohort`; writes the tables and the
    report into `output_dir` and returns the results (`results.json`'s content). `merge` keeps
    the other bundles of the output folder's earlier results on the same cohort (e.g. to add a
    newly trained bundle without re-running the slow ones)."""
    from medanomaly.cli import _ProgressPrinter

    datalist = resolve_cohort(cohort)
    names = bundles or [b.name for b in list_bundles()]
    output_dir = Path(output_dir).resolve()
    output_dir.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    results = {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "command": command or f"run_benchmark(bundles={bundles!r}, cohort={str(cohort)!r})",
        "cohort": str(cohort), "datalist": str(datalist), "device": device or "auto",
        "machine": f"{platform.system()} {platform.machine()}, {os.cpu_count()} CPU cores",
        "ci_method": CI_METHOD, "n_bootstrap": n_bootstrap, "bundles": [],
    }
    for name in names:
        printer = _ProgressPrinter(f"{Path(str(name)).name} evaluate", quiet=True)
        try:
            entry = evaluate_bundle(name, datalist, output_dir / re.sub(r"[^\w.-]", "_", Path(str(name)).name),
                                    device, demo, n_bootstrap, models_root, on_progress=printer.progress,
                                    timeout_minutes=timeout_minutes)
        finally:
            printer.close()
        results["bundles"].append(entry)
        if entry["row"]["error"]:
            print(f"{entry['row']['bundle']}: {entry['row']['status']}: {entry['row']['error']}", file=sys.stderr)
    results["wall_seconds"] = round(time.perf_counter() - started, 1)
    if merge:
        results = _merged(results, output_dir)
    write_tables(results, output_dir)
    if report:
        from medanomaly.report import write_report

        results["report"] = str(write_report(results, output_dir))
        write_tables(results, output_dir)
    rows = [entry["row"] for entry in results["bundles"]]
    print(f"\nCohort {datalist} ({results['wall_seconds']:.0f} s)\n{format_table(rows)}\n"
          f"Results: {output_dir}/{RESULTS_JSON}, {RESULTS_CSV}, {GROUPS_CSV}"
          + (f"\nReport: {results['report']}" if report else ""))
    return results


def _merged(results: dict, output_dir: Path) -> dict:
    """`results` with the earlier results.json's entries of the bundles not run this time; its
    `wall_seconds` is then the sum of the evaluations in the table."""
    path = output_dir / RESULTS_JSON
    earlier = json.loads(path.read_text()) if path.is_file() else None
    if not earlier or earlier.get("datalist") != results["datalist"]:
        return results
    ran = {entry["row"]["bundle"] for entry in results["bundles"]}
    kept = [entry for entry in earlier["bundles"] if entry["row"]["bundle"] not in ran]
    bundles = kept + results["bundles"]
    return {**results, "bundles": bundles, "command": f"{earlier.get('command')}; {results['command']}",
            "wall_seconds": round(sum(entry["row"]["wall_seconds"] or 0.0 for entry in bundles), 1)}


def load_results(output_dir: Path) -> dict:
    path = Path(output_dir) / RESULTS_JSON
    if not path.is_file():
        raise SystemExit(f"error: no {RESULTS_JSON} in {output_dir}: run `medanomaly benchmark` first.")
    return json.loads(path.read_text())
