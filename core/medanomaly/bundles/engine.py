"""Shared inference plumbing of every bundle: volume -> axial slices -> batches -> method ->
slices -> volume on the input grid -> heatmap, segmentation, pseudo-healthy image.

A bundle's `inference.yaml` wires these pieces into a MONAI `SupervisedEvaluator`:
`preprocessing` (medanomaly.data) feeds `ProgressSliceInferer`, which runs the bundle's
`SliceAnomalyMethod` on batches of slices; `Invertd` brings the maps back to the input grid
and `SaveAnomalyOutputsd` writes them. `evaluate.yaml` adds `CohortMetricsHandler`,
`calibrate.yaml` adds `CalibrationHandler`.
"""

from __future__ import annotations

import csv
import functools
import glob
import logging
import os
import time
from pathlib import Path
from typing import Callable, Hashable, Mapping, Sequence

import numpy as np
import SimpleITK as sitk
import torch
from ignite.engine import Engine, Events
from monai.data import MetaTensor
from monai.inferers import SliceInferer
from monai.transforms import MapTransform

from medanomaly import io, scoring
from medanomaly.bundles.outputs import (SUMMARY_FILE, VOLUME_SUFFIXES, is_output_file, lock_output_dir,
                                         output_paths, subject_name, volume_name)
from medanomaly.bundles.progress import VolumeProgress
from medanomaly.bundles.model_info import MODEL_FILE, read_model_info, update_model_info
from medanomaly.data import IMAGE, LABEL, MASK, axial_axis, brain_mask_from_image, intensity_window
from medanomaly.data import datalist_items

logger = logging.getLogger(__name__)
PRED = "pred"


class SliceAnomalyMethod(torch.nn.Module):
    """A 2D anomaly detector as the shared inferer runs it.

    Input `(B, 2, H, W)`: normalised image ++ brain mask. Output `(B, 2, H, W)`: anomaly map ++
    pseudo-healthy image. Subclasses implement `anomaly_and_reconstruction`; smoothing and
    background zeroing are shared, and slices without brain are not computed at all.
    """

    def __init__(self, smoothing: str | None = None, smoothing_size: int = 5, smoothing_sigma: float = 1.0):
        super().__init__()
        self.smoothing, self.smoothing_size, self.smoothing_sigma = smoothing, smoothing_size, smoothing_sigma

    def anomaly_and_reconstruction(self, image: torch.Tensor, mask: torch.Tensor):
        raise NotImplementedError

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        inputs = inputs.as_tensor() if isinstance(inputs, MetaTensor) else inputs
        image, mask = inputs[:, :1], inputs[:, 1:2]
        output = torch.zeros_like(inputs)
        has_brain = mask.flatten(1).any(dim=1)
        if has_brain.any():
            anomaly, reconstruction = self.anomaly_and_reconstruction(image[has_brain], mask[has_brain])
            if self.smoothing:
                anomaly = scoring.smooth_map(anomaly, kind=self.smoothing, size=self.smoothing_size,
                                             sigma=self.smoothing_sigma)
            brain = mask[has_brain]
            output[has_brain] = torch.cat([scoring.zero_background(anomaly, brain), reconstruction * brain], dim=1)
        return output


def prepare_image_and_mask(batchdata: Mapping, device=None, non_blocking: bool = False, **kwargs):
    """Stacks image and brain mask as channels so the slice inferer cuts both together."""
    inputs = torch.cat([batchdata[IMAGE], batchdata[MASK]], dim=1)
    return inputs.to(device=device, non_blocking=non_blocking), None


class ProgressSliceInferer(SliceInferer):
    """MONAI's SliceInferer over axial slices, reporting each finished batch of slices
    to `reporter` (SlidingWindowInferer's own `progress` is its tqdm switch)."""

    def __init__(self, reporter: VolumeProgress | None = None, **kwargs):
        kwargs.setdefault("spatial_dim", 2)
        kwargs.setdefault("overlap", 0.0)
        super().__init__(**kwargs)
        self.reporter = reporter

    def __call__(self, inputs: torch.Tensor, network, *args, **kwargs):
        if self.reporter is None:
            return super().__call__(inputs, network, *args, **kwargs)
        total, done = inputs.shape[2 + self.spatial_dim], 0

        def counted(x, *a, **k):
            nonlocal done
            out = network(x, *a, **k)
            done = min(done + x.shape[0], total)
            self.reporter.update(done, total)
            return out

        return super().__call__(inputs, counted, *args, **kwargs)


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
        self.progress.start_volume(engine.state.iteration - 1, _subject_name(engine.state.batch, index=0))


