"""SAGAN / Brainomaly around the shared engine: the detector (`SaganMethod`), the healthy and
unlabeled training sets, the WGAN-GP training step and the label-free model selection (AUCp).

Images are [0, 1] slices in the pipeline; the GAN works at `model_size` (64, the paper's) in
[-1, 1] with the background kept at -1: the generator's output is used inside the brain only,
the input everywhere else. The anomaly map is |x - G(x)| / 2 on the [-1, 1] scale, which is
|x - G(x)| on the [0, 1] scale.
"""

from __future__ import annotations

import itertools
import logging
import os
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from monai.transforms import Compose, DeleteItemsd

from medanomaly.bundles.method import SliceAnomalyMethod
from medanomaly.bundles.model_info import model_info_file, read_model_info
from medanomaly.data import IMAGE, LABEL, MASK, load_datalist, preprocessing, random_axial_slices, resolve_datalist
from medanomaly.data.companion import companion_lesion_subjects, synthetic_provenance
from medanomaly.data.datalist import read_datalist
from medanomaly.data.transforms import lesion_balanced_axial_slices
from medanomaly.scoring import volume_score

logger = logging.getLogger(__name__)
CORRUPTED = "corrupted"
UNLABELED = "unlabeled"


# --------------------------------------------------------------------------- scales and sizes
def to_gan(x: torch.Tensor) -> torch.Tensor:
    return x * 2.0 - 1.0


def from_gan(x: torch.Tensor) -> torch.Tensor:
    return (x + 1.0) / 2.0


def resize(x: torch.Tensor, size: int | None, mask: bool = False) -> torch.Tensor:
    """`(B, C, H, W)` to `size` x `size` (area averaging down, bilinear up; masks: > 0.5 after area)."""
    if size is None or tuple(x.shape[-2:]) == (size, size):
        return x
    down = size < x.shape[-1]
    y = F.interpolate(x, size=(size, size), mode="area") if down else F.interpolate(
        x, size=(size, size), mode="bilinear", align_corners=False)
    return (y > 0.5).to(x.dtype) if mask else y


def generate(generator: torch.nn.Module, x: torch.Tensor, brain: torch.Tensor) -> torch.Tensor:
    """G(x) inside the brain, x outside it ([-1, 1] scale)."""
    return torch.where(brain > 0, generator(x), x)


# --------------------------------------------------------------------------- the detector
class SaganMethod(SliceAnomalyMethod):
    """Anomaly map |x - G(x)| / 2 ([-1, 1] scale) per slice. The slice is resized to `model_size`
    for the generator; the change G(x) - x is brought back to the slice's size, so the pseudo-healthy
    image keeps the input's detail where nothing changes."""

    def __init__(self, network: torch.nn.Module, model_size: int | None = 64, **smoothing):
        super().__init__(**smoothing)
        self.network, self.model_size = network, model_size

    def anomaly_and_reconstruction(self, image: torch.Tensor, mask: torch.Tensor):
        size = image.shape[-2:]
        x, brain = resize(image, self.model_size), resize(mask, self.model_size, mask=True)
        gx = to_gan(x)
        change = (generate(self.network, gx, brain) - gx) / 2.0  # [0, 1] scale
        if tuple(change.shape[-2:]) != tuple(size):
            change = F.interpolate(change, size=tuple(size), mode="bilinear", align_corners=False)
        pseudo_healthy = (image + change).clamp(0, 1)
        return change.abs(), pseudo_healthy


# --------------------------------------------------------------------------- data: healthy and unlabeled sets
def _datalist_path(datalist, contrast: str | None = None) -> Path:
    return resolve_datalist(datalist, contrast)


