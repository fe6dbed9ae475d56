"""What the command line shows while bundles run: progress bars, workflows run to their end
or to a clear error, headline metrics. Used by the `medanomaly` command, the demo and the
benchmark (the apps); nothing below them imports it."""

from __future__ import annotations

import time
from pathlib import Path

from medanomaly.bundles import BundleRunError, ConfigText, run_bundle


class CommandError(Exception):
    """A failure the command line reports as `error: <message>` with a non-zero exit, no traceback."""


def parse_overrides(pairs: list[str]) -> dict:
    """`key=value` pairs for the bundle config (values in MONAI's config language, as its command line reads them)."""
    overrides = {}
    for pair in pairs or []:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise ValueError(f"--set expects key=value, got '{pair}'")
        overrides[key] = ConfigText(value)
    return overrides


class ProgressPrinter:
    """Shows a bundle's progress lines as a tqdm bar and passes its log through."""

    def __init__(self, description: str, quiet: bool = False):
        from tqdm import tqdm

        self.bar = tqdm(total=1000, desc=description, unit="‰", leave=True, dynamic_ncols=True,
                        bar_format="{desc}: {percentage:3.0f}%|{bar}| {elapsed}<{remaining} {postfix}")
        self.quiet = quiet

    def line(self, text: str) -> None:
        if not self.quiet or "ERROR" in text or "Traceback" in text or "WARNING" in text:
            self.bar.write(text)

    def progress(self, fraction: float, message: str) -> None:
        self.bar.n = int(round(1000 * fraction))
        self.bar.set_postfix_str(message, refresh=True)

    def close(self) -> None:
        self.bar.close()


def run_workflow(bundle: str, workflow: str, overrides: dict, demo: bool | None, quiet: bool = False,
                 nproc: int | None = None) -> float:
    """Runs a workflow with a progress bar; returns the time it started (to tell its outputs
    from an earlier run's). A failure exits with its cause; the log's tail is added only when
    the log was not shown already (`quiet`); it raises `CommandError`. `nproc`: the workflow in
    that many processes under torchrun."""
    started = time.time()
    printer = ProgressPrinter(f"{bundle} {workflow}", quiet=quiet)
    try:
        run_bundle(bundle, workflow, overrides=overrides, demo=demo, on_line=printer.line,
                   on_progress=printer.progress, nproc=nproc)
    except BundleRunError as error:
        printer.close()
        raise CommandError(str(error) if quiet else error.headline) from None
    printer.progress(1.0, "done")
    printer.close()
    return started


def written_since(path: Path, started: float) -> bool:
    """True when `path` was written by the run that started at `started` (not left by an earlier one)."""
    return path.is_file() and path.stat().st_mtime >= started - 1.0  # file systems with 1 s timestamps


def format_metrics(name: str, metrics: dict) -> str:
    """A few headline numbers of a metrics.json, one line each."""
    def number(value):
        return "n/a" if value is None else f"{value:.3f}"

    pixel, volume = metrics["pixel"], metrics["volume"]
    max_dice, per_volume = pixel["max_dice"], metrics["max_dice_per_volume"]
    lines = [
        f"{name}: {metrics['n_lesion_volumes']} lesion + {metrics['n_healthy_volumes']} healthy volumes",
        f"  pooled [Dice]      {number(max_dice['dice'])} (threshold {number(max_dice['threshold'])})",
        f"  per-volume [Dice]  {number(per_volume['mean'])} ± {number(per_volume['std'])}",
        f"  pixel AP           {number(pixel['ap'])}   pixel AUROC {number(pixel['auroc'])}",
        f"  volume AUROC       {number(volume.get('auroc'))}   volume AP {number(volume.get('ap'))}",
    ]
    at = metrics.get("at_threshold")
    if at:
        lines.append(f"  at calibrated threshold {number(at['threshold'])}: Dice {number(at['dice'])}, "
                     f"precision {number(at['precision'])}, recall {number(at['recall'])}, "
                     f"healthy FPR {number(at['fpr_healthy'])}")
    return "\n".join(lines)
