"""`medanomaly benchmark`: every bundle's evaluate workflow on one cohort, per contrast, one table, one report.

Each bundle runs in its own process (exactly as `python -m monai.bundle run` would), so one
method's memory or CUDA state never leaks into the next, and one that fails (or has no
weights) is reported in the table with the root cause of its failure instead of stopping the
others. The numbers come from each run's `metrics.json`, `per_volume.json` and
`histograms.npz` (written by `medanomaly.bundles.handlers.CohortMetricsHandler`); the cost
columns from the run (wall time, peak memory) and the weights' `model_info.json` (training time).

Each contrast (T1w, T2w, FLAIR) is a run of its own: every bundle's evaluate workflow gets the
cohort's datalist of that contrast and the override `contrast=<C>`. Two bundles are references,
named by their metadata.json `medanomaly_role`: the `floor` (a non-learned rule) and the
`ceiling` (a supervised network trained with the lesion labels, not an anomaly detector); each
row's "gap closed" is `(metric - floor) / (ceiling - floor)` within its contrast.

Output folder: `results.json` (everything, per contrast, per volume and per lesion family /
size group), `results.csv` (one row per contrast and bundle), `results_by_group.csv`,
`report.html` + `figures/` (see `medanomaly.report`), and one evaluation folder per contrast
and bundle (`<contrast>/<bundle>/`).
"""

from __future__ import annotations

import contextlib
import csv
import datetime
import json
import os
import platform
import re
import resource
import signal
import sys
import threading
import time
from pathlib import Path

from medanomaly.bundles import BundleRunError, ConfigText, find_bundle, list_bundles, start_bundle
from medanomaly.bundles.model_info import MODEL_FILE, has_weights, read_model_info
from medanomaly.bundles.registry import BundleInfo, BundleNotFound
from medanomaly.console import CommandError
from medanomaly.data import PRESETS, resolve_datalist
from medanomaly.data.contrast import CONTRASTS, DEFAULT_CONTRAST, check_contrast, check_contrasts
from medanomaly.results import ROLES

OK, NO_WEIGHTS, NO_EVALUATE, FAILED = "ok", "no weights", "no evaluate config", "failed"
RESULTS_JSON, RESULTS_CSV, GROUPS_CSV = "results.json", "results.csv", "results_by_group.csv"
CI_METHOD = "95 % percentile bootstrap over volumes (seed 0)"
#: metadata.json `medanomaly_role` of the reference bundles, and how the tables label them.
GAP_METRICS = ("pixel_ap", "pooled_dice")

COLUMNS = [
    "contrast", "bundle", "role", "status", "variant",
    "volume_auroc", "volume_auroc_ci_low", "volume_auroc_ci_high", "volume_ap", "slice_auroc", "slice_ap",
    "pixel_ap", "pixel_ap_ci_low", "pixel_ap_ci_high", "pixel_auroc",
    "pooled_dice", "pooled_dice_ci_low", "pooled_dice_ci_high", *(f"{m}_gap_closed" for m in GAP_METRICS),
    "dice_per_volume", "dice_per_volume_std", "dice_per_volume_ci_low", "dice_per_volume_ci_high",
    "threshold", "dice_at_threshold", "healthy_fpr",
    "train_seconds", "seconds_per_volume", "peak_rss_mb", "cuda_max_allocated_mb", "wall_seconds", "device",
    "error",
]
GROUP_COLUMNS = ["contrast", "bundle", "kind", "group", "n_lesion_volumes", "pixel_ap", "pixel_auroc", "max_dice",
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
    row["volume_auroc_ci_low"], row["volume_auroc_ci_high"] = _ci(metrics["volume"], "auroc_ci")
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
                             **{c: values.get(c) for c in GROUP_COLUMNS[4:]}})
    return rows


def gap_closed(value: float | None, floor: float | None, ceiling: float | None) -> float | None:
    """How much of the floor-to-ceiling gap a metric closes: (value - floor) / (ceiling - floor);
    None when any of them is missing or the ceiling is not above the floor (no gap to measure
    against: a ceiling that does not beat the floor is not yet a ceiling)."""
    if value is None or floor is None or ceiling is None or ceiling - floor <= 1e-12:
        return None
    return (value - floor) / (ceiling - floor)


