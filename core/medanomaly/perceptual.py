"""A perceptual backbone that means something without ImageNet weights.

LPIPS (PHANES' masks and maps, SCRPS' inversion) and VGG feature scores (SCRPS' A_per, PHANES'
style and perceptual losses) rely on an ImageNet-trained network, which cannot be downloaded
here. The `medanomaly` backbone replaces it: the encoder of a small 2D UNet (MONAI's
`BasicUNet`) trained on **healthy training slices only** to *undo synthetic anomalies*: its input
is a slice corrupted by the "many tasks" anomalies of `medanomaly.anomalies` plus Gaussian noise
of random strength, its target the anomaly itself (corrupted minus clean, without the noise),
with a consistency term that asks the encoder's (unit-normalised) features of the noisy slice to
equal those of the same slice without noise. So the encoder responds to local structure that
does not belong to a healthy slice and ignores noise: the property that makes a perceptual
distance worth having (tested on held-back slices, with anomalies of another kind than those it
was trained on; docs/PERCEPTUAL.md).

`FeatureDistance` is the spatial LPIPS formula with equal channel weights (no learned linear
layers, which need human judgements): per encoder level, unit-normalise the features over
channels, take the squared difference, average over channels, upsample, sum the levels.

Train it with `python -m medanomaly.perceptual --datalist demo --output weights.pt`; the
committed weights (`weights/perceptual_backbone.pt`, trained that way on the demo cohort in
T1w, T2w and FLAIR) are what `backbone: medanomaly` loads.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

logger = logging.getLogger(__name__)

BACKBONES = ("imagenet", "medanomaly", "random")
WEIGHTS_FILE = Path(__file__).resolve().parent / "weights" / "perceptual_backbone.pt"
DEFAULT_FEATURES = (16, 32, 64, 128, 128, 16)
# the anomalies it learns to undo: every task that needs no second image domain
TRAINING_TASKS = ("poisson_same", "sink", "source", "intensity")


def check_backbone(backbone: str) -> str:
    if backbone not in BACKBONES:
        raise ValueError(f"perceptual backbone must be one of {', '.join(BACKBONES)}, got {backbone!r}.")
    return backbone


def restoration_unet(features: Sequence[int] = DEFAULT_FEATURES) -> nn.Module:
    """The network trained to undo synthetic anomalies: MONAI's 2D BasicUNet, 1 channel in and out."""
    from monai.networks.nets import BasicUNet

    return BasicUNet(spatial_dims=2, in_channels=1, out_channels=1, features=tuple(features))


def encoder_levels(levels: Sequence[nn.Module], x: torch.Tensor) -> list[torch.Tensor]:
    """The outputs of the encoder `levels` (conv_0, down_1 .. down_4 of a BasicUNet) on `x`."""
    out, h = [], x
    for level in levels:
        h = level(h)
        out.append(h)
    return out


def _levels_of(unet: nn.Module) -> list[nn.Module]:
    return [unet.conv_0, unet.down_1, unet.down_2, unet.down_3, unet.down_4]


class AnomalyFeatures(nn.Module):
    """The five encoder levels (full, 1/2, ..., 1/16 resolution) of a `restoration_unet`, frozen."""

    def __init__(self, unet: nn.Module):
        super().__init__()
        self.levels = nn.ModuleList(_levels_of(unet))
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> "AnomalyFeatures":
        return super().train(False)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        return encoder_levels(self.levels, x)


class PerceptualWeightsMissing(FileNotFoundError):
    """Weights of a perceptual backbone are not on this machine: ImageNet weights not in the torch
    hub cache (nothing is downloaded), or the medanomaly backbone's file missing."""


def load_backbone(path: str | Path | None = None, device=None) -> AnomalyFeatures:
    """The trained `medanomaly` backbone from `path` (default: the committed weights file)."""
    path = Path(path) if path is not None else WEIGHTS_FILE
    if not path.is_file():
        raise PerceptualWeightsMissing(
            f"The medanomaly perceptual backbone weights are not at '{path}'. Train them with "
            "`python -m medanomaly.perceptual --datalist <cohort> --output <file>` or reinstall the package.")
    saved = torch.load(path, map_location="cpu", weights_only=True)
    unet = restoration_unet(saved["features"])
    unet.load_state_dict(saved["model"])
    return AnomalyFeatures(unet).to(device or "cpu")


