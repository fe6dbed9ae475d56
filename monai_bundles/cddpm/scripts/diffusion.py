"""The diffusion side of the image-conditioned DDPM: noise schedules, the Min-SNR weighted
training loss, one training / validation iteration for MONAI's engines, EMA weights and
sampling from pure noise conditioned on an image.

The network is MONAI's `DiffusionModelUNet` with 2 input channels (the noisy image ++ the
condition image) and 1 output channel (the predicted noise, epsilon). Images are used as
they come out of the pipeline, in [0, 1] with 0 outside the brain (as the reference code does).
"""

from __future__ import annotations

from typing import Mapping

import torch
import torch.nn.functional as F
from ignite.engine import Engine
from monai.engines.utils import IterationEvents
from monai.networks.schedulers import DDIMScheduler, DDPMScheduler
from monai.utils import CommonKeys as Keys
from torch.optim.swa_utils import AveragedModel

SAMPLERS = ("strided", "ddpm", "ddim")


def strided_timesteps(num_train_timesteps: int, steps: int) -> list[int]:
    """The timesteps of a strided ("respaced") DDPM, descending: `steps` values evenly spread
    over 0 .. T - 1 and rounded, as improved-diffusion's `space_timesteps(T, [steps])` chooses
    them (0, 20, 41, ..., 999 for 50 of 1000)."""
    if not 1 <= steps <= num_train_timesteps:
        raise ValueError(f"A strided DDPM takes 1 to {num_train_timesteps} steps (got {steps}).")
    if steps == 1:
        return [num_train_timesteps - 1]
    stride = (num_train_timesteps - 1) / (steps - 1)
    return sorted({round(i * stride) for i in range(steps)}, reverse=True)


class StridedDDPM:
    """Ancestral DDPM sampling over a subsequence of the training timesteps — the sampler of
    the cDDPM reference code (improved-diffusion's respacing, Nichol & Dhariwal 2021).

    Between consecutive kept timesteps t > s the step is a DDPM step of its own, with
    beta = 1 - alpha_bar_t / alpha_bar_s: x0 is predicted from epsilon and clipped to
    `clip`, then x_s is drawn from the Gaussian posterior q(x_s | x_t, x0) (its "fixed small"
    variance); the last step returns the posterior mean. Stepping through every timestep
    (steps = T) is the plain DDPM."""

    def __init__(self, alphas_cumprod: torch.Tensor, num_inference_steps: int, clip: tuple[float, float] = (-1.0, 1.0)):
        self.alphas_cumprod = alphas_cumprod.double()
        self.num_train_timesteps = len(alphas_cumprod)
        self.timesteps = torch.tensor(strided_timesteps(self.num_train_timesteps, int(num_inference_steps)))
        self.clip = clip

    def previous_timestep(self, t: int) -> int:
        later = self.timesteps[self.timesteps < t]
        return int(later[0]) if len(later) else -1

    def step(self, epsilon: torch.Tensor, t: int, x: torch.Tensor, generator: torch.Generator | None = None):
        """x_t -> (x_s, predicted x0) for the kept timestep s before t."""
        s = self.previous_timestep(t)
        alpha_bar_t = float(self.alphas_cumprod[t])
        alpha_bar_s = float(self.alphas_cumprod[s]) if s >= 0 else 1.0
        beta = 1.0 - alpha_bar_t / alpha_bar_s
        x0 = ((x - (1 - alpha_bar_t) ** 0.5 * epsilon) / alpha_bar_t ** 0.5).clamp(*self.clip)
        mean = (alpha_bar_s ** 0.5 * beta * x0 + (1 - beta) ** 0.5 * (1 - alpha_bar_s) * x) / (1 - alpha_bar_t)
        if s < 0:
            return mean, x0
        variance = beta * (1 - alpha_bar_s) / (1 - alpha_bar_t)
        noise = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
        return mean + variance ** 0.5 * noise, x0


