"""Ignite handlers the bundle configs attach to their workflows: progress (inference and
training), the `detections.json` summary, cohort metrics (evaluate.yaml), the calibrated
threshold (calibrate.yaml) and the record of what training made (train.yaml), the last two in
`model_info.json`; and, for training under torchrun (multi_gpu_train.yaml), the end of training
agreed by every rank.
"""

from __future__ import annotations

import csv
import logging
import time
from pathlib import Path
from typing import Mapping

import ignite.distributed as idist
import numpy as np
import torch
from ignite.engine import Engine, Events

from medanomaly import io
from medanomaly.bundles.distributed import gather_in_order, is_main_process, world_size
from medanomaly.bundles.model_info import read_model_info, update_model_info
from medanomaly.bundles.outputs import SUMMARY_FILE, lock_output_dir
from medanomaly.bundles.predictions import PRED, item_subject_name, label_array, scored_heatmap, supplied_brain_mask
from medanomaly.bundles.progress import VolumeProgress, report_progress
from medanomaly.data import axial_axis

logger = logging.getLogger(__name__)


def processed_items(engine: Engine) -> list[dict]:
    """Each volume of the last iteration after postprocessing. MONAI splits postprocessed
    keys between `state.batch` (the input's keys: label path, inverted mask) and
    `state.output` (pred and new keys, plus `image`/`label` as the network saw them, which
    the input's own values must win over)."""
    return [{**output, **item} for item, output in zip(engine.state.batch, engine.state.output)]


class ProgressHandler:
    """Tells the progress reporter which volume the evaluator starts."""

    def __init__(self, progress: VolumeProgress):
        self.progress = progress

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.ITERATION_STARTED, self._start_volume)

    def _start_volume(self, engine: Engine) -> None:
        self.progress.start_volume(engine.state.iteration - 1, item_subject_name(engine.state.batch, index=0))


class OutputSummaryHandler:
    """Writes `detections.json`: one record per input with its output files and score. Under
    torchrun (multi_gpu_evaluate.yaml) rank 0 writes every rank's records, in the datalist's order."""

    def __init__(self, output_dir: str | None):
        self.output_dir, self.records = output_dir, []

    def attach(self, engine: Engine) -> None:
        if self.output_dir is not None and is_main_process():
            lock_output_dir(self.output_dir)  # one run at a time writes into a folder
        engine.add_event_handler(Events.ITERATION_COMPLETED, self._collect)
        engine.add_event_handler(Events.COMPLETED, self._write)

    def _collect(self, engine: Engine) -> None:
        self.records += [item["outputs"] for item in engine.state.output if "outputs" in item]

    def _write(self, engine: Engine) -> None:
        self.records = gather_in_order(self.records)
        if self.output_dir is None or not self.records or not is_main_process():
            return
        io.write_json(Path(self.output_dir) / SUMMARY_FILE, self.records, indent=2)
        logger.info("Wrote %d detection(s) to %s", len(self.records), self.output_dir)


def collect_volume(evaluator, item: Mapping) -> None:
    """Adds one inverted prediction to a `medanomaly.metrics.CohortEvaluator`: its heatmap
    (`scored_heatmap`) on the supplied brain mask and label on the input grid, so every method
    is scored on the same voxels, with the lesion volume in ml for the size breakdown."""
    heatmap = scored_heatmap(item)
    label = label_array(item, heatmap.shape)
    voxel_ml = abs(float(np.linalg.det(np.asarray(item[PRED].affine, dtype=np.float64)[:3, :3]))) / 1000.0
    evaluator.add_volume(
        item_subject_name(item), heatmap, label, supplied_brain_mask(item),
        axis=axial_axis(item[PRED].affine), family=item.get("family"),
        meta={"lesion_ml": round(int(label.sum()) * voxel_ml, 4)},
    )