def random_backbone(seed: int = 0, features: Sequence[int] = DEFAULT_FEATURES) -> AnomalyFeatures:
    """The same encoder, randomly initialised (seeded): the explicit control for `medanomaly`."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return AnomalyFeatures(restoration_unet(features))


def _unit(f: torch.Tensor, eps: float = 1e-10) -> torch.Tensor:
    return f / (f.pow(2).sum(1, keepdim=True).sqrt() + eps)


class FeatureDistance(nn.Module):
    """Spatial perceptual distance ``(B, 1, H, W)`` between two batches of slices in [0, 1]: the
    LPIPS formula over the levels of `features` with equal channel weights."""

    def __init__(self, features: AnomalyFeatures):
        super().__init__()
        self.features = features
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> "FeatureDistance":
        return super().train(False)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        size = tuple(x.shape[-2:])
        n = x.shape[0]
        levels = self.features(torch.cat([x, y]).float())
        total = torch.zeros((n, 1) + size, device=x.device)
        for f in levels:
            d = (_unit(f[:n]) - _unit(f[n:])).pow(2).mean(1, keepdim=True)
            total = total + F.interpolate(d, size=size, mode="bilinear", align_corners=False)
        return total


# --------------------------------------------------------------------------- the property that matters
def lesion_like(image: torch.Tensor, brain: torch.Tensor, rng: torch.Generator) -> torch.Tensor:
    """`image` (1, H, W) with one soft-edged ellipse inside the brain whose intensity is raised or
    lowered by 0.15-0.4 (a hyper- or hypointense lesion), clipped to [0, 1]."""
    h, w = image.shape[-2:]
    inside = torch.nonzero(brain[0] > 0)
    cy, cx = inside[torch.randint(len(inside), (1,), generator=rng)][0].tolist()
    ry, rx = (3 + 7 * torch.rand(2, generator=rng)).tolist()
    angle = float(torch.rand(1, generator=rng)) * torch.pi
    yy, xx = torch.meshgrid(torch.arange(h, dtype=torch.float32) - cy, torch.arange(w, dtype=torch.float32) - cx,
                            indexing="ij")
    u = (xx * torch.cos(torch.tensor(angle)) + yy * torch.sin(torch.tensor(angle))) / rx
    v = (-xx * torch.sin(torch.tensor(angle)) + yy * torch.cos(torch.tensor(angle))) / ry
    blob = torch.sigmoid(4 * (1 - (u * u + v * v)))  # 1 inside, soft edge
    strength = 0.15 + 0.25 * float(torch.rand(1, generator=rng))
    contrast = strength * (1 if float(torch.rand(1, generator=rng)) < 0.5 else -1)
    return (image + contrast * blob * (brain > 0)).clamp(0, 1)


def held_back_slices(datalists: Sequence[str | Path], keys: str = "validation_healthy", per_volume: int = 6,
                     image_size: int = 64, pixdim: float = 3.0) -> tuple[torch.Tensor, torch.Tensor]:
    """(images, brains) `(N, 1, H, W)`: `per_volume` axial slices through the middle 30-70 % of
    every `keys` volume of the `datalists` (e.g. one per contrast), preprocessed as the backbone's
    training."""
    from medanomaly.data import datalist_items, preprocessing

    chain = preprocessing(pixdim=[pixdim] * 3, image_size=[image_size] * 2)
    images, brains = [], []
    for datalist in datalists:
        for item in datalist_items(datalist, keys):
            data = chain(item)
            depth = data["image"].shape[-1]
            for k in torch.linspace(0.3 * depth, 0.7 * depth, per_volume).long().tolist():
                images.append(torch.as_tensor(data["image"][..., k]).float())
                brains.append(torch.as_tensor(data["mask"][..., k]).float())
    return torch.stack(images), torch.stack(brains)


def separation(distance: nn.Module, images: torch.Tensor, brains: torch.Tensor, seed: int = 0) -> dict:
    """How a distance separates lesion-like anomalies from noise of equal MSE (`anomaly_vs_noise`):
    the fraction of slices where the anomaly is farther and the median distance ratio."""
    far_anomaly, far_noise = anomaly_vs_noise(distance, images, brains, seed)
    return {"slices": len(images), "anomaly_farther": float((far_anomaly > far_noise).float().mean()),
            "median_ratio": float((far_anomaly / far_noise.clamp_min(1e-12)).median())}


def anomaly_vs_noise(distance: nn.Module, images: torch.Tensor, brains: torch.Tensor, seed: int = 0):
    """For each healthy slice (N, 1, H, W): the distance (mean of the map over the brain) to its
    twin with a `lesion_like` anomaly and to its twin with Gaussian noise in the brain of the
    same mean squared error. Returns the two (N,) tensors."""
    rng = torch.Generator().manual_seed(seed)
    anomalous = torch.stack([lesion_like(x, b, rng) for x, b in zip(images, brains)])
    mse = (anomalous - images).pow(2).flatten(1).mean(1)
    inside = (brains > 0).float()
    noise = torch.randn(images.shape, generator=rng) * inside
    noise = noise * (mse / noise.pow(2).flatten(1).mean(1).clamp_min(1e-12)).sqrt().view(-1, 1, 1, 1)
    noisy = images + noise  # not clipped: the MSE stays equal
    with torch.no_grad():
        far = [(distance(images, other) * inside).flatten(1).sum(1) / inside.flatten(1).sum(1).clamp_min(1)
               for other in (anomalous, noisy)]
    return far[0], far[1]


# --------------------------------------------------------------------------- training
def _noisy(corrupted: torch.Tensor, brain: torch.Tensor, max_noise: float, generator: torch.Generator) -> torch.Tensor:
    """Gaussian noise of a random strength (0 .. max_noise per slice) inside the brain."""
    strength = max_noise * torch.rand((corrupted.shape[0], 1, 1, 1), generator=generator)
    return corrupted + strength * torch.randn(corrupted.shape, generator=generator) * brain


def training_loader(datalist: str, contrasts: Sequence[str], image_size: int = 64, pixdim: float = 3.0,
                    slices_per_volume: int = 8, batch_volumes: int = 2, seed: int = 0, num_workers: int = 1):
    """Healthy `training` slices of every contrast, each with synthetic anomalies (`TRAINING_TASKS`)."""
    import monai

    from medanomaly.anomalies import RandSyntheticAnomalyd
    from medanomaly.data import PersistentCacheDataset, datalist_items, preprocessing, random_axial_slices

    items = [item for contrast in contrasts for item in datalist_items(datalist, "training", contrast)]
    corruption = RandSyntheticAnomalyd(tasks=TRAINING_TASKS, clean_fraction=0.2, max_anomalies=4)
    transform = monai.transforms.Compose(
        list(preprocessing(pixdim=[pixdim] * 3, image_size=[image_size] * 2).transforms)
        + random_axial_slices(slices_per_volume) + [corruption])
    transform.set_random_state(seed)
    dataset = PersistentCacheDataset(items, transform, cache_rate=1.0, num_workers=num_workers, progress=True)
    return monai.data.DataLoader(dataset, batch_size=batch_volumes, shuffle=True, num_workers=num_workers), len(items)


def feature_consistency(encoder, noisy: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean over levels of the squared distance between the unit-normalised features of `noisy`
    and those of `target` (no gradient through the target's features)."""
    with torch.no_grad():
        reference = [_unit(f) for f in encoder(target)]
    levels = encoder(noisy)
    return sum((_unit(f) - r).pow(2).sum(1).mean() for f, r in zip(levels, reference)) / len(levels)


