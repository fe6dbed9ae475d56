"""The method as the shared inferer runs it: `SliceAnomalyMethod` (each bundle subclasses it in
`scripts/`), the batch preparation that stacks image and brain mask, and the slice inferer that
reports progress.
"""

from __future__ import annotations

from typing import Mapping

import torch
from monai.data import MetaTensor
from monai.inferers import SliceInferer

from medanomaly import scoring
from medanomaly.bundles.progress import VolumeProgress
from medanomaly.data import IMAGE, MASK


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
