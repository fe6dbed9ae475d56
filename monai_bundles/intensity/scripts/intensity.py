"""A non-learned floor: how far does the intensity of the normalised scan alone go?

Two documented rules, on the image the shared pipeline has already normalised to [0, 1] by its
brain's 0.5 / 99.5 percentiles:

- ``hyperintensity`` (T2w, FLAIR): the anomaly map is the normalised intensity inside the brain
  (Meissen et al., BrainLes 2021: thresholding the FLAIR intensity beats most unsupervised
  methods on BraTS).
- ``healthy_density`` (T1w, where lesions are dark or iso-intense): a histogram-based outlier
  score (HBOS, Goldstein and Dengel, KI 2012) against the healthy training cohort: each voxel
  scores the negative log of the healthy density of its intensity bin, rescaled to [0, 1].
  "Training" is only counting that histogram over healthy training volumes.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

import torch
from ignite.engine import Engine
from monai.data import MetaTensor
from monai.engines import Workflow

from medanomaly.bundles.handlers import ModelInfoHandler
from medanomaly.bundles.method import SliceAnomalyMethod
from medanomaly.bundles.model_info import update_model_info, weights_file
from medanomaly.data import IMAGE, MASK, check_contrast

logger = logging.getLogger(__name__)

RULES = ("hyperintensity", "healthy_density")
DEFAULT_RULES = {"T1w": "healthy_density", "T2w": "hyperintensity", "FLAIR": "hyperintensity"}


def default_rule(contrast: str) -> str:
    """The rule used for a contrast unless `rule` is set: T1w -> healthy_density, T2w / FLAIR -> hyperintensity."""
    return DEFAULT_RULES[check_contrast(contrast)]


def check_rule(rule: str) -> str:
    if rule not in RULES:
        raise ValueError(f"Unknown rule {rule!r}; choose one of {', '.join(RULES)}.")
    return rule


class HealthyIntensityDensity(torch.nn.Module):
    """Histogram of normalised brain intensities ([0, 1], `n_bins` equal bins) of healthy volumes,
    and the HBOS score of an intensity: -log p(bin), with one pseudo-count per bin so that an
    intensity never seen has a finite score, min-max rescaled over the bins to [0, 1]
    (0 = the most frequent healthy intensity, 1 = the rarest)."""

    def __init__(self, n_bins: int = 100, pseudo_count: float = 1.0):
        super().__init__()
        if n_bins < 2:
            raise ValueError(f"n_bins must be at least 2, got {n_bins}.")
        self.pseudo_count = pseudo_count
        self.register_buffer("counts", torch.zeros(n_bins, dtype=torch.float64))

    @property
    def n_bins(self) -> int:
        return self.counts.numel()

    def bin_index(self, values: torch.Tensor) -> torch.Tensor:
        return (values.float().clamp(0, 1) * self.n_bins).long().clamp(max=self.n_bins - 1)

    @torch.no_grad()
    def accumulate(self, image: torch.Tensor, mask: torch.Tensor) -> None:
        """Adds the brain voxels (mask > 0.5) of `image` to the histogram."""
        image, mask = (x.as_tensor() if isinstance(x, MetaTensor) else x for x in (image, mask))
        values = image[mask > 0.5]
        counts = torch.bincount(self.bin_index(values).flatten().cpu(), minlength=self.n_bins)
        self.counts += counts.to(self.counts)

    def score_table(self) -> torch.Tensor:
        """The rescaled score of each bin."""
        if self.counts.sum() <= 0:
            raise ValueError("The healthy intensity histogram is empty: train the bundle on healthy volumes first.")
        probability = (self.counts + self.pseudo_count) / (self.counts.sum() + self.pseudo_count * self.n_bins)
        nll = -torch.log(probability)
        span = nll.max() - nll.min()
        return ((nll - nll.min()) / span if span > 0 else torch.zeros_like(nll)).float()

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.score_table().to(image.device)[self.bin_index(image)]


def load_density(model_dir: str | os.PathLike, required: bool = True) -> HealthyIntensityDensity | None:
    """The healthy histogram in `model_dir/model.pt`, or None when it is absent and not `required`
    (the hyperintensity rule needs none)."""
    path = weights_file(model_dir)
    if not path.is_file():
        if required:
            raise FileNotFoundError(f"No healthy intensity histogram at {path}: run the bundle's train workflow "
                                    "(medanomaly train intensity --contrast ...), or pass --model_dir pointing to "
                                    "a folder with its model.pt.")
        return None
    state = torch.load(path, map_location="cpu", weights_only=True)
    density = HealthyIntensityDensity(n_bins=state["counts"].numel())
    density.load_state_dict(state)
    return density


class IntensityAnomalyMethod(SliceAnomalyMethod):
    """The floor as the shared engine runs it. Anomaly map: the normalised intensity
    (``hyperintensity``) or its healthy-density score (``healthy_density``). A floor has no
    pseudo-healthy image: channel 1 is the input itself, and the configs do not write it."""

    def __init__(self, rule: str, density: HealthyIntensityDensity | None = None, **smoothing):
        super().__init__(**smoothing)
        self.rule = check_rule(rule)
        if self.rule == "healthy_density" and density is None:
            raise ValueError("The healthy_density rule needs the healthy intensity histogram (model.pt).")
        self.density = density

    def anomaly_and_reconstruction(self, image: torch.Tensor, mask: torch.Tensor):
        anomaly = image.clone() if self.rule == "hyperintensity" else self.density(image)
        return anomaly, image


class HealthyIntensityFitter(Workflow):
    """One pass over healthy training volumes (as the pipeline preprocesses them) that counts
    their normalised brain intensities into `density`: the whole of the floor's training."""

    def __init__(self, density: HealthyIntensityDensity, data_loader, device: str | torch.device = "cpu",
                 handlers=None):
        super().__init__(device=device, max_epochs=1, data_loader=data_loader, handlers=handlers, decollate=False)
        self.density = density

    def _iteration(self, engine: Engine, batchdata: dict) -> dict:
        mask = batchdata[MASK]
        self.density.accumulate(batchdata[IMAGE], mask)
        return {"brain_voxels": int((mask > 0.5).sum())}


class SaveHealthyIntensity(ModelInfoHandler):
    """Writes the histogram as `model_dir/model.pt` and what it is (contrast, data, volumes,
    voxels, seconds) into `model_info.json` when the fitter completes."""

    def __init__(self, density: HealthyIntensityDensity, model_dir: str, fields: dict | None = None):
        super().__init__(str(model_dir), fields)
        self.density = density

    def _write(self, engine: Engine) -> None:
        model_dir = Path(self.model_dir)
        model_dir.mkdir(parents=True, exist_ok=True)
        torch.save(self.density.state_dict(), weights_file(model_dir))
        update_model_info(model_dir, **self.fields, n_bins=self.density.n_bins,
                          training_volumes=engine.state.iteration, training_voxels=int(self.density.counts.sum()),
                          train_seconds=round(time.perf_counter() - self.started, 1))
        logger.info("Healthy intensity histogram of %d volumes written to %s",
                    engine.state.iteration, weights_file(model_dir))