def semi_supervised_sets(datalist, healthy_key: str = "training", unlabeled_key: str | None = None,
                         lesion_key: str | None = None, anomaly_ratio: float = 0.6, healthy_fraction: float = 0.5,
                         seed: int = 0, contrast: str | None = None,
                         abnormal_slices: bool = False) -> tuple[list[dict], list[dict]]:
    """(healthy set, unlabeled set) for semi-supervised training.

    With `unlabeled_key` in the datalist, the unlabeled set is that split as it is and the healthy
    set the `healthy_key` split. Otherwise the `healthy_key` subjects are shuffled (seeded) and split:
    `healthy_fraction` of them form the healthy set, the rest the healthy part of the unlabeled set,
    to which lesion subjects are added so that they make up `anomaly_ratio` of it -- from the
    `lesion_key` split, or, for a synthetic cohort, from a companion synthetic cohort (another seed:
    never a validation or test subject). A synthetic preset is read in `contrast`, and the companion
    cohort rendered in the datalist's contrast.

    Lesion masks never reach the networks. With `abnormal_slices` the mixed-in lesion subjects keep
    theirs, only to choose slices through their lesions (`unlabeled_slices` drops it then), so
    that `anomaly_ratio` is the fraction of abnormal *images* in the unlabeled set, as the reference
    builds it; without, a lesion subject's random brain slice is abnormal only ~half the time.
    """
    path = _datalist_path(datalist, contrast)
    healthy = load_datalist(path, healthy_key)
    if unlabeled_key:
        return healthy, load_datalist(path, unlabeled_key)
    if not 0 <= anomaly_ratio < 1:
        raise ValueError(f"anomaly_ratio must be in [0, 1), got {anomaly_ratio}.")
    order = np.random.default_rng(seed).permutation(len(healthy))
    n_healthy = min(max(1, int(round(healthy_fraction * len(healthy)))), len(healthy) - 1) if len(healthy) > 1 else 1
    healthy_set = [healthy[i] for i in order[:n_healthy]]
    unlabeled_healthy = [healthy[i] for i in order[n_healthy:]] or healthy_set
    n_lesion = int(round(anomaly_ratio / (1 - anomaly_ratio) * len(unlabeled_healthy)))
    if lesion_key:
        lesions = load_datalist(path, lesion_key)
        if len(lesions) < n_lesion:
            logger.warning("Split '%s' has %d subjects; %d would give anomaly_ratio %.2f.", lesion_key, len(lesions),
                           n_lesion, anomaly_ratio)
        lesions = [lesions[i] for i in np.random.default_rng(seed + 1).permutation(len(lesions))[:n_lesion]]
    elif synthetic_provenance(path) is not None:
        lesions = companion_lesion_subjects(path, n_lesion, contrast=read_datalist(path).get("contrast") or contrast)
    else:
        raise ValueError(f"Datalist {path} gives no unlabeled data: name a split of unlabeled subjects "
                         "(--unlabeled_key) or one of lesion subjects to mix in (--lesion_key).")
    if not abnormal_slices:
        lesions = [{k: v for k, v in item.items() if k != LABEL} for item in lesions]  # unlabeled: no masks
    logger.info("Healthy set: %d subjects; unlabeled set: %d healthy + %d lesion subjects (ratio %.2f).",
                len(healthy_set), len(unlabeled_healthy), len(lesions),
                len(lesions) / max(1, len(lesions) + len(unlabeled_healthy)))
    return healthy_set, unlabeled_healthy + lesions


def unlabeled_slices(preprocessing_kwargs: dict, slices_per_volume: int, abnormal_slices: bool):
    """Transform chain of the unlabeled set: random brain slices; with `abnormal_slices` a lesion
    subject's slices go through its lesion (its mask is dropped right after choosing them)."""
    if not abnormal_slices:
        return Compose(list(preprocessing(**preprocessing_kwargs).transforms)
                       + list(random_axial_slices(slices_per_volume)))
    return Compose(list(preprocessing(**preprocessing_kwargs, label=True).transforms)
                   + list(lesion_balanced_axial_slices(slices_per_volume, lesion_weight=1.0, brain_weight=0.0))
                   + [DeleteItemsd(keys=LABEL)])


def training_sets(datalist, **kwargs) -> dict:
    healthy, unlabeled = semi_supervised_sets(datalist, **kwargs)
    return {"healthy": healthy, "unlabeled": unlabeled}


def validation_items(datalist, healthy_keys: str | Sequence[str] = "validation_healthy",
                     unlabeled_keys: str | Sequence[str] = "validation_lesion",
                     contrast: str | None = None) -> list[dict]:
    """Validation volumes for AUCp: healthy ones (flag 0) and unlabeled ones (flag 1); labels are dropped."""
    path = _datalist_path(datalist, contrast)
    items = []
    for flag, keys in ((0, healthy_keys), (1, unlabeled_keys)):
        for key in [keys] if isinstance(keys, str) else keys:
            items += [{**{k: v for k, v in item.items() if k != "label"}, UNLABELED: flag}
                      for item in load_datalist(path, key)]
    return items


def infinite(loader):
    """Batches of `loader` without end (a new epoch, reshuffled, whenever one ends; a distributed
    training's DistributedSampler is told each pass's epoch, so that it reshuffles too)."""
    for epoch in itertools.count():
        if hasattr(getattr(loader, "sampler", None), "set_epoch"):
            loader.sampler.set_epoch(epoch)
        yield from loader