def peak_memory() -> dict:
    """This process's peak resident memory and, on CUDA, the peak memory torch allocated (MB)."""
    import resource
    import sys

    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    peak = {"peak_rss_mb": round(rss / (2**20 if sys.platform == "darwin" else 2**10), 1)}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        peak["cuda_max_allocated_mb"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
    return peak


class CohortHandler:
    """Accumulates every inverted prediction into a `medanomaly.metrics.CohortEvaluator`;
    subclasses decide what to write when the run completes. Under torchrun (multi_gpu_evaluate.yaml)
    each rank collects its shard of the volumes; at the end rank 0 holds every rank's records in the
    datalist's order (the records carry the score histograms), and writes alone."""

    def __init__(self, evaluator):
        self.evaluator = evaluator

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.STARTED, self._start)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self._collect)
        engine.add_event_handler(Events.COMPLETED, self._complete)

    def _start(self, engine: Engine) -> None:
        self.started = time.perf_counter()

    def _collect(self, engine: Engine) -> None:
        for item in processed_items(engine):
            collect_volume(self.evaluator, item)

    def _complete(self, engine: Engine) -> None:
        self.evaluator.records = gather_in_order(self.evaluator.records)
        if is_main_process():
            self._write(engine)

    def _write(self, engine: Engine) -> None:
        raise NotImplementedError


class CohortMetricsHandler(CohortHandler):
    """Evaluation: writes `metrics.json` (with timing and peak memory), `per_volume.csv` /
    `per_volume.json` (with slice scores), `histograms.npz` (every volume's score histogram,
    to redraw curves later: `CohortEvaluator.load`) and ROC / PR / Dice-vs-threshold plots."""

    def __init__(self, evaluator, output_dir: str, threshold: float | None = None, n_boot: int = 1000,
                 title: str = "", model_dir: str | None = None):
        super().__init__(evaluator)
        self.output_dir, self.threshold, self.n_boot, self.title = Path(output_dir), threshold, n_boot, title
        self.model_dir = model_dir

    def attach(self, engine: Engine) -> None:
        if is_main_process():
            lock_output_dir(self.output_dir)
        super().attach(engine)

    def _write(self, engine: Engine) -> None:
        from medanomaly.metrics import plot_curves

        if not self.evaluator.records:
            raise ValueError("No volume was evaluated: metrics.json is not written.")
        seconds = time.perf_counter() - self.started  # loading, inference, inversion, writing
        self.output_dir.mkdir(parents=True, exist_ok=True)
        summary = self.evaluator.summary(threshold=self.threshold, n_boot=self.n_boot)
        # rank 0's clock and memory; with N processes, seconds_per_volume is the cohort's throughput
        summary["timing"] = {"seconds": round(seconds, 2), "device": str(engine.state.device),
                             "processes": world_size(),
                             "seconds_per_volume": round(seconds / max(len(self.evaluator.records), 1), 3),
                             **peak_memory()}
        if self.model_dir is not None:  # the weights evaluated (a variant's own folder, e.g. models/brainomaly)
            summary["model_info"] = read_model_info(self.model_dir)
        io.write_json(self.output_dir / "metrics.json", summary, indent=2)
        rows = self.evaluator.per_volume()
        with open(self.output_dir / "per_volume.csv", "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
        for row, record in zip(rows, self.evaluator.records):
            row.update(slice_scores=record.slice_scores.tolist(), slice_labels=record.slice_labels.tolist())
        io.write_json(self.output_dir / "per_volume.json", rows)
        self.evaluator.save(self.output_dir / "histograms.npz")
        plot_curves(self.evaluator, self.output_dir, title=self.title)
        logger.info("Metrics written to %s", self.output_dir / "metrics.json")


class CalibrationHandler(CohortHandler):
    """Calibration: stores in the model's `model_info.json` the threshold that flags at most
    `target_fpr` of the healthy brain voxels seen, with `fields` that say what the threshold
    belongs to (e.g. the perceptual backbone the maps were scored with)."""

    def __init__(self, evaluator, model_dir: str, target_fpr: float = 0.01, fields: Mapping | None = None):
        super().__init__(evaluator)
        self.model_dir, self.target_fpr, self.fields = model_dir, target_fpr, dict(fields or {})

    def _write(self, engine: Engine) -> None:
        negatives = self.evaluator.pooled_histogram(self.evaluator.records)  # lesion voxels excluded inside
        threshold = float(negatives.threshold_at_fpr(self.target_fpr))
        n_volumes = len(self.evaluator.records)
        update_model_info(self.model_dir, threshold=threshold, target_fpr=self.target_fpr,
                          calibration_volumes=n_volumes, **self.fields)
        logger.info("Threshold %.5f flags at most %.2f%% of healthy brain voxels (%d volumes).",
                    threshold, 100 * self.target_fpr, n_volumes)


class ModelInfoHandler:
    """Training: records what the weights are (variant, data, iterations, seconds, final loss)
    in `model_info.json`, so inference knows which config the weights belong to."""

    def __init__(self, model_dir: str, fields: Mapping | None = None):
        self.model_dir, self.fields = model_dir, dict(fields or {})

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.STARTED, self._start)
        engine.add_event_handler(Events.COMPLETED, self._write)

    def _start(self, engine: Engine) -> None:
        self.started = time.perf_counter()

    def _write(self, engine: Engine) -> None:
        output = engine.state.output
        loss = output[0]["loss"] if isinstance(output, list) and output else None
        update_model_info(self.model_dir, **self.fields,
                          train_seconds=round(time.perf_counter() - self.started, 1),
                          final_loss=None if loss is None else float(loss),
                          iterations_done=engine.state.iteration)