def add_gap_closed(rows: list[dict]) -> None:
    """Fills each row's `<metric>_gap_closed` against the first successful floor and ceiling rows
    (the rows of ONE contrast)."""
    references = [next((r for r in rows if r.get("role") == role and r["status"] == OK), {}) for role in ROLES]
    for row in rows:
        for metric in GAP_METRICS:
            row[f"{metric}_gap_closed"] = gap_closed(row.get(metric), *(ref.get(metric) for ref in references))


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
            if has_weights(candidate):
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
                    timeout_minutes: float | None, nproc: int | None = None) -> None:
    """The evaluate workflow in its own process (in `nproc` under torchrun), its log into `log_file`; stopped (and
    reported as such) when it runs past `timeout_minutes`. Whatever ends this call early (an
    exception, Ctrl-C, SIGTERM / SIGHUP through `stop_on_signals`) ends the bundle's process tree."""
    with open(log_file, "w") as log:
        process = start_bundle(bundle, "evaluate", overrides, demo, nproc=nproc)
        timer = threading.Timer(60 * timeout_minutes, process.cancel) if timeout_minutes else None
        try:
            if timer is not None:
                timer.start()
            process.wait(on_line=lambda line: print(line, file=log, flush=True), on_progress=on_progress)
        except BaseException:
            process.cancel()
            raise
        finally:
            if timer is not None:
                timer.cancel()
    if process.cancelled:
        raise TimeoutError(f"stopped after {timeout_minutes:g} min (--timeout-minutes)")


_VARIANT = re.compile(r"^(?P<name>[^\[\]]+)\[(?P<settings>[^\[\]]*)\]$")


def parse_variant(spec: str) -> tuple[str, dict]:
    """`"phanes[mode=ra]"` -> ("phanes", {"mode": "ra"}): a bundle and config overrides that make
    one row of its own (a switch of the method, e.g. a paper's ablation). Values are JSON when they
    parse as JSON (numbers, true / false), else strings; a list is written in parentheses,
    `map_range=(0, 0.05)`. A plain name has no overrides."""
    match = _VARIANT.match(str(spec))
    if not match:
        if "[" in str(spec) or "]" in str(spec):
            raise ValueError(f"Bundle variant {spec!r}: write it as name[key=value,key=value].")
        return str(spec), {}
    overrides = {}
    for setting in filter(None, (s.strip() for s in re.split(r",(?![^(]*\))", match["settings"]))):
        key, sep, value = setting.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"Bundle variant {spec!r}: {setting!r} is not key=value.")
        value = value.strip()
        if value.startswith("(") and value.endswith(")"):
            value = f"[{value[1:-1]}]"
        try:
            overrides[key.strip()] = json.loads(value)
        except json.JSONDecodeError:
            overrides[key.strip()] = ConfigText(value)  # as `--set` reads it
    return match["name"].strip(), overrides


def evaluate_bundle(name: str, datalist: Path, run_dir: Path, device: str | None = None, demo: bool | None = None,
                    n_bootstrap: int = 200, models_root: Path | None = None, on_progress=None,
                    timeout_minutes: float | None = None, contrast: str | None = None,
                    nproc: int | None = None) -> dict:
    """Runs one bundle's evaluate workflow in its own process, or in `nproc` processes under
    torchrun (with the override `contrast` when given); returns its result entry (`row`,
    `groups`, `metrics`, `per_volume`), with the
    status and error when it could not run. Rows and groups carry the contrast and the bundle's
    role (metadata.json `medanomaly_role`). `name` may be a variant, `bundle[key=value,...]`
    (`parse_variant`): its row is labelled with the whole spec."""
    try:
        bundle_name, variant = parse_variant(name)
        bundle = find_bundle(bundle_name)
    except (BundleNotFound, ValueError) as error:
        entry = {"row": failed_row(str(name), FAILED, str(error).splitlines()[0])}
    else:
        entry = _evaluate(bundle, datalist, run_dir, device, demo, n_bootstrap, models_root, on_progress,
                          timeout_minutes, contrast, variant, nproc)
        entry["row"]["role"] = bundle.metadata.get("medanomaly_role")
        if variant:
            entry["row"]["bundle"] = str(name)
            for group in entry.get("groups", []):
                group["bundle"] = str(name)
    entry["row"]["contrast"] = contrast
    for group in entry.get("groups", []):
        group["contrast"] = contrast
    return entry


def _evaluate(bundle: BundleInfo, datalist: Path, run_dir: Path, device, demo, n_bootstrap, models_root, on_progress,
              timeout_minutes, contrast, variant: dict | None = None, nproc: int | None = None) -> dict:
    started = time.perf_counter()
    model_dir = _model_dir(bundle, models_root)
    model_info = read_model_info(model_dir)
    if not has_weights(model_dir):
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
    overrides = {"datalist": str(datalist), "output_dir": str(run_dir), "device": device, "n_bootstrap": n_bootstrap,
                 "contrast": contrast, **(variant or {})}
    if model_dir != bundle.model_dir:
        overrides["model_dir"] = str(model_dir)  # the runner picks the overlay those weights were trained with
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "metrics.json").unlink(missing_ok=True)  # never report an earlier run's numbers
    try:
        _run_evaluation(bundle, overrides, demo, run_dir / "benchmark.log", on_progress, timeout_minutes, nproc)
        metrics = json.loads((run_dir / "metrics.json").read_text())
        model_info = metrics.get("model_info", model_info)  # the weights the bundle evaluated (a variant's own)
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