# --------------------------------------------------------------------------- WGAN-GP
def gradient_penalty(critic: torch.nn.Module, real: torch.Tensor, fake: torch.Tensor,
                     alpha: torch.Tensor | None = None) -> torch.Tensor:
    """mean over images of (||d sum(D(x_hat)) / d x_hat||_2 - 1)^2, x_hat = alpha real + (1 - alpha) fake."""
    if alpha is None:
        alpha = torch.rand(real.shape[0], 1, 1, 1, device=real.device, dtype=real.dtype)
    x_hat = (alpha * real.detach() + (1 - alpha) * fake.detach()).requires_grad_(True)
    scores = critic(x_hat)
    grad = torch.autograd.grad(scores, x_hat, grad_outputs=torch.ones_like(scores), create_graph=True)[0]
    return ((grad.flatten(1).norm(2, dim=1) - 1.0) ** 2).mean()


def critic_loss(critic, real, fake, lambda_gp: float = 10.0, alpha=None) -> tuple[torch.Tensor, dict]:
    """-D(real) + D(fake) + lambda_gp * GP (patch scores averaged)."""
    d_real, d_fake = critic(real).mean(), critic(fake.detach()).mean()
    gp = gradient_penalty(critic, real, fake, alpha)
    loss = -d_real + d_fake + lambda_gp * gp
    return loss, {"d_loss": loss, "d_real": d_real, "d_fake": d_fake, "gp": gp}


def generator_loss(generator, critic, healthy, healthy_brain, unlabeled, unlabeled_brain, corrupted=None,
                   lambda_id: float = 1.0, lambda_fpi: float = 1.0) -> tuple[torch.Tensor, dict]:
    """-D(G(x_u)) + lambda_id L1(x_n, G(x_n)) + lambda_fpi MSE(G(FPI(x_n)), x_n) (the last term only
    with `corrupted` and lambda_fpi > 0: SAGAN; Brainomaly has none)."""
    adversarial = -critic(generate(generator, unlabeled, unlabeled_brain)).mean()
    identity = F.l1_loss(generate(generator, healthy, healthy_brain), healthy)
    loss, parts = adversarial + lambda_id * identity, {"g_adv": adversarial, "g_id": identity}
    if corrupted is not None and lambda_fpi:
        restore = F.mse_loss(generate(generator, corrupted, healthy_brain), healthy)
        loss, parts["g_fpi"] = loss + lambda_fpi * restore, restore
    parts["g_loss"] = loss
    return loss, parts


def _slices(batch: Mapping, key: str, device, size: int | None, mask: bool = False) -> torch.Tensor:
    t = batch[key]
    t = t.as_tensor() if hasattr(t, "as_tensor") else torch.as_tensor(t)
    return resize(t.reshape(-1, *t.shape[-3:]).to(device).float(), size, mask=mask)


class SaganStep:
    """One iteration of the GAN loop as an ignite `iteration_update` of MONAI's SupervisedTrainer
    (engine.network: the generator, engine.optimizer: its Adam): a critic step on every iteration
    (real: healthy slices; fake: G(unlabeled slices)), a generator step on every `n_critic`-th one
    (the reference's schedule: `num_iterations` counts critic steps). The trainer's data loader gives
    the healthy slices (with their FPI copies); the unlabeled slices come from `unlabeled_loader`."""

    def __init__(self, critic: torch.nn.Module, critic_optimizer: torch.optim.Optimizer, unlabeled_loader,
                 n_critic: int = 2, lambda_gp: float = 10.0, lambda_id: float = 1.0, lambda_fpi: float = 1.0,
                 model_size: int | None = 64):
        self.critic, self.critic_optimizer, self.unlabeled_loader = critic, critic_optimizer, unlabeled_loader
        self.n_critic, self.lambda_gp, self.lambda_id, self.lambda_fpi = n_critic, lambda_gp, lambda_id, lambda_fpi
        self.model_size = model_size
        self._unlabeled = None
        self.last_generator: dict = {}

    def next_unlabeled(self):
        if self._unlabeled is None:
            self._unlabeled = infinite(self.unlabeled_loader)
        return next(self._unlabeled)

    def prepare(self, batch: Mapping, unlabeled: Mapping, device) -> dict:
        size = self.model_size
        data = {"healthy": to_gan(_slices(batch, IMAGE, device, size)),
                "healthy_brain": _slices(batch, MASK, device, size, mask=True),
                "unlabeled": to_gan(_slices(unlabeled, IMAGE, device, size)),
                "unlabeled_brain": _slices(unlabeled, MASK, device, size, mask=True)}
        if CORRUPTED in batch and self.lambda_fpi:
            data["corrupted"] = to_gan(_slices(batch, CORRUPTED, device, size))
        n = min(len(data["healthy"]), len(data["unlabeled"]))  # critic interpolation pairs one with one
        return {k: v[:n] for k, v in data.items()}

    def critic_step(self, generator, data: dict) -> dict:
        with torch.no_grad():
            fake = generate(generator, data["unlabeled"], data["unlabeled_brain"])
        loss, parts = critic_loss(self.critic, data["healthy"], fake, self.lambda_gp)
        self.critic_optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.critic_optimizer.step()
        return parts

    def generator_step(self, generator, optimizer, data: dict) -> dict:
        for p in self.critic.parameters():
            p.requires_grad_(False)
        try:
            loss, parts = generator_loss(generator, self.critic, data["healthy"], data["healthy_brain"],
                                         data["unlabeled"], data["unlabeled_brain"], data.get("corrupted"),
                                         self.lambda_id, self.lambda_fpi)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        finally:
            for p in self.critic.parameters():
                p.requires_grad_(True)
        return parts

    def __call__(self, engine, batchdata: Mapping) -> dict:
        generator = engine.network
        generator.train()
        self.critic.train()
        data = self.prepare(batchdata, self.next_unlabeled(), engine.state.device)
        parts = self.critic_step(generator, data)
        if engine.state.iteration % self.n_critic == 0:
            self.last_generator = self.generator_step(generator, engine.optimizer, data)
        out = {k: float(v.detach()) for k, v in {**parts, **self.last_generator}.items()}
        out["loss"] = out.get("g_loss", out["d_loss"])
        return out


