"""GAN inversion: the W+ code of each slice, found by minimising
`lpips_weight * LPIPS(x, G(s)) + (lambda_mse / N) * ||x - G(s)||^2` with Adam (SCRPS: LPIPS on
VGG16, lambda_mse = 10, 2000 steps at lr 0.01), starting from the average code, with the NVlabs
projector's learning-rate schedule (linear ramp-up, cosine ramp-down).

`invert` optimises a whole batch at once: one Adam over a (B, L, 512) tensor and the sum of the
per-slice losses. Adam is element-wise and slice b's loss depends only on s[b], so every slice
follows exactly the trajectory it would follow alone (`invert_per_slice`, the loop, is the
reference and the benchmark's baseline) — at a fraction of the cost.
"""

from __future__ import annotations

import hashlib
import math
from pathlib import Path

import torch
import torch.nn.functional as F

from scripts.stylegan2 import to_unit


def learning_rate(step: int, steps: int, lr: float, rampup: float = 0.05, rampdown: float = 0.25) -> float:
    """NVlabs projector schedule: linear ramp-up over the first `rampup`, cosine ramp-down over the last `rampdown`."""
    t = step / max(steps, 1)
    ramp = min(1.0, (1.0 - t) / rampdown) if rampdown > 0 else 1.0
    ramp = 0.5 - 0.5 * math.cos(ramp * math.pi)
    if rampup > 0:
        ramp = ramp * min(1.0, t / rampup)
    return lr * ramp


class LatentInverter:
    """Finds W+ codes of (B, 1, H, W) slices in [0, 1] for `generator` (a StyleGAN2 `Generator`).

    `perceptual`: a `medanomaly.scoring.PerceptualDistance` (spatial LPIPS; averaged over the
    slice) or None (then `lpips_weight` must be 0). `cache_dir`: codes of batches already
    inverted with the same generator and settings are read from there (the benchmark's sweeps
    over retrieval settings invert each slice once).
    """

    def __init__(self, generator: torch.nn.Module, perceptual: torch.nn.Module | None = None, steps: int = 2000,
                 lr: float = 0.01, lambda_mse: float = 10.0, lpips_weight: float = 1.0, lr_rampup: float = 0.05,
                 lr_rampdown: float = 0.25, cache_dir: str | None = None):
        if lpips_weight > 0 and perceptual is None:
            raise ValueError("lpips_weight > 0 needs a perceptual distance (medanomaly.scoring.PerceptualDistance).")
        self.generator, self.perceptual = generator, perceptual
        self.steps, self.lr = int(steps), float(lr)
        self.lambda_mse, self.lpips_weight = float(lambda_mse), float(lpips_weight)
        self.lr_rampup, self.lr_rampdown = lr_rampup, lr_rampdown
        self.cache_dir = Path(cache_dir) if cache_dir else None
        self.last_losses: torch.Tensor | None = None
        self._generator_digest: str | None = None

    def per_slice_loss(self, images: torch.Tensor, ws: torch.Tensor) -> torch.Tensor:
        """The inversion objective of each slice, shape (B,)."""
        generated = to_unit(self.generator.synthesis(ws))
        loss = self.lambda_mse * (generated - images).pow(2).flatten(1).mean(1)
        if self.lpips_weight > 0:
            loss = loss + self.lpips_weight * self.perceptual(generated, images).flatten(1).mean(1)
        return loss

    def _prepare(self, images: torch.Tensor) -> torch.Tensor:
        size = tuple(self.generator.size)
        if tuple(images.shape[-2:]) != size:
            raise ValueError(f"Slices of {tuple(images.shape[-2:])} do not match the generator's {size}.")
        return images.detach().float()

    def invert(self, images: torch.Tensor, init: torch.Tensor | None = None, steps: int | None = None,
               record: bool = False):
        """W+ codes (B, L, D) of all slices at once. With `record`, also the (steps, B) loss history."""
        images = self._prepare(images)
        steps = self.steps if steps is None else int(steps)
        cached = self._cache_path(images, init, steps)
        if cached is not None and cached.is_file() and not record:
            state = torch.load(cached, map_location=images.device, weights_only=True)
            self.last_losses = state["losses"]
            return state["codes"]
        self.generator.requires_grad_(False)
        ws = (self.generator.mean_ws(images.shape[0]) if init is None else init.detach().clone()).to(images.device)
        ws.requires_grad_(True)
        optimizer = torch.optim.Adam([ws], lr=self.lr, betas=(0.9, 0.999))
        history = []
        with torch.enable_grad(), torch.autocast(images.device.type, enabled=False):
            for step in range(steps):
                for group in optimizer.param_groups:
                    group["lr"] = learning_rate(step, steps, self.lr, self.lr_rampup, self.lr_rampdown)
                losses = self.per_slice_loss(images, ws)
                optimizer.zero_grad(set_to_none=True)
                losses.sum().backward()  # slices are independent: each gets its own gradient
                optimizer.step()
                if record:
                    history.append(losses.detach())
            with torch.no_grad():
                self.last_losses = self.per_slice_loss(images, ws).detach()
        codes = ws.detach()
        if cached is not None:
            cached.parent.mkdir(parents=True, exist_ok=True)
            torch.save({"codes": codes.cpu(), "losses": self.last_losses.cpu()}, cached)
        return (codes, torch.stack(history)) if record else codes

    def invert_per_slice(self, images: torch.Tensor, steps: int | None = None) -> torch.Tensor:
        """The same optimisation one slice at a time (the reference, and the benchmark's baseline)."""
        codes, losses = [], []
        for image in images:
            codes.append(self.invert(image[None], steps=steps))
            losses.append(self.last_losses)
        self.last_losses = torch.cat(losses)
        return torch.cat(codes)

    __call__ = invert

    def _cache_path(self, images: torch.Tensor, init, steps: int) -> Path | None:
        if self.cache_dir is None or init is not None:
            return None
        if self._generator_digest is None:
            digest = hashlib.sha1()
            for tensor in self.generator.state_dict().values():
                digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
            self._generator_digest = digest.hexdigest()
        key = hashlib.sha1()
        key.update(images.cpu().contiguous().numpy().tobytes())
        key.update(f"{self._generator_digest}|{steps}|{self.lr}|{self.lambda_mse}|{self.lpips_weight}|"
                   f"{self.lr_rampup}|{self.lr_rampdown}|{getattr(self.perceptual, 'net', None)}".encode())
        return self.cache_dir / f"{key.hexdigest()}.pt"


def resize(images: torch.Tensor, size) -> torch.Tensor:
    """Area-downsampling or bilinear resizing of (B, C, H, W) to `size` (identity when equal)."""
    size = tuple(int(s) for s in size)
    if tuple(images.shape[-2:]) == size:
        return images
    if images.shape[-2] >= size[0] and images.shape[-1] >= size[1]:
        return F.interpolate(images, size=size, mode="area")
    return F.interpolate(images, size=size, mode="bilinear", align_corners=False)
