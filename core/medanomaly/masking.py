"""Pseudo-healthy masking (PHANES, Bercea et al. 2023).

Where a first, coarse pseudo-healthy reconstruction departs from the scan, the scan is
masked and later inpainted. The mask map is

    M = clip(|CLAHE(x) - CLAHE(x_rec)| / P95, 0, 1) * LPIPS(x_rec, x)

(P95: the 95th percentile of that image's own CLAHE residual; LPIPS: spatial, squeeze backbone,
smoothed with a Gaussian of sigma 2). It is binarised at a threshold calibrated on healthy
validation data (:func:`threshold_at_fpr`: the lowest threshold that flags at most 5 %, 2 % or
1 % of the healthy brain pixels) and dilated (Gaussian of sigma 1.2, then > 0.1). Training the
inpainter also uses random ellipses (:func:`random_ellipse_masks`).

Batches are ``(B, 1, H, W)`` tensors with images in [0, 1]; everything but CLAHE (scikit-image,
slice by slice) is vectorised over the batch in torch.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from monai.networks.layers import separable_filtering

__all__ = [
    "clahe",
    "clahe_residual",
    "gaussian_smooth",
    "smoothed_saliency",
    "mask_map",
    "threshold_at_fpr",
    "thresholds_at_fprs",
    "dilate_mask",
    "binary_anomaly_mask",
    "random_ellipse_masks",
    "compose",
]

DEFAULT_FPRS = (0.05, 0.02, 0.01)


def _check_batch(x: torch.Tensor, name: str = "x") -> None:
    if x.ndim != 4:
        raise ValueError(f"{name} must be a (B, C, H, W) batch of slices, got shape {tuple(x.shape)}.")


# --------------------------------------------------------------------------- filters
def gaussian_smooth(x: torch.Tensor, sigma: float, truncate: float = 4.0) -> torch.Tensor:
    """Gaussian filter over the two spatial axes of ``(B, C, H, W)`` (kernel radius
    ``ceil(truncate * sigma)`` like scipy's ``gaussian_filter``, reflect padding)."""
    _check_batch(x)
    if sigma <= 0:
        return x
    radius = int(math.ceil(truncate * sigma))
    r = torch.arange(-radius, radius + 1, dtype=torch.float64)
    kernel = torch.exp(-0.5 * (r / sigma) ** 2)
    kernel = (kernel / kernel.sum()).to(device=x.device, dtype=x.dtype if x.is_floating_point() else torch.float32)
    return separable_filtering(x if x.is_floating_point() else x.float(), kernel, mode="reflect")


def clahe(x: torch.Tensor, clip_limit: float = 0.01, kernel_size: int | None = None,
          nbins: int = 256) -> torch.Tensor:
    """Contrast-limited adaptive histogram equalisation of each slice
    (``skimage.exposure.equalize_adapthist``; inputs clipped to [0, 1])."""
    from skimage import exposure

    _check_batch(x)
    array = x.detach().float().clamp(0, 1).cpu().numpy().astype(np.float64)
    out = np.empty_like(array)
    for b in range(array.shape[0]):
        for c in range(array.shape[1]):
            out[b, c] = exposure.equalize_adapthist(array[b, c], kernel_size=kernel_size, clip_limit=clip_limit,
                                                    nbins=nbins)
    return torch.from_numpy(out).to(device=x.device, dtype=torch.float32)


def per_image_quantile(values: torch.Tensor, q: float) -> torch.Tensor:
    """Linear-interpolated quantile (0..1) of each image's pixels, shape ``(B, 1, 1, 1)``."""
    flat = values.flatten(1).float()
    return torch.quantile(flat, q, dim=1).view(-1, 1, 1, 1)


def clahe_residual(x: torch.Tensor, reconstruction: torch.Tensor, percentile: float = 95,
                   clip_limit: float = 0.01, eps: float = 1e-8) -> torch.Tensor:
    """``|CLAHE(x) - CLAHE(x_rec)|`` divided by its own ``percentile``-th percentile (per
    image, over all its pixels) and clipped to 1."""
    if x.shape != reconstruction.shape:
        raise ValueError(f"x and the reconstruction differ in shape: {tuple(x.shape)} vs "
                         f"{tuple(reconstruction.shape)}.")
    residual = (clahe(x, clip_limit) - clahe(reconstruction, clip_limit)).abs()
    return normalise_per_image(residual, percentile, eps)


def normalise_per_image(residual: torch.Tensor, percentile: float = 95, eps: float = 1e-8) -> torch.Tensor:
    """Each image divided by its own ``percentile``-th percentile, clipped to [0, 1]."""
    _check_batch(residual, "residual")
    scale = per_image_quantile(residual, percentile / 100.0)
    return (residual / (scale + eps)).clamp(0, 1)


def smoothed_saliency(perceptual, reconstruction: torch.Tensor, x: torch.Tensor, sigma: float = 2.0) -> torch.Tensor:
    """Spatial perceptual distance (e.g. ``medanomaly.scoring.PerceptualDistance('squeeze')``)
    between the reconstruction and the scan, Gaussian-smoothed with ``sigma``."""
    with torch.no_grad():
        saliency = perceptual(reconstruction.float().clamp(0, 1), x.float().clamp(0, 1))
    return gaussian_smooth(saliency, sigma)


def mask_map(x: torch.Tensor, reconstruction: torch.Tensor, perceptual=None, saliency_sigma: float = 2.0,
             percentile: float = 95, clip_limit: float = 0.01) -> torch.Tensor:
    """The PHANES mask map: CLAHE residual (normalised, clipped) times the smoothed spatial
    LPIPS of (reconstruction, x). Without ``perceptual`` the CLAHE residual alone."""
    residual = clahe_residual(x, reconstruction, percentile, clip_limit)
    if perceptual is None:
        return residual
    return residual * smoothed_saliency(perceptual, reconstruction, x, saliency_sigma)


# --------------------------------------------------------------------------- thresholds
def threshold_at_fpr(healthy_values: torch.Tensor | np.ndarray, fpr: float) -> float:
    """The threshold ``t`` for ``map > t`` calibrated on healthy pixel values: the lowest ``t``
    (i.e. the one flagging the largest fraction) that flags at most ``fpr`` of them. It is one of
    the values, so ``map > t`` flags at most ``floor(fpr * n)`` healthy pixels (fewer on ties)."""
    values = torch.as_tensor(healthy_values).flatten().double()
    if values.numel() == 0:
        raise ValueError("No healthy values to calibrate a threshold on (empty brain masks?).")
    if not 0 <= fpr < 1:
        raise ValueError(f"The target false-positive fraction must be in [0, 1), got {fpr}.")
    allowed = int(math.floor(fpr * values.numel() + 1e-9))
    ordered = values.sort().values
    return float(ordered[values.numel() - 1 - allowed])


def thresholds_at_fprs(healthy_values, fprs=DEFAULT_FPRS) -> dict[str, float]:
    """``{"0.05": t5, "0.02": t2, "0.01": t1}`` for the given false-positive fractions."""
    return {f"{fpr:g}": threshold_at_fpr(healthy_values, fpr) for fpr in fprs}


# --------------------------------------------------------------------------- binary masks
def dilate_mask(mask: torch.Tensor, sigma: float = 1.2, level: float = 0.1) -> torch.Tensor:
    """Soft dilation: Gaussian blur (``sigma``) of the binary mask, then ``> level``."""
    return (gaussian_smooth(mask.float(), sigma) > level).float()


def binary_anomaly_mask(anomaly_map: torch.Tensor, threshold: "float | torch.Tensor", brain: torch.Tensor | None = None,
                        sigma: float = 1.2, level: float = 0.1) -> torch.Tensor:
    """``map > threshold`` (a number, or one per image of shape (B, 1, 1, 1)), dilated, and restricted
    to the brain if given; float {0, 1}."""
    _check_batch(anomaly_map, "anomaly_map")
    mask = dilate_mask((anomaly_map > threshold).float(), sigma, level)
    return mask if brain is None else mask * (brain > 0).float()


def random_ellipse_masks(batch: int, size: tuple[int, int], n_ellipses: int = 10,
                         radius_range: tuple[float, float] = (0.02, 0.12),
                         rng: np.random.Generator | int | None = None, device=None) -> torch.Tensor:
    """``(batch, 1, H, W)`` binary masks, each the union of ``n_ellipses`` random ellipses
    (centres uniform in the image, semi-axes a fraction ``radius_range`` of the image side,
    any orientation)."""
    rng = rng if isinstance(rng, np.random.Generator) else np.random.default_rng(rng)
    h, w = size
    side = float(min(h, w))
    centres = rng.uniform([0, 0], [h, w], size=(batch, n_ellipses, 2))
    axes = rng.uniform(radius_range[0] * side, radius_range[1] * side, size=(batch, n_ellipses, 2))
    angles = rng.uniform(0, np.pi, size=(batch, n_ellipses))
    as_t = lambda a: torch.as_tensor(a, dtype=torch.float32, device=device)  # noqa: E731
    centres, axes, angles = as_t(centres), as_t(axes), as_t(angles)
    yy, xx = torch.meshgrid(torch.arange(h, dtype=torch.float32, device=device) + 0.5,
                            torch.arange(w, dtype=torch.float32, device=device) + 0.5, indexing="ij")
    dy = yy[None, None] - centres[..., 0, None, None]
    dx = xx[None, None] - centres[..., 1, None, None]
    cos, sin = angles.cos()[..., None, None], angles.sin()[..., None, None]
    u, v = dy * cos + dx * sin, -dy * sin + dx * cos
    inside = (u / axes[..., 0, None, None]) ** 2 + (v / axes[..., 1, None, None]) ** 2 <= 1
    return inside.any(dim=1, keepdim=True).float()


def compose(x: torch.Tensor, inpainted: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``x * (1 - m) + inpainted * m``: unmasked pixels are exactly the scan's."""
    mask = mask.to(x.dtype)
    return x * (1 - mask) + inpainted * mask