def entries(results: dict) -> list[dict]:
    """Every bundle entry of every contrast, in run order."""
    return [entry for run in results["contrasts"].values() for entry in run["bundles"]]


def write_tables(results: dict, output_dir: Path) -> None:
    rows = [entry["row"] for entry in entries(results)]
    (output_dir / RESULTS_JSON).write_text(json.dumps(results, indent=1))
    for name, columns, table in ((RESULTS_CSV, COLUMNS, rows),
                                 (GROUPS_CSV, GROUP_COLUMNS, [g for entry in entries(results)
                                                              for g in entry.get("groups", [])])):
        with open(output_dir / name, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
            writer.writeheader()
            writer.writerows(table)


def cohort_datalists(cohort: str | Path, contrast: str | None = None) -> dict[str, Path]:
    """The datalist of each contrast to run, in the order of `CONTRASTS`. `contrast`: a
    contrast, several ("T1w,FLAIR") or "all"; default T1w for a synthetic preset, and for a
    datalist file its own top-level "contrast" (one datalist file is one contrast)."""
    try:
        if str(cohort) in PRESETS:
            return {c: resolve_datalist(str(cohort), c) for c in check_contrasts(contrast or DEFAULT_CONTRAST)}
        path = resolve_datalist(cohort)
        own = json.loads(path.read_text()).get("contrast")
        own = check_contrast(own) if own else None
        wanted = check_contrasts(contrast) if contrast else (own or DEFAULT_CONTRAST,)
    except (ValueError, FileNotFoundError) as error:
        raise CommandError(f"--cohort {cohort}{f' --contrast {contrast}' if contrast else ''}: {error}") from None
    if len(wanted) > 1 or (own and wanted != (own,)):
        raise CommandError(f"{path} is one datalist{f' of {own} scans' if own else ''}; --contrast "
                         f"{contrast} needs a synthetic preset ({', '.join(PRESETS)}) or one datalist per contrast.")
    return {wanted[0]: path}


@contextlib.contextmanager
def stop_on_signals(signals: tuple = (signal.SIGTERM, signal.SIGHUP)):
    """Turns SIGTERM and SIGHUP into SystemExit(128 + signal) in the main thread, so they end a
    running bundle's process tree as Ctrl-C does (`_run_evaluation` cancels it on any
    exception) instead of killing this process alone. Further signals are ignored while that
    clean-up runs; the previous handlers come back on exit. Elsewhere than in the main thread
    (signal handlers cannot be set there), it does nothing."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def stop(signum, frame):
        for sig in signals:
            signal.signal(sig, signal.SIG_IGN)
        print(f"\nStopped by {signal.Signals(signum).name}: ending the running bundle.", file=sys.stderr, flush=True)
        raise SystemExit(128 + signum)

    previous = {sig: signal.signal(sig, stop) for sig in signals}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _run_dir(output_dir: Path, contrast: str, name: str) -> Path:
    return output_dir / contrast / re.sub(r"[^\w.-]", "_", Path(str(name)).name)


def run_benchmark(bundles: list[str] | None = None, cohort: str = "demo", output_dir: Path = Path("outputs/benchmark"),
                  device: str | None = None, demo: bool | None = None, n_bootstrap: int = 200,
                  models_root: Path | None = None, report: bool = True, command: str | None = None,
                  timeout_minutes: float | None = None, merge: bool = False, contrast: str | None = None,
                  nproc: int | None = None) -> dict:
    """Evaluates `bundles` (default: every bundle found) on `cohort` in each contrast of
    `contrast` (see `cohort_datalists`), one contrast after the other, each bundle in one process or
    in `nproc` (torchrun, its multi_gpu_evaluate.yaml: the same metrics); writes the tables and the
    report into `output_dir` and returns the results (`results.json`'s content: per contrast, its
    datalist and bundle entries). `merge` keeps the output folder's earlier results of the other
    bundles and contrasts on the same cohort (e.g. to add a newly trained bundle without
    re-running the slow ones)."""
    from medanomaly.console import ProgressPrinter

    datalists = cohort_datalists(cohort, contrast)
    names = bundles or [b.name for b in list_bundles()]
    output_dir = Path(output_dir).resolve()
    output_dir.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    results = {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "command": command or f"run_benchmark(bundles={bundles!r}, cohort={str(cohort)!r}, contrast={contrast!r})",
        "cohort": str(cohort), "device": device or "auto", "processes": nproc or 1,
        "machine": f"{platform.system()} {platform.machine()}, {os.cpu_count()} CPU cores",
        "ci_method": CI_METHOD, "n_bootstrap": n_bootstrap,
        "contrasts": {c: {"datalist": str(path), "bundles": []} for c, path in datalists.items()},
    }
    with stop_on_signals():
        for c, datalist in datalists.items():
            for name in names:
                printer = ProgressPrinter(f"{Path(str(name)).name} evaluate ({c})", quiet=True)
                try:
                    entry = evaluate_bundle(name, datalist, _run_dir(output_dir, c, name), device, demo, n_bootstrap,
                                            models_root, on_progress=printer.progress,
                                            timeout_minutes=timeout_minutes, contrast=c, nproc=nproc)
                finally:
                    printer.close()
                results["contrasts"][c]["bundles"].append(entry)
                if entry["row"]["error"]:
                    print(f"{c} {entry['row']['bundle']}: {entry['row']['status']}: {entry['row']['error']}",
                          file=sys.stderr)
    results["wall_seconds"] = round(time.perf_counter() - started, 1)
    if merge:
        results = _merged(results, output_dir)
    finish(results)
    write_tables(results, output_dir)
    if report:
        from medanomaly.report import write_report

        results["report"] = str(write_report(results, output_dir))
        write_tables(results, output_dir)
    for c, run in results["contrasts"].items():
        print(f"\n{c}: cohort {run['datalist']}\n{format_table([entry['row'] for entry in run['bundles']])}")
    print(f"\n{results['wall_seconds']:.0f} s. Results: {output_dir}/{RESULTS_JSON}, {RESULTS_CSV}, {GROUPS_CSV}"
          + (f"\nReport: {results['report']}" if report else ""))
    return results


def finish(results: dict) -> dict:
    """The derived columns: each contrast's gap closed against its floor and ceiling."""
    for run in results["contrasts"].values():
        add_gap_closed([entry["row"] for entry in run["bundles"]])
    return results


def _merged(results: dict, output_dir: Path) -> dict:
    """`results` with the earlier results.json's entries of the bundles and contrasts not run
    this time (a contrast's entries when its datalist is the same, other contrasts when the
    cohort is); its `wall_seconds` is then the sum of the evaluations in the table."""
    path = output_dir / RESULTS_JSON
    earlier = upgraded(json.loads(path.read_text())) if path.is_file() else None
    if not earlier:
        return results
    contrasts, kept_any = {}, False
    for c in sorted({*earlier["contrasts"], *results["contrasts"]}, key=_contrast_rank):
        old, new = earlier["contrasts"].get(c), results["contrasts"].get(c)
        if new is None:
            if earlier.get("cohort") == results["cohort"]:
                contrasts[c], kept_any = old, True
            continue
        ran = {entry["row"]["bundle"] for entry in new["bundles"]}
        same_cohort = old and old["datalist"] == new["datalist"]
        kept = [e for e in old["bundles"] if e["row"]["bundle"] not in ran] if same_cohort else []
        contrasts[c] = {**new, "bundles": kept + new["bundles"]}
        kept_any = kept_any or bool(kept)
    if not kept_any:
        return results
    merged = {**results, "contrasts": contrasts, "command": f"{earlier.get('command')}; {results['command']}"}
    merged["wall_seconds"] = round(sum(entry["row"]["wall_seconds"] or 0.0 for entry in entries(merged)), 1)
    return merged


def _contrast_rank(contrast: str) -> tuple:
    return (CONTRASTS.index(contrast), "") if contrast in CONTRASTS else (len(CONTRASTS), contrast)


def upgraded(results: dict) -> dict:
    """Results written before the benchmark ran per contrast (one `datalist` and `bundles` at the
    top level) as one T1w run, the only contrast there was."""
    if "contrasts" in results:
        return results
    old = dict(results)
    run = {"datalist": old.pop("datalist", None), "bundles": old.pop("bundles", [])}
    for entry in run["bundles"]:
        entry["row"].setdefault("contrast", DEFAULT_CONTRAST)
    return {**old, "contrasts": {DEFAULT_CONTRAST: run}}


def load_results(output_dir: Path) -> dict:
    path = Path(output_dir) / RESULTS_JSON
    if not path.is_file():
        raise CommandError(f"no {RESULTS_JSON} in {output_dir}: run `medanomaly benchmark` first.")
    return finish(upgraded(json.loads(path.read_text())))
