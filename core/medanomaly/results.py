"""The benchmark's results as the tables and the report read them: the floor and ceiling roles,
method labels, display order, and one contrast's view of a multi-contrast run."""

from __future__ import annotations

ROLES = {"floor": "floor (non-learned)", "ceiling": "ceiling (supervised, not anomaly detection)"}


def method_label(row: dict) -> str:
    """`bundle`, or `bundle: <role label>` for the floor and the ceiling."""
    role = row.get("role")
    return row["bundle"] + (f": {ROLES.get(role, role)}" if role else "")


def display_order(rows: list[dict]) -> list[dict]:
    """The floor first, the anomaly-detection methods, the ceiling last."""
    rank = {"floor": 0, "ceiling": 2}
    return sorted(rows, key=lambda r: rank.get(r.get("role"), 1))


def contrast_view(results: dict, contrast: str) -> dict:
    """The results of one contrast shaped as one run: `results` with that contrast's
    `contrast`, `datalist` and `bundles` at the top level (what the report draws)."""
    run = results["contrasts"][contrast]
    return {**{k: v for k, v in results.items() if k != "contrasts"}, "contrast": contrast, **run}