def train_backbone(datalist: str, output: str | Path, contrasts: Sequence[str] = ("T1w", "T2w", "FLAIR"),
                   max_seconds: float = 600.0, max_iterations: int = 20000, learning_rate: float = 1e-3,
                   max_noise: float = 0.1, consistency_weight: float = 1.0, image_size: int = 64,
                   pixdim: float = 3.0, seed: int = 0, features: Sequence[int] = DEFAULT_FEATURES) -> dict:
    """Trains a `restoration_unet` to predict (corrupted - clean) from the noisy corrupted slice
    (MSE relative to the batch's anomaly energy: 1 for predicting no anomaly) plus `consistency_weight` x
    `feature_consistency` of its encoder between the noisy and the noise-free corrupted slice, on `image_size` px
    axial slices at `pixdim` mm (default: the 64 px, 3 mm geometry of the PHANES and SCRPS demos; the network is fully
    convolutional and runs at any size). Saves the weights and a record of the run to `output`."""
    from tqdm import tqdm

    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    loader, n_volumes = training_loader(datalist, contrasts, image_size, pixdim, seed=seed)
    unet = restoration_unet(features)
    levels = _levels_of(unet)

    def encoder(x):
        return encoder_levels(levels, x)

    optimizer = torch.optim.AdamW(unet.parameters(), lr=learning_rate, weight_decay=1e-4)
    losses, start, iteration = [], time.monotonic(), 0
    progress = tqdm(total=max_iterations, desc="perceptual backbone", unit="it")
    while iteration < max_iterations and time.monotonic() - start < max_seconds:
        for batch in loader:
            clean, corrupted, brain = batch["image"], batch["corrupted"], batch["mask"]
            noisy = _noisy(corrupted, (brain > 0).float(), max_noise, generator)
            anomaly = corrupted - clean
            restoration = F.mse_loss(unet(noisy), anomaly) / anomaly.pow(2).mean().clamp_min(1e-5)
            loss = restoration + consistency_weight * feature_consistency(encoder, noisy, corrupted)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            losses.append(float(loss.detach()))
            iteration += 1
            progress.update(1)
            progress.set_postfix(loss=f"{sum(losses[-50:]) / len(losses[-50:]):.4f}")
            if iteration >= max_iterations or time.monotonic() - start >= max_seconds:
                break
    progress.close()
    record = {"datalist": str(datalist), "contrasts": list(contrasts), "training_volumes": n_volumes,
              "image_size": image_size, "pixdim": pixdim,
              "iterations": iteration, "seconds": round(time.monotonic() - start, 1), "tasks": list(TRAINING_TASKS),
              "max_noise": max_noise, "consistency_weight": consistency_weight, "learning_rate": learning_rate,
              "seed": seed,
              "loss_first_50": sum(losses[:50]) / max(1, len(losses[:50])),
              "loss_last_50": sum(losses[-50:]) / max(1, len(losses[-50:]))}
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"model": unet.state_dict(), "features": list(features), "record": record}, output)
    output.with_suffix(".json").write_text(json.dumps(record, indent=2) + "\n")
    logger.info("perceptual backbone: %d iterations in %.0f s, loss %.5f -> %.5f; saved %s", iteration,
                record["seconds"], record["loss_first_50"], record["loss_last_50"], output)
    return record


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m medanomaly.perceptual", description=train_backbone.__doc__)
    parser.add_argument("--datalist", default="demo", help="a synthetic preset or a datalist JSON (healthy 'training')")
    parser.add_argument("--contrasts", nargs="+", default=["T1w", "T2w", "FLAIR"])
    parser.add_argument("--output", default=str(WEIGHTS_FILE))
    parser.add_argument("--max-seconds", type=float, default=600.0)
    parser.add_argument("--max-iterations", type=int, default=20000)
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--pixdim", type=float, default=3.0)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    train_backbone(args.datalist, args.output, args.contrasts, args.max_seconds, args.max_iterations,
                   image_size=args.image_size, pixdim=args.pixdim, seed=args.seed)


if __name__ == "__main__":
    main()