def make_scheduler(sampler: str = "strided", num_inference_steps: int | None = None, num_train_timesteps: int = 1000,
                   beta_start: float = 1e-4, beta_end: float = 0.02):
    """A sampler over a linear beta schedule with epsilon prediction.

    "strided" (the reference code's): stochastic DDPM steps over `num_inference_steps`
    evenly spread timesteps, x0 clipped (`StridedDDPM`); with all T steps it is the plain
    DDPM. "ddpm" is MONAI's DDPMScheduler through all `num_train_timesteps` steps (the
    training schedule; MONAI's DDPM always steps t -> t - 1). "ddim" is MONAI's
    DDIMScheduler with `num_inference_steps` evenly spaced steps ending at t = 0 ("trailing"
    spacing: 999, 899, ..., 99 for 10 steps, consistent with the fixed stride of MONAI's DDIM
    step; the number must divide `num_train_timesteps`); deterministic with eta 0.
    """
    schedule = dict(num_train_timesteps=num_train_timesteps, schedule="linear_beta", beta_start=beta_start,
                    beta_end=beta_end, prediction_type="epsilon")
    steps = num_train_timesteps if num_inference_steps is None else int(num_inference_steps)
    if sampler == "strided":
        return StridedDDPM(DDPMScheduler(**schedule).alphas_cumprod, steps)
    if sampler == "ddpm":
        if steps != num_train_timesteps:
            raise ValueError(f"DDPM sampling steps through all {num_train_timesteps} timesteps (got "
                             f"num_inference_steps={steps}); for fewer steps use sampler 'strided'.")
        scheduler = DDPMScheduler(**schedule)
    elif sampler == "ddim":
        if not 1 <= steps <= num_train_timesteps or num_train_timesteps % steps:
            raise ValueError(f"DDIM needs a number of steps that divides {num_train_timesteps} (got {steps}): "
                             "e.g. 5, 10, 20, 50, 100, 250 or 1000.")
        scheduler = DDIMScheduler(**schedule, steps_offset=num_train_timesteps // steps - 1)
    else:
        raise ValueError(f"Unknown sampler '{sampler}': choose one of {', '.join(SAMPLERS)}.")
    scheduler.set_timesteps(steps)
    return scheduler


def min_snr_weights(alphas_cumprod: torch.Tensor, timesteps: torch.Tensor, gamma: float | None = 1.0) -> torch.Tensor:
    """Per-sample loss weights min(SNR(t), gamma) / SNR(t) of Min-SNR weighting (Hang et al.,
    ICCV 2023) for epsilon prediction, SNR(t) = alpha_bar_t / (1 - alpha_bar_t); all ones
    when `gamma` is None."""
    alpha_bar = alphas_cumprod.to(timesteps.device)[timesteps].float()
    if gamma is None:
        return torch.ones_like(alpha_bar)
    snr = alpha_bar / (1 - alpha_bar)
    return snr.clamp(max=gamma) / snr


def diffusion_loss(network: torch.nn.Module, scheduler, clean: torch.Tensor, condition: torch.Tensor,
                   noise_offset: float = 0.1, snr_gamma: float | None = 1.0,
                   generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample Min-SNR weighted epsilon-prediction losses `(B,)` and the predicted noise.

    The clean slices are noised at uniformly drawn timesteps with Gaussian noise plus a
    per-slice constant offset (`noise_offset` x N(0, 1), "offset noise"); the network sees
    the noisy slice ++ the condition and predicts that noise."""
    b, c = clean.shape[:2]
    noise = torch.randn(clean.shape, generator=generator, device=clean.device, dtype=clean.dtype)
    if noise_offset:
        noise = noise + noise_offset * torch.randn((b, c, 1, 1), generator=generator, device=clean.device,
                                                   dtype=clean.dtype)
    timesteps = torch.randint(0, scheduler.num_train_timesteps, (b,), generator=generator, device=clean.device)
    noisy = scheduler.add_noise(clean, noise, timesteps)
    predicted = network(torch.cat([noisy, condition], dim=1), timesteps=timesteps)
    per_sample = F.mse_loss(predicted.float(), noise.float(), reduction="none").mean(dim=tuple(range(1, clean.ndim)))
    return per_sample * min_snr_weights(scheduler.alphas_cumprod, timesteps, snr_gamma), predicted


def _finish(engine: Engine, output: dict) -> dict:
    """Hands the output to the engine as MONAI's own iterations do (MODEL_COMPLETED decollates it)."""
    engine.state.output = output
    engine.fire_event(IterationEvents.MODEL_COMPLETED)
    return engine.state.output


def _pair(batchdata: Mapping, engine: Engine, condition_key: str, target_key: str):
    device = engine.state.device
    return (batchdata[target_key].to(device, non_blocking=engine.non_blocking),
            batchdata[condition_key].to(device, non_blocking=engine.non_blocking))


class DiffusionTrainingStep:
    """`iteration_update` of a MONAI `SupervisedTrainer`: one optimisation step on a batch of
    (condition = corrupted slice, target = clean slice) pairs — Min-SNR weighted loss, AMP
    with the trainer's grad scaler, gradient clipping, then the EMA update. Returns the
    trainer's usual output dict (image = condition, label = clean, pred = noise, loss)."""

    def __init__(self, scheduler, ema: AveragedModel | None = None, noise_offset: float = 0.1,
                 snr_gamma: float | None = 1.0, max_grad_norm: float | None = 1.0,
                 condition_key: str = "corrupted", target_key: str = "image"):
        self.scheduler, self.ema = scheduler, ema
        self.noise_offset, self.snr_gamma, self.max_grad_norm = noise_offset, snr_gamma, max_grad_norm
        self.condition_key, self.target_key = condition_key, target_key

    def __call__(self, engine: Engine, batchdata: Mapping) -> dict:
        clean, condition = _pair(batchdata, engine, self.condition_key, self.target_key)
        network, optimizer, scaler = engine.network, engine.optimizer, engine.scaler if engine.amp else None
        network.train()
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast(clean.device.type, enabled=bool(engine.amp)):
            losses, predicted = diffusion_loss(network, self.scheduler, clean, condition, self.noise_offset,
                                               self.snr_gamma)
            loss = losses.mean()
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.unscale_(optimizer)
        else:
            loss.backward()
        if self.max_grad_norm:
            torch.nn.utils.clip_grad_norm_(network.parameters(), self.max_grad_norm)
        if scaler is not None:
            scaler.step(optimizer)
            scaler.update()
        else:
            optimizer.step()
        if self.ema is not None:
            self.ema.update_parameters(network)
        return _finish(engine, {Keys.IMAGE: condition, Keys.LABEL: clean, Keys.PRED: predicted.detach(),
                                Keys.LOSS: loss.detach()})


class DiffusionValidationStep:
    """`iteration_update` of a MONAI `SupervisedEvaluator`: the same weighted loss without
    gradients on held-out pairs. Timesteps and noise come from a generator re-seeded at the
    start of every validation run, so runs are comparable and the best model can be kept.
    The output's `loss` holds one value per slice."""

    def __init__(self, scheduler, noise_offset: float = 0.1, snr_gamma: float | None = 1.0, seed: int = 0,
                 condition_key: str = "corrupted", target_key: str = "image"):
        self.scheduler, self.noise_offset, self.snr_gamma, self.seed = scheduler, noise_offset, snr_gamma, seed
        self.condition_key, self.target_key = condition_key, target_key
        self.generator: torch.Generator | None = None

    def __call__(self, engine: Engine, batchdata: Mapping) -> dict:
        clean, condition = _pair(batchdata, engine, self.condition_key, self.target_key)
        if engine.state.iteration == 1 or self.generator is None:
            self.generator = torch.Generator(clean.device).manual_seed(self.seed)
        engine.network.eval()
        with torch.no_grad(), torch.autocast(clean.device.type, enabled=bool(engine.amp)):
            losses, predicted = diffusion_loss(engine.network, self.scheduler, clean, condition, self.noise_offset,
                                               self.snr_gamma, self.generator)
        return _finish(engine, {Keys.IMAGE: condition, Keys.LABEL: clean, Keys.PRED: predicted, Keys.LOSS: losses})


class WarmupEMA:
    """Exponential moving average with a warm-up: decay min(decay, (1 + n) / (10 + n)) after n
    updates (the schedule of diffusers' EMAModel), so short runs are not dominated by the
    random initial weights. An `avg_fn` for `torch.optim.swa_utils.AveragedModel`."""

    def __init__(self, decay: float = 0.9999):
        self.decay = decay

    def __call__(self, averaged: torch.Tensor, current: torch.Tensor, num_averaged) -> torch.Tensor:
        n = float(num_averaged)
        decay = min(self.decay, (1.0 + n) / (10.0 + n))
        return averaged * decay + current * (1.0 - decay)


def ema_model(network: torch.nn.Module, decay: float = 0.9999) -> AveragedModel:
    """EMA copy of `network` (its `.module` is a plain network with the averaged weights)."""
    return AveragedModel(network, avg_fn=WarmupEMA(decay))


@torch.no_grad()
def sample(network: torch.nn.Module, scheduler, condition: torch.Tensor, generator: torch.Generator | None = None,
           eta: float = 0.0) -> torch.Tensor:
    """Draws x_0 ~ p(clean | condition), starting from pure noise and stepping through the
    scheduler's timesteps; the result is clamped to [0, 1]. `eta` is DDIM's noise weight
    (unused by the stochastic samplers)."""
    x = torch.randn(condition.shape, generator=generator, device=condition.device, dtype=condition.dtype)
    ddim = isinstance(scheduler, DDIMScheduler)
    for t in scheduler.timesteps:
        timesteps = torch.full((x.shape[0],), int(t), device=x.device, dtype=torch.long)
        epsilon = network(torch.cat([x, condition], dim=1), timesteps=timesteps)
        if ddim:
            x, _ = scheduler.step(epsilon, int(t), x, eta=eta, generator=generator)
        else:  # StridedDDPM or MONAI's DDPMScheduler: stochastic steps
            x, _ = scheduler.step(epsilon, int(t), x, generator=generator)
        x = x.to(condition.dtype)
    return x.clamp(0, 1)
