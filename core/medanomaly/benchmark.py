"""`medanomaly benchmark`: every bundle's evaluate workflow on one cohort, one table.

Each bundle runs in its own process (as `python -m monai.bundle run` would), so one method's
memory or CUDA state never leaks into the next; the numbers come from each run's metrics.json.
"""

from __future__ import annotations

import csv
import json
import time
from pathlib import Path

from medanomaly.bundles import find_bundle, list_bundles
from medanomaly.data import PRESETS, ensure_cohort

COLUMNS = ["bundle", "pooled_dice", "pixel_ap", "pixel_auroc", "volume_auroc", "volume_ap", "dice_per_volume",
           "dice_at_threshold", "healthy_fpr", "seconds_per_volume", "wall_seconds", "device"]


def summary_row(bundle: str, metrics: dict, wall_seconds: float) -> dict:
    """The benchmark's columns from one metrics.json."""
    at = metrics.get("at_threshold") or {}
    timing = metrics.get("timing", {})
    return {
        "bundle": bundle,
        "pooled_dice": metrics["pixel"]["max_dice"]["dice"],
        "pixel_ap": metrics["pixel"]["ap"],
        "pixel_auroc": metrics["pixel"]["auroc"],
        "volume_auroc": metrics["volume"].get("auroc"),
        "volume_ap": metrics["volume"].get("ap"),
        "dice_per_volume": metrics["max_dice_per_volume"]["mean"],
        "dice_at_threshold": at.get("dice"),
        "healthy_fpr": at.get("fpr_healthy"),
        "seconds_per_volume": timing.get("seconds_per_volume"),
        "wall_seconds": round(wall_seconds, 1),
        "device": timing.get("device"),
    }


def format_table(rows: list[dict]) -> str:
    def cell(value) -> str:
        return "n/a" if value is None else f"{value:.3f}" if isinstance(value, float) else str(value)

    widths = {c: max(len(c), *(len(cell(r[c])) for r in rows)) for c in COLUMNS}
    lines = ["  ".join(c.ljust(widths[c]) for c in COLUMNS)]
    lines += ["  ".join(cell(r[c]).ljust(widths[c]) for c in COLUMNS) for r in rows]
    return "\n".join(lines)


def run_benchmark(bundles: list[str] | None = None, cohort: str = "demo", output_dir: Path = Path("outputs/benchmark"),
                  device: str | None = None, demo: bool = True, n_bootstrap: int = 200) -> list[dict]:
    from medanomaly.cli import run_workflow

    datalist = ensure_cohort(cohort) if cohort in PRESETS else Path(cohort)
    names = bundles or [b.name for b in list_bundles() if b.has_weights]
    output_dir = Path(output_dir).resolve()
    rows = []
    for name in names:
        find_bundle(name)
        started = time.perf_counter()
        run_dir = output_dir / name
        run_workflow(name, "evaluate", {"datalist": str(datalist), "output_dir": str(run_dir), "device": device,
                                        "n_bootstrap": n_bootstrap}, demo=demo, quiet=True)
        metrics = json.loads((run_dir / "metrics.json").read_text())
        rows.append(summary_row(name, metrics, time.perf_counter() - started))
    output_dir.mkdir(parents=True, exist_ok=True)
    (output_dir / "results.json").write_text(json.dumps({"cohort": str(datalist), "rows": rows}, indent=2))
    with open(output_dir / "results.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    print(f"\nCohort {datalist}\n{format_table(rows)}\nResults: {output_dir}/results.json, results.csv")
    return rows