# --------------------------------------------------------------------------- training progress
def training_fraction(iteration: int, total: int, seconds: float = 0.0, max_seconds: float | None = None) -> float:
    """How far a training is: iterations done / planned, or, with a wall-clock budget that will end
    it first, seconds used / budget (the larger of the two); below 1 until it has finished."""
    fraction = iteration / max(total, 1)
    if max_seconds:
        fraction = max(fraction, seconds / max_seconds)
    return min(fraction, 0.999)


class TrainingProgress:
    """Reports `iteration i/n` of an ignite trainer at most every `every_seconds` (and once at the
    start and the end). `max_seconds`: the run's wall-clock budget (`max_train_seconds`), if any."""

    def __init__(self, max_seconds: float | None = None, every_seconds: float = 5.0, label: str = "training",
                 report=report_progress):
        self.max_seconds, self.every_seconds, self.label, self.report = max_seconds, every_seconds, label, report
        self.started = self.last = 0.0

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.STARTED, self.start)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self.iteration_completed)
        engine.add_event_handler(Events.COMPLETED, self.completed)

    def start(self, engine: Engine) -> None:
        self.started = time.monotonic()
        self.last = -float("inf")
        self.iteration_completed(engine)

    def iteration_completed(self, engine: Engine) -> None:
        now = time.monotonic()
        if now - self.last < self.every_seconds:
            return
        self.last = now
        state = engine.state
        total = (state.max_epochs or 1) * (state.epoch_length or 1)
        fraction = training_fraction(state.iteration, total, now - self.started, self.max_seconds)
        self.report(fraction, f"{self.label}: iteration {state.iteration}/{total}")

    def completed(self, engine: Engine) -> None:
        self.report(1.0, f"{self.label}: done after {engine.state.iteration} iterations")


# --------------------------------------------------------------------------- distributed training
class DistributedTermination:
    """Training under torchrun: every rank stops at the same iteration. A rank's trainer may be told
    to stop on its own (ignite's `TimeLimit` measures each process's clock; an early stop decided
    from a validation); the others would then wait forever in DDP's next gradient all-reduce. After
    each iteration and each epoch, the ranks all-reduce (ignite.distributed) whether any of them
    stops, and all stop. Attach it after every handler that may end the training (in `run`, after
    the `TimeLimit`), so that it sees their decision; one scalar all-reduce per iteration."""

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.ITERATION_COMPLETED, self.agree)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self.agree)

    @staticmethod
    def agree(engine: Engine) -> None:
        if idist.get_world_size() < 2:
            return
        if idist.all_reduce(float(engine.should_terminate), op="MAX") > 0 and not engine.should_terminate:
            logger.info("Another rank ends the training: this one stops at iteration %d too.",
                        engine.state.iteration)
            engine.terminate()