def _subject_name(item: Mapping, index: int | None = None) -> str:
    """`outputs.subject_name` of a (batched, when `index` is given) dictionary item."""
    subject = item.get("subject")
    if index is not None and isinstance(subject, (list, tuple)):
        subject = subject[index]
    image = item[IMAGE]
    source = image.meta.get("filename_or_obj", "volume") if isinstance(image, MetaTensor) else "volume"
    if index is not None and isinstance(source, (list, tuple)):
        source = source[index]
    return subject_name(subject, source)


def _source_file(item: Mapping, key: str = IMAGE) -> str:
    source = item[key].meta["filename_or_obj"]
    return source[0] if isinstance(source, (list, tuple)) else source


def _to_numpy(tensor: torch.Tensor) -> np.ndarray:
    return tensor.detach().cpu().numpy() if isinstance(tensor, torch.Tensor) else np.asarray(tensor)


class SaveAnomalyOutputsd(MapTransform):
    """Writes the heatmap, the thresholded segmentation and the pseudo-healthy image of one
    inverted prediction on exactly the input file's grid, and records their paths."""

    def __init__(self, output_dir: str | None, threshold: float | None, extension: str = ".nii.gz",
                 pseudo_healthy: bool = True, enabled: bool = True):
        super().__init__(keys=[PRED])
        self.output_dir, self.threshold, self.extension = output_dir, threshold, extension
        self.pseudo_healthy, self.enabled = pseudo_healthy, enabled and output_dir is not None

    def __call__(self, data: Mapping[Hashable, object]) -> dict:
        d = dict(data)
        if not self.enabled:
            return d
        source, name = _source_file(d), _subject_name(d)
        brain = supplied_brain_mask(d)

        @functools.cache
        def heatmap() -> np.ndarray:  # made once, after the pseudo-healthy image (one input-sized copy at a time)
            values = scored_heatmap(d)
            values *= brain
            return values

        writers = {}
        if self.pseudo_healthy:
            writers["pseudo_healthy"] = lambda path: io.write_volume(self._scanner_intensities(d, brain), source, path)
        writers["heatmap"] = lambda path: io.write_heatmap(heatmap(), source, path)
        if self.threshold is not None:
            writers["segmentation"] = lambda path: io.write_segmentation(heatmap() > self.threshold, source, path)
        paths = output_paths(self.output_dir, name, self.extension)
        written = write_together({kind: paths[kind] for kind in writers}, writers)
        d["outputs"] = {"subject": name, "input": str(source), "threshold": self.threshold,
                        "volume_score": float(heatmap()[brain].mean()) if brain.any() else 0.0, **written}
        return d

    @staticmethod
    def _scanner_intensities(d: Mapping, brain: np.ndarray) -> np.ndarray:
        """The pseudo-healthy image in the input's intensities (the normalisation undone), 0 outside the brain."""
        reconstruction = _to_numpy(d[PRED][1]).astype(np.float32)  # a copy, changed in place below
        window = intensity_window(d[IMAGE])
        if window is not None:
            reconstruction *= window[1] - window[0]
            reconstruction += window[0]
        reconstruction *= brain
        return reconstruction


def write_together(paths: Mapping[str, Path], writers: Mapping[str, Callable[[Path], object]]) -> dict[str, str]:
    """Writes a set of outputs all or nothing: each to a hidden partial file first, then all renamed
    into place, so a failure (full disk) never leaves a new heatmap beside an old segmentation."""
    partial = {kind: path.parent / f".{path.name}.partial{''.join(path.suffixes[-2:])}" for kind, path in paths.items()}
    try:
        for kind, writer in writers.items():
            writer(partial[kind])
        for kind, path in paths.items():
            os.replace(partial[kind], path)
    finally:
        for path in partial.values():
            path.unlink(missing_ok=True)
    return {kind: str(path) for kind, path in paths.items()}


class OutputSummaryHandler:
    """Writes `detections.json`: one record per input with its output files and score."""

    def __init__(self, output_dir: str | None):
        self.output_dir, self.records = output_dir, []

    def attach(self, engine: Engine) -> None:
        if self.output_dir is not None:
            lock_output_dir(self.output_dir)  # one run at a time writes into a folder
        engine.add_event_handler(Events.ITERATION_COMPLETED, self._collect)
        engine.add_event_handler(Events.COMPLETED, self._write)

    def _collect(self, engine: Engine) -> None:
        self.records += [item["outputs"] for item in engine.state.output if "outputs" in item]

    def _write(self, engine: Engine) -> None:
        if self.output_dir is None or not self.records:
            return
        io.write_json(Path(self.output_dir) / SUMMARY_FILE, self.records, indent=2)
        logger.info("Wrote %d detection(s) to %s", len(self.records), self.output_dir)


