"""Anomaly maps and scores on torch tensors.

Inputs are batches of 2D slices ``(B, 1, H, W)`` (most functions also take volumes
``(B, 1, H, W, D)``), images in [0, 1]. Maps are float, >= 0, same shape as the inputs.
"""

from __future__ import annotations

import logging
import os
import warnings
from pathlib import Path
from urllib.parse import urlparse

import torch
from monai.networks.layers import median_filter, separable_filtering
from torch import nn

from medanomaly.perceptual import PerceptualWeightsMissing

logger = logging.getLogger(__name__)

__all__ = [
    "residual_map",
    "ssim_map",
    "PerceptualDistance",
    "FeatureResidualMap",
    "imagenet_vgg_features",
    "PerceptualWeightsMissing",
    "backbone_weights_path",
    "combine_maps",
    "zero_background",
    "smooth_map",
    "normalise_by_percentile",
    "volume_score",
]

RANDOM_BACKBONE_ENV = "MEDANOMALY_ALLOW_RANDOM_BACKBONE"


def _check_pair(x: torch.Tensor, y: torch.Tensor) -> None:
    if x.shape != y.shape:
        raise ValueError(f"The two batches must have the same shape, got {tuple(x.shape)} and {tuple(y.shape)}.")
    _check_map(x)


def _check_map(m: torch.Tensor) -> None:
    if m.ndim not in (4, 5):
        raise ValueError(f"Expected (B, C, H, W) or (B, C, H, W, D), got shape {tuple(m.shape)}.")


def _as_float(x: torch.Tensor) -> torch.Tensor:
    return x if x.is_floating_point() else x.float()


def _gaussian_kernel(size: int, sigma: float, like: torch.Tensor) -> torch.Tensor:
    if size < 1 or size % 2 == 0:
        raise ValueError(f"The window size must be odd and positive, got {size}.")
    r = torch.arange(size, dtype=torch.float64) - size // 2
    kernel = torch.exp(-0.5 * (r / sigma) ** 2)
    return (kernel / kernel.sum()).to(device=like.device, dtype=like.dtype)


def _blur(x: torch.Tensor, size: int, sigma: float) -> torch.Tensor:
    """Separable Gaussian filter over all spatial axes, replicate padding (keeps the shape)."""
    return separable_filtering(x, _gaussian_kernel(size, sigma, x), mode="replicate")


def _percentile(values: torch.Tensor, q: float) -> torch.Tensor:
    """q-th percentile (0..100) with linear interpolation, like ``numpy.percentile``; any size."""
    v = values.flatten().sort().values
    pos = (q / 100.0) * (v.numel() - 1)
    lo = int(pos)
    hi = min(lo + 1, v.numel() - 1)
    return v[lo] + (v[hi] - v[lo]) * (pos - lo)


