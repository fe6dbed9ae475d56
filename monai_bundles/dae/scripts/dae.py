"""Denoising autoencoder (Kascenas et al., MIDL 2022): a UNet learns to remove coarse,
low-frequency noise from healthy slices; at test time it "removes" lesions as if they were
noise, and the residual |x - DAE(x)| is the anomaly map."""

from __future__ import annotations

from typing import Hashable, Mapping

import torch
import torch.nn.functional as F
from monai.transforms import MapTransform, RandomizableTransform

from medanomaly import scoring
from medanomaly.bundles.method import SliceAnomalyMethod

NOISY = "noisy"


class CoarseNoised(RandomizableTransform, MapTransform):
    """Adds Gaussian noise drawn at `resolution` x `resolution` and upsampled (bilinear) to the
    slice, inside the brain only: low-frequency blobs the size of lesions."""

    def __init__(self, image_key: str = "image", mask_key: str = "mask", std: float = 0.2,
                 resolution: int = 16, output_key: str = NOISY):
        MapTransform.__init__(self, keys=[image_key])
        RandomizableTransform.__init__(self, prob=1.0)
        self.image_key, self.mask_key, self.output_key = image_key, mask_key, output_key
        self.std, self.resolution = std, resolution

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict:
        d = dict(data)
        image, mask = d[self.image_key], d[self.mask_key]
        coarse = self.R.normal(0.0, self.std, size=(1, image.shape[0], self.resolution, self.resolution))
        noise = F.interpolate(torch.as_tensor(coarse, dtype=torch.float32), size=tuple(image.shape[1:]),
                              mode="bilinear", align_corners=False)[0]
        d[self.output_key] = image + noise * mask
        return d


def prepare_denoising_batch(batchdata: Mapping, device=None, non_blocking: bool = False, **kwargs):
    """Training pairs: (noisy slice, clean slice)."""
    return (batchdata[NOISY].to(device=device, non_blocking=non_blocking),
            batchdata["image"].to(device=device, non_blocking=non_blocking))


def prepare_reconstruction_batch(batchdata: Mapping, device=None, non_blocking: bool = False, **kwargs):
    """Validation pairs: (clean healthy image, itself) — how well healthy anatomy is kept."""
    image = batchdata["image"].to(device=device, non_blocking=non_blocking)
    return image, image


class DenoisingAutoencoderMethod(SliceAnomalyMethod):
    """Anomaly map = |x - DAE(x)|; the reconstruction is the pseudo-healthy image."""

    def __init__(self, network: torch.nn.Module, **smoothing):
        super().__init__(**smoothing)
        self.network = network

    def anomaly_and_reconstruction(self, image: torch.Tensor, mask: torch.Tensor):
        reconstruction = self.network(image).clamp(0, 1)
        return scoring.residual_map(image, reconstruction), reconstruction