def _input_grid_mask(path, image_file, what: str) -> np.ndarray:
    """A binary volume file (> 0.5) that must lie on the input image's grid (`io.check_same_grid`)."""
    io.check_same_grid(image_file, path, what=what)
    return io.volume_array(io.read_volume(path, allow_constant=True)) > 0.5


def _label_array(item: Mapping, shape: tuple) -> np.ndarray:
    """Ground-truth lesion mask on the input grid; all zeros for a healthy subject."""
    label = item.get(LABEL)
    return np.zeros(shape, dtype=bool) if label is None else _input_grid_mask(label, _source_file(item), "The label")


def scored_heatmap(item: Mapping) -> np.ndarray:
    """The inverted anomaly map on the input grid; voxels the method did not score (NaN or
    infinite) are 0, as are those outside its crop (the inverse transforms pad with 0)."""
    heatmap = _to_numpy(item[PRED][0]).astype(np.float32)  # a copy: the prediction stays as it is
    heatmap[~np.isfinite(heatmap)] = 0.0
    return heatmap


def supplied_brain_mask(item: Mapping) -> np.ndarray:
    """The brain mask every method is scored on, on the input grid: the mask file the item
    supplies, else the image's foreground as `BrainMaskd` derives it (which then stores the
    image as the mask's source). Never the mask after its round trip through a method's model
    grid (`Invertd`), which loses edge voxels differently for each pixdim and crop."""
    image_file = _source_file(item)
    mask_file = _source_file(item, MASK) if isinstance(item.get(MASK), MetaTensor) else image_file
    if mask_file != image_file:
        return _input_grid_mask(mask_file, image_file, "The brain mask")
    # the mask of the (Z, Y, X) voxels as SimpleITK holds them, then transposed: no copy of the image
    # (the view lives only as long as `image`, which is why it is a variable)
    image = io.read_volume(image_file)
    return brain_mask_from_image(sitk.GetArrayViewFromImage(image)).transpose(2, 1, 0)


def collect_volume(evaluator, item: Mapping) -> None:
    """Adds one inverted prediction to a `medanomaly.metrics.CohortEvaluator`: its heatmap
    (`scored_heatmap`) on the supplied brain mask and label on the input grid, so every method
    is scored on the same voxels, with the lesion volume in ml for the size breakdown."""
    heatmap = scored_heatmap(item)
    label = _label_array(item, heatmap.shape)
    voxel_ml = abs(float(np.linalg.det(np.asarray(item[PRED].affine, dtype=np.float64)[:3, :3]))) / 1000.0
    evaluator.add_volume(
        _subject_name(item), heatmap, label, supplied_brain_mask(item),
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
    subclasses decide what to write when the run completes."""

    def __init__(self, evaluator):
        self.evaluator = evaluator

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.STARTED, self._start)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self._collect)
        engine.add_event_handler(Events.COMPLETED, self._write)

    def _start(self, engine: Engine) -> None:
        self.started = time.perf_counter()

    def _collect(self, engine: Engine) -> None:
        for item in processed_items(engine):
            collect_volume(self.evaluator, item)

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
        lock_output_dir(self.output_dir)
        super().attach(engine)

    def _write(self, engine: Engine) -> None:
        from medanomaly.metrics import plot_curves

        if not self.evaluator.records:
            raise ValueError("No volume was evaluated: metrics.json is not written.")
        seconds = time.perf_counter() - self.started  # loading, inference, inversion, writing
        self.output_dir.mkdir(parents=True, exist_ok=True)
        summary = self.evaluator.summary(threshold=self.threshold, n_boot=self.n_boot)
        summary["timing"] = {"seconds": round(seconds, 2), "device": str(engine.state.device),
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


def latest_checkpoint(model_dir: str | os.PathLike) -> str | None:
    """The checkpoint to resume from: the final one, else the newest periodic one."""
    model_dir = Path(model_dir)
    if (model_dir / "checkpoint.pt").is_file():
        return str(model_dir / "checkpoint.pt")
    periodic = sorted(model_dir.glob("checkpoint_epoch=*.pt"), key=lambda p: int(p.stem.split("=")[1]))
    return str(periodic[-1]) if periodic else None


def load_weights(network: torch.nn.Module, model_dir: str | os.PathLike, device=None,
                 filename: str = MODEL_FILE) -> torch.nn.Module:
    """Loads `model_dir/filename` (default `model.pt`) into the network, with errors that say what to do."""
    path = Path(model_dir) / filename
    if not path.is_file():
        raise FileNotFoundError(f"No weights at {path}: train the bundle first (medanomaly train ...), "
                                "or pass --model_dir pointing to a folder with model.pt.")
    state = torch.load(path, map_location="cpu", weights_only=True)
    state = state.get("model", state) if isinstance(state, dict) else state
    try:
        network.load_state_dict(state)
    except RuntimeError as error:
        raise RuntimeError(f"The weights in {path} do not fit this network configuration (weights trained "
                           f"with the demo overlay need configs/demo.yaml too): {error}") from error
    return network.to(device) if device is not None else network


def _is_input_volume(path: Path) -> bool:
    """A volume file, not hidden (e.g. a temporary file) and not an earlier run's output beside the scans."""
    return path.is_file() and path.name.lower().endswith(VOLUME_SUFFIXES) and not is_output_file(path)


def _volume_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if _is_input_volume(p))