# --------------------------------------------------------------------------- model selection (AUCp)
def prepare_aucp_batch(batchdata: Mapping, device=None, non_blocking: bool = False, **kwargs):
    """(image ++ brain mask, healthy 0 / unlabeled 1) of validation volumes."""
    inputs = torch.cat([batchdata[IMAGE], batchdata[MASK]], dim=1).to(device=device, non_blocking=non_blocking)
    flag = torch.as_tensor(batchdata[UNLABELED]).reshape(-1, 1).float().to(device)
    return inputs, flag


class SubjectScores:
    """ROCAUC output transform: (subject score, unlabeled flag) per validation volume -- AUCp. The score
    reduces the anomaly map over the brain (`medanomaly.scoring.volume_score`): `mean` (the paper) or
    `top_percentile` (mean of the top 1 %)."""

    def __init__(self, reduction: str = "mean", percentile: float = 99.0):
        self.reduction, self.percentile = reduction, percentile

    def __call__(self, output) -> tuple[list, list]:
        scores, flags = [], []
        for item in output:
            brain = item["image"][1:2] > 0.5
            scores.append(volume_score(item["pred"][0:1], brain, self.reduction, self.percentile).reshape(1))
            flags.append(torch.as_tensor(item["label"]).reshape(1))
        return scores, flags


# --------------------------------------------------------------------------- shipped weights of each variant
def variant_name(model: str = "sagan", positional_encoding: str | None = "binary", generator: str = "cnn") -> str:
    """sagan, brainomaly, sagan-<encoding>, sagan-swin, sagan-swin-<encoding>."""
    if model == "brainomaly":
        return "brainomaly"
    parts = ["sagan"] + (["swin"] if generator == "swin" else []) + (
        [] if positional_encoding == "binary" else [str(positional_encoding)])
    return "-".join(parts)


def shipped_model_dir(bundle_root: str | os.PathLike, name: str) -> str:
    """models/ for the default sagan weights, models/<variant>/ for the others (e.g. models/brainomaly)."""
    root = Path(bundle_root) / "models"
    return str(root if name == "sagan" else root / name)


SWITCHES = ("model", "positional_encoding", "generator")
# switches of the network's function that the weights record; weights older than one used its first value
RECORDED = {**{name: None for name in SWITCHES}, "map_base": "input"}


def recorded_switches(model_dir: str | os.PathLike | None) -> dict:
    """The switches (model, positional_encoding, generator, map_base) recorded with the weights in model_dir."""
    if not model_dir or not model_info_file(model_dir).is_file():
        return {}
    info = read_model_info(model_dir)
    return {k: info.get(k, before) for k, before in RECORDED.items() if k in info or before is not None}


def generator_for_weights(model_dir: str | os.PathLike | None = None, **settings) -> torch.nn.Module:
    """`build_generator(**settings)`, with the switches the weights in `model_dir` were trained with
    taking precedence (model_info.json): weights of one variant cannot load into another's network.
    The chosen variant's name is the generator's `variant` attribute."""
    from scripts.networks import build_generator

    recorded = recorded_switches(model_dir)
    for key, value in recorded.items():
        if key in settings and settings[key] != value:
            logger.warning("The weights in %s were trained with %s=%s (the config says %s): using %s.",
                           model_dir, key, value, settings[key], value)
    settings.update(recorded)
    if settings.get("model") == "brainomaly":
        settings.update(attention_gates=False, fusion=False)
    generator = build_generator(**settings)
    generator.variant = variant_name(*(settings.get(k, d) for k, d in zip(SWITCHES, ("sagan", "binary", "cnn"))))
    return generator