def _masked_values(m: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    if mask is None:
        return m.flatten()
    return m[(mask.to(m.device) > 0).expand_as(m)]


# --------------------------------------------------------------------------- maps
def residual_map(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Absolute difference ``|x - y|``."""
    _check_pair(x, y)
    return (x - y).abs()


def ssim_map(x: torch.Tensor, y: torch.Tensor, data_range: float = 1.0, win_size: int = 11,
             sigma: float = 1.5, k1: float = 0.01, k2: float = 0.03) -> torch.Tensor:
    """Per-pixel ``1 - SSIM`` with a Gaussian window (same shape as the inputs, clamped at 0).

    Matches ``skimage.metrics.structural_similarity(gaussian_weights=True, use_sample_covariance=False)``
    away from the border (the border uses replicate padding).
    """
    _check_pair(x, y)
    x, y = _as_float(x), _as_float(y)
    mu_x, mu_y = _blur(x, win_size, sigma), _blur(y, win_size, sigma)
    var_x = _blur(x * x, win_size, sigma) - mu_x * mu_x
    var_y = _blur(y * y, win_size, sigma) - mu_y * mu_y
    cov = _blur(x * y, win_size, sigma) - mu_x * mu_y
    c1, c2 = (k1 * data_range) ** 2, (k2 * data_range) ** 2
    ssim = ((2 * mu_x * mu_y + c1) * (2 * cov + c2)) / ((mu_x * mu_x + mu_y * mu_y + c1) * (var_x + var_y + c2))
    return (1 - ssim).clamp_min(0)


_BACKBONES = {  # our name -> torchvision weights enum used by lpips for that trunk
    "vgg": "VGG16_Weights",
    "alex": "AlexNet_Weights",
    "squeeze": "SqueezeNet1_1_Weights",
}


def torchvision_weights_path(weights: str) -> Path:
    """Where torchvision caches the ImageNet weights ``weights`` (e.g. "VGG16_Weights")."""
    import torchvision

    url = getattr(torchvision.models, weights).IMAGENET1K_V1.url
    return Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(urlparse(url).path)


def backbone_weights_path(net: str) -> Path:
    """Where torchvision looks for the ImageNet weights of the LPIPS backbone ``net``."""
    if net not in _BACKBONES:
        raise ValueError(f"net must be one of {sorted(_BACKBONES)}, got {net!r}.")
    return torchvision_weights_path(_BACKBONES[net])


def use_random_backbone(weights_file: Path, weights: str, user: str, allow_random_backbone: bool = False,
                        seed: int = 0) -> bool:
    """The offline rule for ImageNet backbones: False when ``weights_file`` is in the torch hub
    cache; otherwise True with a loud WARNING if a random backbone is allowed (argument or
    MEDANOMALY_ALLOW_RANDOM_BACKBONE=1), else :class:`PerceptualWeightsMissing` naming the file."""
    if weights_file.is_file():
        return False
    allowed = allow_random_backbone or os.environ.get(RANDOM_BACKBONE_ENV, "").strip().lower() in ("1", "true", "yes")
    if not allowed:
        raise PerceptualWeightsMissing(
            f"{user} needs torchvision's ImageNet weights file '{weights_file.name}', which is not at "
            f"'{weights_file}'. Nothing is downloaded at run time: on a machine with internet access get it "
            f"(torchvision.models.{weights}.IMAGENET1K_V1.url) and copy it to exactly that path "
            f"(torch.hub.get_dir()/checkpoints; TORCH_HOME moves it). For tests only, "
            f"allow_random_backbone=True or {RANDOM_BACKBONE_ENV}=1 uses a random backbone instead."
        )
    logger.warning("%s: '%s' not found; using a RANDOMLY INITIALISED backbone (seed %d). Its outputs are NOT "
                   "perceptual; do not use them for real results.", user, weights_file, seed)
    return True


def warn_random_backbone(user: str, seed: int = 0) -> None:
    """The loud line of an explicitly chosen random backbone (`backbone: random`)."""
    logger.warning("%s: backbone 'random' chosen: a RANDOMLY INITIALISED network (seed %d). Its outputs are NOT "
                   "perceptual; use it only as a control.", user, seed)


def imagenet_vgg_features(arch: str, last_index: int, user: str, allow_random_backbone: bool = False,
                          seed: int = 0, random: bool = False) -> tuple[torch.nn.Sequential, bool]:
    """torchvision's ``arch`` ("vgg16" / "vgg19") feature trunk up to layer ``last_index`` with its
    ImageNet weights from the torch hub cache, or (offline rule of :func:`use_random_backbone`, or
    ``random`` chosen explicitly) a seeded random trunk. Returns (features, random_backbone)."""
    import torchvision

    weights = f"{arch.upper()}_Weights"
    path = torchvision_weights_path(weights)
    if random:
        warn_random_backbone(user, seed)
    random_backbone = random or use_random_backbone(path, weights, user, allow_random_backbone, seed)
    with torch.random.fork_rng(devices=[]), warnings.catch_warnings():
        torch.manual_seed(seed)
        warnings.simplefilter("ignore", UserWarning)
        vgg = getattr(torchvision.models, arch)(weights=None)
    if not random_backbone:
        vgg.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    return vgg.features[: last_index + 1], random_backbone


class PerceptualDistance(nn.Module):
    """Spatial LPIPS map ``(B, 1, H, W)`` between two batches of grayscale images in [0, 1].

    ``backbone`` "imagenet" (the papers'): LPIPS with the ``net`` trunk, whose ImageNet weights must
    already be in the torch hub cache (see :func:`backbone_weights_path`); otherwise
    :class:`PerceptualWeightsMissing` is raised, unless ``allow_random_backbone=True`` or
    ``MEDANOMALY_ALLOW_RANDOM_BACKBONE=1``, in which case a random trunk (seeded with ``seed``) is
    used and a WARNING is logged. The LPIPS linear layers ship with the ``lpips`` package.
    "medanomaly": the LPIPS formula over the project's own backbone, trained offline on healthy
    slices (:mod:`medanomaly.perceptual`; ``net`` is not used). "random": the LPIPS ``net`` with a
    random trunk, chosen explicitly (a control), with a WARNING. ``self.backbone`` says which one
    really runs. The module is frozen and always in eval mode; gradients still flow to the inputs.
    """

    def __init__(self, net: str = "vgg", allow_random_backbone: bool = False, seed: int = 0,
                 backbone: str = "imagenet"):
        super().__init__()
        from medanomaly.perceptual import FeatureDistance, check_backbone, load_backbone

        self.net, self.backbone = net, check_backbone(backbone)
        self.distance = None
        if backbone == "medanomaly":
            self.random_backbone = False
            self.distance = FeatureDistance(load_backbone())
            self.requires_grad_(False)
            self.eval()
            return
        import lpips

        user = f"The LPIPS '{net}' backbone"
        if backbone == "random":
            warn_random_backbone(user, seed)
            self.random_backbone = True
        else:
            self.random_backbone = use_random_backbone(backbone_weights_path(net), _BACKBONES[net], user,
                                                       allow_random_backbone, seed)
        self.backbone = "random" if self.random_backbone else "imagenet"
        linear_file = Path(lpips.__file__).parent / "weights" / "v0.1" / f"{net}.pth"
        if not linear_file.is_file():
            raise PerceptualWeightsMissing(
                f"The lpips package has no linear-layer weights at '{linear_file}'. Reinstall lpips "
                "(pip install lpips)."
            )
        with torch.random.fork_rng(devices=[]), warnings.catch_warnings():
            torch.manual_seed(seed)
            warnings.simplefilter("ignore", UserWarning)  # torchvision's note on lpips' legacy `pretrained=` argument
            self.lpips = lpips.LPIPS(net=net, spatial=True, pnet_rand=self.random_backbone, verbose=False)
        # lpips loads the linear layers with strict=False, so check that they really arrived.
        expected = torch.load(linear_file, map_location="cpu", weights_only=True)
        state = self.lpips.state_dict()
        if not all(k in state and torch.equal(state[k], v) for k, v in expected.items()):
            raise RuntimeError(f"The LPIPS linear layers were not loaded from '{linear_file}'.")
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> "PerceptualDistance":
        """Always stays in eval mode (the LPIPS linear layers contain dropout)."""
        return super().train(False)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        _check_pair(x, y)
        if x.ndim != 4 or x.shape[1] != 1:
            raise ValueError(f"PerceptualDistance expects (B, 1, H, W) slices, got {tuple(x.shape)}.")
        if self.distance is not None:
            return self.distance(x, y)
        x3 = x.expand(-1, 3, -1, -1) * 2 - 1
        y3 = y.expand(-1, 3, -1, -1) * 2 - 1
        return self.lpips(x3, y3)


class FeatureResidualMap(nn.Module):
    """Perceptual score A_per (SCRPS): VGG16 features of the residual ``x - y``, averaged over
    channels, upsampled (bilinear) to the image size and averaged over ``layers`` (default: the
    last three blocks, relu3_3 / relu4_3 / relu5_3). Each layer is measured as the mean absolute
    change of its features against a zero residual and divided by the same for a residual of 1
    everywhere, so a zero residual scores exactly 0 and the map is about 1 where the residual is 1.
    ``size`` computes the features at that size (then the map is upsampled to the image size).

    ``backbone`` as :class:`PerceptualDistance`: "imagenet" follows the same offline rule
    (torchvision's ``VGG16_Weights`` file in the torch hub cache, else
    :class:`PerceptualWeightsMissing`, unless ``allow_random_backbone`` or
    MEDANOMALY_ALLOW_RANDOM_BACKBONE=1 -> a seeded random VGG16 and a WARNING); "random" is a random
    VGG16 chosen explicitly; "medanomaly" uses the last three of the five levels of the project's
    own backbone (:mod:`medanomaly.perceptual`) in place of ``layers``.
    """

    LAYERS = {"relu1_2": 3, "relu2_2": 8, "relu3_3": 15, "relu4_3": 22, "relu5_3": 29}

    def __init__(self, layers=("relu3_3", "relu4_3", "relu5_3"), allow_random_backbone: bool = False,
                 seed: int = 0, size=None, backbone: str = "imagenet"):
        super().__init__()
        from medanomaly.perceptual import check_backbone, load_backbone

        self.backbone = check_backbone(backbone)
        self.size = None if size is None else tuple(int(s) for s in ([size] * 2 if isinstance(size, int) else size))
        self.register_buffer("std", torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1))
        if backbone == "medanomaly":
            self.trunk, self.random_backbone = load_backbone(), False
            self.requires_grad_(False)
            self.eval()
            return
        unknown = [name for name in layers if name not in self.LAYERS]
        if unknown or not layers:
            raise ValueError(f"layers must be among {list(self.LAYERS)}, got {list(layers)}.")
        self.indices = sorted(self.LAYERS[name] for name in layers)
        self.features, self.random_backbone = imagenet_vgg_features(
            "vgg16", self.indices[-1], "The VGG16 perceptual score", allow_random_backbone, seed,
            random=backbone == "random")
        self.backbone = "random" if self.random_backbone else "imagenet"
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> "FeatureResidualMap":
        return super().train(False)

    def _features(self, residual: torch.Tensor) -> list[torch.Tensor]:
        if self.backbone == "medanomaly":
            return self.trunk(residual)[2:]
        h, out = residual.expand(-1, 3, -1, -1) / self.std, []
        for i, layer in enumerate(self.features):
            h = layer(h)
            if i in self.indices:
                out.append(h)
        return out

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        _check_pair(x, y)
        if x.ndim != 4 or x.shape[1] != 1:
            raise ValueError(f"FeatureResidualMap expects (B, 1, H, W) slices, got {tuple(x.shape)}.")
        residual = _as_float(x - y)
        size = tuple(x.shape[-2:])
        if self.size is not None and self.size != size:
            residual = nn.functional.interpolate(residual, size=self.size, mode="bilinear", align_corners=False)
        n = residual.shape[0]
        reference = torch.cat([torch.zeros_like(residual[:1]), torch.ones_like(residual[:1])])
        maps = []
        for features in self._features(torch.cat([residual, reference])):
            zero, one = features[n:n + 1], features[n + 1:]
            change = (features[:n] - zero).abs().mean(1, keepdim=True)
            scale = (one - zero).abs().mean().clamp_min(1e-12)
            maps.append(nn.functional.interpolate(change / scale, size=size, mode="bilinear", align_corners=False))
        return torch.stack(maps).mean(0).clamp_min(0)


# --------------------------------------------------------------------------- post-processing and scores
def combine_maps(*maps: torch.Tensor) -> torch.Tensor:
    """Voxel-wise product of maps of the same shape."""
    if not maps:
        raise ValueError("combine_maps needs at least one map.")
    out = maps[0]
    for m in maps[1:]:
        if m.shape != out.shape:
            raise ValueError(f"All maps must have the same shape, got {tuple(out.shape)} and {tuple(m.shape)}.")
        out = out * m
    return out


def zero_background(m: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``m`` inside ``mask > 0``, exactly 0 outside."""
    return torch.where(mask.to(m.device) > 0, m, torch.zeros((), dtype=m.dtype, device=m.device))


def smooth_map(m: torch.Tensor, kind: str = "median", size: int = 5, sigma: float = 1.0) -> torch.Tensor:
    """Median (window ``size``) or Gaussian (``sigma``, window ``size``) filter over the spatial axes."""
    _check_map(m)
    if size < 1 or size % 2 == 0:
        raise ValueError(f"size must be odd and positive, got {size}.")
    if kind == "median":
        return median_filter(m, kernel_size=size, spatial_dims=m.ndim - 2)
    if kind == "gaussian":
        return _blur(_as_float(m), size, sigma)
    raise ValueError(f"kind must be 'median' or 'gaussian', got {kind!r}.")


def normalise_by_percentile(m: torch.Tensor, mask: torch.Tensor | None = None, q: float = 95) -> torch.Tensor:
    """Divide by the q-th percentile of the values inside ``mask`` (over the whole tensor: pass one
    volume, i.e. all its slices, at a time); 0 outside the mask. If that percentile is 0 the maximum
    is used instead; an all-zero map stays zero."""
    values = _masked_values(m, mask)
    scale = _percentile(values, q) if values.numel() else torch.zeros(())
    if scale <= 0:
        scale = values.max() if values.numel() else scale
    out = m / scale if scale > 0 else torch.zeros_like(m)
    return out if mask is None else zero_background(out, mask)


def volume_score(m: torch.Tensor, mask: torch.Tensor | None = None, reduction: str = "mean",
                 percentile: float = 99) -> torch.Tensor:
    """One score (0-dim tensor) from all values of ``m`` inside ``mask``: their mean, or
    (``reduction="top_percentile"``) the mean of the values at or above their ``percentile``-th
    percentile (same definitions as ``medanomaly.metrics.volume_score``)."""
    values = _masked_values(m, mask)
    if values.numel() == 0:
        raise ValueError("volume_score: the mask is empty; check the brain mask of this volume.")
    if reduction == "mean":
        return values.mean()
    if reduction == "top_percentile":
        return values[values >= _percentile(values, percentile)].mean()
    raise ValueError(f"reduction must be 'mean' or 'top_percentile', got {reduction!r}.")