def _is_dicom_folder(folder: Path) -> bool:
    return any(p.suffix.lower() == ".dcm" for p in folder.iterdir()) and not _volume_files(folder)


def resolve_inputs(input: str | Sequence[str] | None = None, datalist: str | None = None,
                   keys: str | Sequence[str] = "test_lesion", mask: str | None = None,
                   contrast: str | None = None, input_contrast: str | None = None) -> list[dict]:
    """Items `{"image", "mask"?, "label"?, "subject"?, "contrast"?}` to run on.

    `input`: a volume file, a DICOM series folder, a folder or glob of volumes, or a list of
    them (`input_contrast`, if given, is their contrast). Without `input`, the `keys` of
    `datalist` (a Decathlon-style JSON file, or the name of a synthetic cohort preset, generated
    on first use, in `contrast`); a datalist's top-level "contrast" is copied into its entries.
    """
    if input:
        files = _expand_inputs(input)
        items = [{IMAGE: str(p), "subject": name, **({"contrast": input_contrast} if input_contrast else {})}
                 for p, name in zip(files, unique_output_names(files))]
        for item in items:  # every file checked, voxels too, before any model is loaded
            io.check_input_volume(item[IMAGE])
            io.read_volume(item[IMAGE])
        if mask:
            if len(items) != 1:
                raise ValueError("A brain mask can only be given with a single input volume.")
            io.check_same_grid(items[0][IMAGE], mask, what="The brain mask")
            items[0][MASK] = str(mask)
        return items
    if not datalist:
        raise ValueError("Nothing to run on: give an input volume (--input) or a datalist (--datalist).")
    return datalist_items(datalist, keys, contrast)


def unique_output_names(files: Sequence[Path]) -> list[str]:
    """Output names of input files, one per file: the file's name without its suffix; files of the
    same name get as many parent folders as it takes to tell them apart
    (`a/scan.nii.gz`, `b/scan.nii.gz`, `b/t2.nii` -> `a_scan`, `b_scan`, `t2`)."""
    paths = [Path(f).resolve() for f in files]
    if len(set(paths)) != len(paths):
        twice = next(p for p in paths if paths.count(p) > 1)
        raise ValueError(f"The input {twice} is given twice.")
    depths = [0] * len(paths)
    names = [volume_name(p) for p in paths]
    while len(set(names)) != len(names):
        for i, name in enumerate(names):
            if names.count(name) > 1:
                depths[i] += 1
        names = [_name_with_parents(p, d) for p, d in zip(paths, depths)]
    return names


def _name_with_parents(path: Path, depth: int) -> str:
    parents = [part.strip("/\\:") for part in path.parent.parts[len(path.parent.parts) - depth:]] if depth else []
    return "_".join([*filter(None, parents), volume_name(path)])


def _expand_inputs(input: str | Sequence[str]) -> list[Path]:
    paths: list[Path] = []
    for entry in [input] if isinstance(input, (str, os.PathLike)) else input:
        entry = Path(entry)
        if entry.is_dir():
            paths += [entry] if _is_dicom_folder(entry) else _volume_files(entry)
        elif entry.exists():
            paths.append(entry)
        else:
            matches = [Path(m) for m in sorted(glob.glob(str(entry))) if _is_input_volume(Path(m))]
            if not matches:
                raise FileNotFoundError(f"Input {entry} does not exist.")
            paths += matches
    if not paths:
        raise FileNotFoundError(f"No volume files found in {input}.")
    return paths
