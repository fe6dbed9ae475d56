"""Image-conditioned diffusion for anomaly detection (Baugh et al.): a DDPM learns
p(clean slice | corrupted slice) from healthy slices corrupted by the "many tasks" synthetic
anomalies (`medanomaly.anomalies`); at test time it samples a pseudo-healthy slice
conditioned on the scan's slice, and 1 - SSIM between the two is the anomaly map.

This module holds what the configs wire around `scripts.diffusion`: the detector the shared
inferer runs (`ConditionedDiffusionMethod`, one model or a fold ensemble), loading the fold
models, per-volume seeding, the "other source" of the Poisson task and the fixed validation
pairs.
"""

from __future__ import annotations

import copy
import re
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
from ignite.engine import Engine, Events

from medanomaly import scoring
from medanomaly.anomalies import smooth_noise
from medanomaly.bundles.method import SliceAnomalyMethod
from medanomaly.bundles.weights import load_weights

from scripts.diffusion import make_scheduler, sample

_FOLD_FILE = re.compile(r"^model_fold(\d+)\.pt$")


class ConditionedDiffusionMethod(SliceAnomalyMethod):
    """Pseudo-healthy slice = a sample of the diffusion model conditioned on the slice;
    anomaly map = 1 - SSIM(slice, sample) (11 x 11 Gaussian window, sigma 1.5).

    With several `networks` (the fold models of an ensemble) each draws its own sample; the
    maps and the samples are averaged. `ssim_max_val` is SSIM's data range: 1 is correct
    for images in [0, 1]; 255 reproduces the reference code. Noise comes from a generator
    seeded with `seed` at the start of every volume (`SeedPerVolume`), so a volume's result
    does not depend on what ran before it.
    """

    def __init__(self, networks: torch.nn.Module | Sequence[torch.nn.Module], sampler: str = "strided",
                 num_inference_steps: int | None = 50, num_train_timesteps: int = 1000, beta_start: float = 1e-4,
                 beta_end: float = 0.02, eta: float = 0.0, ssim_max_val: float = 1.0, seed: int = 0, **smoothing):
        super().__init__(**smoothing)
        networks = [networks] if isinstance(networks, torch.nn.Module) else list(networks)
        if not networks:
            raise ValueError("ConditionedDiffusionMethod needs at least one network.")
        self.networks = torch.nn.ModuleList(networks)
        self.scheduler = make_scheduler(sampler, num_inference_steps, num_train_timesteps, beta_start, beta_end)
        self.eta, self.ssim_max_val, self.seed = eta, ssim_max_val, seed
        self.generator: torch.Generator | None = None

    def reseed(self) -> None:
        """Start the noise stream again from `seed` (at the next slices seen)."""
        self.generator = None

    def _generator(self, device: torch.device) -> torch.Generator:
        if self.generator is None or self.generator.device != device:
            self.generator = torch.Generator(device).manual_seed(self.seed)
        return self.generator

    def anomaly_and_reconstruction(self, image: torch.Tensor, mask: torch.Tensor):
        generator = self._generator(image.device)
        samples = torch.stack([sample(network, self.scheduler, image, generator, self.eta)
                               for network in self.networks])
        maps = torch.stack([scoring.ssim_map(image.float(), s.float(), data_range=self.ssim_max_val) for s in samples])
        return maps.mean(0), samples.mean(0)


class SeedPerVolume:
    """Evaluator handler: re-seeds the method's noise at the start of every volume."""

    def __init__(self, method: ConditionedDiffusionMethod):
        self.method = method

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.ITERATION_STARTED, lambda _: self.method.reseed())


def fold_files(model_dir: str | Path) -> list[Path]:
    """`model_fold{k}.pt` files of `model_dir`, by fold number."""
    files = [p for p in Path(model_dir).glob("model_fold*.pt") if _FOLD_FILE.match(p.name)]
    return sorted(files, key=lambda p: int(_FOLD_FILE.match(p.name).group(1)))


def load_networks(network: torch.nn.Module, model_dir: str | Path, device=None,
                  ensemble: bool = False) -> list[torch.nn.Module]:
    """The model(s) to sample with: `model_dir/model.pt`, or with `ensemble` every
    `model_dir/model_fold{k}.pt` (one copy of `network` each)."""
    if not ensemble:
        return [load_weights(network, model_dir, device)]
    files = fold_files(model_dir)
    if not files:
        raise FileNotFoundError(
            f"ensemble: true needs fold models model_fold0.pt, model_fold1.pt, ... in {model_dir}: train each fold "
            "(--fold k) and copy its models/model.pt there as model_fold{k}.pt, or set ensemble: false.")
    return [load_weights(copy.deepcopy(network), model_dir, device, filename=f.name) for f in files]


class TextureSource:
    """The "other source" of the Poisson task ("poisson_other"): smooth multi-octave random
    textures in [0, 1] of the slice size. The reference blends patches of other imaging
    domains (chest X-rays, fundus photographs); textures play that part without a second
    dataset. A callable rng -> image, as `medanomaly.anomalies.SyntheticAnomaly` takes it."""

    def __init__(self, size: Sequence[int] = (128, 128)):
        self.size = tuple(int(s) for s in size)

    def __call__(self, rng: np.random.Generator) -> np.ndarray:
        return smooth_noise(self.size, rng)


def fixed_samples(data: Sequence[dict], transform: Callable, seed: int = 0) -> list[dict]:
    """Applies a random transform chain once, seeded, to every item and keeps the results
    (flattening multi-sample outputs): the same held-out pairs at every validation."""
    transform.set_random_state(seed)
    samples: list[dict] = []
    for item in data:
        result = transform(item)
        samples += result if isinstance(result, list) else [result]
    return samples
