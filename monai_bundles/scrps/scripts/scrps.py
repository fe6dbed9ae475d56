"""SCRPS detector and repository building: invert each slice to W+, retrieve healthy codes from
the latent repository (coarse-to-fine), combine them, swap in the test code's first L2 layers,
generate the pseudo-healthy slice and score the residual (perceptual score A_per, or |x - G|)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Callable, Sequence

import torch
from tqdm import tqdm

from medanomaly import scoring
from medanomaly.bundles.distributed import gather_in_order, is_main_process, rank, world_size
from medanomaly.bundles.method import SliceAnomalyMethod
from medanomaly.bundles.model_info import update_model_info
from medanomaly.data import IMAGE, MASK
from medanomaly.latent import REPOSITORY_FILE, LatentRepository, select_fraction

from scripts.inversion import LatentInverter, resize
from scripts.stylegan2 import to_unit

logger = logging.getLogger(__name__)


class SCRPSMethod(SliceAnomalyMethod):
    """Anomaly map and pseudo-healthy image of (B, 1, H, W) slices in [0, 1].

    Slices are resized to the generator's size for inversion (identity at paper scale); the
    pseudo-healthy slice comes back at the image size. `score`: "perceptual" (A_per, needs a
    `medanomaly.scoring.FeatureResidualMap`) or "residual" (|x - pseudo-healthy|).
    """

    def __init__(self, generator: torch.nn.Module, repository: LatentRepository, inverter: LatentInverter,
                 scorer: torch.nn.Module | None = None, score: str = "perceptual", l1: int = 6, k1: int = 100,
                 k2: int = 20, l2: int = 9, coarse_to_fine: bool = True, **smoothing):
        super().__init__(**smoothing)
        if score not in ("perceptual", "residual"):
            raise ValueError(f"score must be 'perceptual' or 'residual', got {score!r}.")
        if score == "perceptual" and scorer is None:
            raise ValueError("The perceptual score needs a scorer (medanomaly.scoring.FeatureResidualMap).")
        if repository.num_layers != generator.num_ws:
            raise ValueError(f"The repository holds codes of {repository.num_layers} layers, the generator needs "
                             f"{generator.num_ws}: rebuild the repository for these weights.")
        self.generator, self.repository, self.inverter, self.scorer = generator, repository, inverter, scorer
        self.score, self.l1, self.k1, self.k2, self.l2 = score, l1, k1, k2, l2
        self.coarse_to_fine = coarse_to_fine

    def pseudo_healthy_codes(self, codes: torch.Tensor) -> torch.Tensor:
        return self.repository.restore(codes, self.l1, self.k1, self.k2, self.l2, self.coarse_to_fine)

    def anomaly_and_reconstruction(self, image: torch.Tensor, mask: torch.Tensor):
        codes = self.inverter(resize(image, self.generator.size))
        with torch.no_grad():
            generated = to_unit(self.generator.synthesis(self.pseudo_healthy_codes(codes))).clamp(0, 1)
            reconstruction = resize(generated, image.shape[-2:]).clamp(0, 1)
            if self.score == "perceptual":
                anomaly = self.scorer(image, reconstruction)
            else:
                anomaly = scoring.residual_map(image, reconstruction)
        return anomaly, reconstruction


def load_generator(generator: torch.nn.Module, model_dir: str | Path, device=None) -> torch.nn.Module:
    """The EMA generator's weights from `model_dir/model.pt`, frozen, in eval mode."""
    from medanomaly.bundles.weights import load_weights

    generator = load_weights(generator, model_dir, device).eval()
    return generator.requires_grad_(False)


def brain_slices(mask: torch.Tensor, min_brain_fraction: float = 0.05) -> list[int]:
    """Axial slices (last axis of a (1, H, W, Z) mask) whose brain covers at least this fraction."""
    area = (mask[0] > 0.5).flatten(0, 1).float().mean(0)
    return [int(z) for z in torch.nonzero(area >= min_brain_fraction).flatten()]


def build_repository(inverter: LatentInverter, data: Sequence[dict], transform: Callable, model_dir: str | Path,
                     fraction: float = 0.05, seed: int = 0, batch_size: int = 64, min_brain_fraction: float = 0.05,
                     device=None, filename: str = REPOSITORY_FILE) -> LatentRepository:
    """Inverts a random `fraction` of the brain slices of `data` (healthy training volumes) and
    saves the codes as `model_dir/repository.pt` (records its size in model_info.json). Under
    torchrun (configs/multi_gpu_build_repository.yaml) rank r inverts the batches r, r + N, ... and
    rank 0 saves every rank's codes in the order of one process (the same batches: the same codes)."""
    generator = inverter.generator
    device = device or next(generator.parameters()).device
    volumes, candidates = [], []
    for item in tqdm(data, desc="loading training volumes"):
        d = transform(item)
        image = d[IMAGE].as_tensor() if hasattr(d[IMAGE], "as_tensor") else d[IMAGE]
        volumes.append((str(item.get("subject", len(volumes))), image))
        candidates += [(len(volumes) - 1, z) for z in brain_slices(d[MASK], min_brain_fraction)]
    chosen = [candidates[i] for i in select_fraction(len(candidates), fraction, seed)]
    logger.info("Latent repository: inverting %d of %d brain slices of %d volumes.", len(chosen), len(candidates),
                len(volumes))
    inverted = []  # (codes, losses, sources) of each batch of this process
    starts = range(0, len(chosen), batch_size)[rank()::world_size()]
    for start in tqdm(starts, desc="inverting repository slices", disable=not is_main_process()):
        batch = chosen[start:start + batch_size]
        images = torch.stack([volumes[v][1][..., z] for v, z in batch]).to(device)  # (b, 1, H, W)
        inverted.append((inverter(resize(images, generator.size)).cpu(), inverter.last_losses.cpu(),
                         [f"{volumes[v][0]}:{z}" for v, z in batch]))
    codes, losses, batch_sources = zip(*gather_in_order(inverted))
    sources = [source for names in batch_sources for source in names]
    info = {"fraction": fraction, "seed": seed, "candidate_slices": len(candidates), "volumes": len(volumes),
            "inversion_steps": inverter.steps, "lambda_mse": inverter.lambda_mse, "lpips_weight": inverter.lpips_weight,
            "mean_inversion_loss": float(torch.cat(losses).mean())}
    repository = LatentRepository(torch.cat(codes), sources, info)
    if not is_main_process():
        return repository
    path = repository.save(Path(model_dir) / filename)
    update_model_info(model_dir, repository_size=len(repository), repository=info)
    logger.info("Saved %d codes to %s (mean inversion loss %.4f).", len(repository), path, info["mean_inversion_loss"])
    return repository
