"""PHANES inference: latent restoration (stage 1) -> anomaly mask -> inpainting (stage 2) ->
pseudo-healthy image and anomaly map |x - x_ph| * LPIPS(x_ph, x).

`mode="ra"` stops after stage 1: the RA map |x - x_rec| * LPIPS(x_rec, x) with the VAE's
reconstruction as the pseudo-healthy image (the stage-1-alone baseline)."""

from __future__ import annotations

import logging

import torch

from medanomaly import masking, scoring
from medanomaly.bundles.method import SliceAnomalyMethod
from medanomaly.bundles.weights import load_weights

from scripts.trainer import load_model_file

logger = logging.getLogger(__name__)
MODES = ("phanes", "ra")
MASK_RULES = ("calibrated", "per_image")


def load_phanes(network, model_dir, device=None):
    """The shared `load_weights` (model.pt's `model` entry holds both stages' state dicts)."""
    return load_weights(network, model_dir, device).eval()


def load_mask_threshold(model_dir, fpr: float = 0.05, override: float | None = None) -> float:
    """The stage-1 mask threshold calibrated (at training time) at healthy false-positive
    fraction `fpr`; `override` wins."""
    if override is not None:
        return float(override)
    saved = load_model_file(model_dir) or {}
    thresholds = saved.get("mask_thresholds") or {}
    key = f"{float(fpr):g}"
    if key not in thresholds:
        raise KeyError(f"The weights in {model_dir} have no mask threshold for a healthy false-positive fraction of "
                       f"{fpr} (have: {sorted(thresholds)}). Pick one of those (--mask_fpr) or set --mask_threshold.")
    return float(thresholds[key])


class PhanesMethod(SliceAnomalyMethod):
    """(anomaly map, pseudo-healthy image) of (B, 1, H, W) slices in [0, 1].

    `mask_rule` binarises the stage-1 mask map: "calibrated" at `mask_threshold` (calibrated on
    healthy validation slices: the same cut for every slice), or "per_image" at each slice's own
    `mask_percentile`-th percentile (the reference code's test-time rule: every slice gets a mask,
    healthy or not)."""

    def __init__(self, network, perceptual, mask_threshold: float, mode: str = "phanes", saliency_sigma: float = 2.0,
                 dilation_sigma: float = 1.2, dilation_level: float = 0.1, mask_rule: str = "calibrated",
                 mask_percentile: float = 95.0, **smoothing):
        super().__init__(**smoothing)
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}.")
        if mask_rule not in MASK_RULES:
            raise ValueError(f"mask_rule must be one of {MASK_RULES}, got {mask_rule!r}.")
        self.mask_rule, self.mask_percentile = mask_rule, float(mask_percentile)
        self.network, self.perceptual, self.mode = network.eval(), perceptual, mode
        self.mask_threshold, self.saliency_sigma = float(mask_threshold), saliency_sigma
        self.dilation_sigma, self.dilation_level = dilation_sigma, dilation_level

    @torch.no_grad()
    def restore(self, image, brain):
        """Everything PHANES computes for a batch: reconstruction, mask map, binary mask,
        inpainted fill, pseudo-healthy image, anomaly map."""
        image = image.float()
        rec = self.network.vae(image).float().clamp(0, 1) * (brain > 0)
        out = {"reconstruction": rec}
        if self.mode == "ra":
            saliency = masking.smoothed_saliency(self.perceptual, rec, image, self.saliency_sigma)
            out.update(pseudo_healthy=rec, anomaly=scoring.residual_map(image, rec) * saliency)
            return out
        mask_map = masking.mask_map(image, rec, self.perceptual, self.saliency_sigma)
        mask = masking.binary_anomaly_mask(mask_map, self._mask_threshold(mask_map), brain, self.dilation_sigma,
                                           self.dilation_level)
        fill = self.network.inpainter(image, mask).float().clamp(0, 1)
        pseudo_healthy = masking.compose(image, fill, mask)
        saliency = masking.smoothed_saliency(self.perceptual, pseudo_healthy, image, self.saliency_sigma)
        out.update(mask_map=mask_map, mask=mask, fill=fill, pseudo_healthy=pseudo_healthy,
                   anomaly=scoring.residual_map(image, pseudo_healthy) * saliency)
        return out

    def _mask_threshold(self, mask_map):
        if self.mask_rule == "per_image":
            return masking.per_image_quantile(mask_map, self.mask_percentile / 100.0)
        return self.mask_threshold

    def anomaly_and_reconstruction(self, image, mask):
        out = self.restore(image, mask)
        return out["anomaly"], out["pseudo_healthy"]
