"""StyleGAN2 training as a MONAI `SupervisedTrainer` iteration: per iteration one discriminator
step (logistic loss, lazy R1 every `r1_interval` steps) and one generator step (non-saturating
loss with style mixing, optional lazy path-length regularisation), then the EMA generator update.
The trainer's `network` / `optimizer` are the generator's; the discriminator and its optimiser
belong to the step. In a distributed training (configs/multi_gpu_train.yaml) both networks come
wrapped in DistributedDataParallel: every pass whose gradients an optimiser steps on goes through
the wrapper (its forward), so the gradients are averaged over the processes."""

from __future__ import annotations

import copy
from typing import Mapping

import torch
from ignite.engine import Engine
from monai.engines.utils import IterationEvents
from monai.utils import CommonKeys as Keys

from scripts.stylegan2 import (
    discriminator_loss,
    from_unit,
    generator_loss,
    path_length_penalty,
    r1_penalty,
)


def plain(network: torch.nn.Module) -> torch.nn.Module:
    """The network inside a DistributedDataParallel wrapper (its attributes, the EMA's source)."""
    return network.module if isinstance(network, torch.nn.parallel.DistributedDataParallel) else network


def ema_copy(generator: torch.nn.Module) -> torch.nn.Module:
    """A frozen copy of the generator that follows it by exponential moving average (the model)."""
    ema = copy.deepcopy(generator).eval()
    ema.requires_grad_(False)
    return ema


@torch.no_grad()
def update_ema(ema: torch.nn.Module, model: torch.nn.Module, beta: float) -> None:
    for p_ema, p in zip(ema.parameters(), model.parameters()):
        p_ema.lerp_(p.detach(), 1.0 - beta)
    for b_ema, b in zip(ema.buffers(), model.buffers()):
        b_ema.copy_(b)


class StyleGAN2Step:
    """`iteration_update` of a `SupervisedTrainer` whose network is the generator.

    Real slices (`image_key`, in [0, 1], already at the GAN's size) go to [-1, 1]. The EMA
    half-life follows StyleGAN2 (`ema_kimg` thousand images), capped by `ema_rampup` x images seen.
    """

    def __init__(self, discriminator: torch.nn.Module, d_optimizer: torch.optim.Optimizer,
                 g_ema: torch.nn.Module | None = None, r1_gamma: float = 10.0, r1_interval: int = 16,
                 pl_weight: float = 0.0, pl_interval: int = 4, pl_batch_shrink: int = 2, mixing_prob: float = 0.9,
                 ema_kimg: float = 10.0, ema_rampup: float | None = 0.05, image_key: str = "image"):
        self.discriminator, self.d_optimizer, self.g_ema = discriminator, d_optimizer, g_ema
        self.r1_gamma, self.r1_interval = r1_gamma, r1_interval
        self.pl_weight, self.pl_interval, self.pl_batch_shrink = pl_weight, pl_interval, pl_batch_shrink
        self.mixing_prob, self.ema_kimg, self.ema_rampup, self.image_key = mixing_prob, ema_kimg, ema_rampup, image_key
        self.pl_mean = torch.zeros(())
        self.images_seen = 0

    def state_dict(self) -> dict:
        return {"pl_mean": self.pl_mean, "images_seen": self.images_seen}

    def load_state_dict(self, state: Mapping) -> None:
        self.pl_mean, self.images_seen = state["pl_mean"], int(state["images_seen"])

    def _latents(self, generator, n: int, device) -> torch.Tensor:
        return torch.randn(n, plain(generator).style_dim, device=device)

    def step(self, generator, g_optimizer, real: torch.Tensor, iteration: int) -> dict:
        """One D step and one G step on a batch of real images in [-1, 1]; returns the losses."""
        d, device, batch = self.discriminator, real.device, real.shape[0]
        generator.train()
        d.train()
        # discriminator
        d.requires_grad_(True)
        generator.requires_grad_(False)
        with torch.no_grad():
            fake = generator(self._latents(generator, batch, device), mixing_prob=self.mixing_prob)
        self.d_optimizer.zero_grad(set_to_none=True)
        loss_d = discriminator_loss(d(real), d(fake))
        loss_d.backward()
        self.d_optimizer.step()
        r1 = None
        if self.r1_gamma > 0 and self.r1_interval and iteration % self.r1_interval == 0:
            self.d_optimizer.zero_grad(set_to_none=True)
            real_ = real.detach().requires_grad_(True)
            logits = d(real_)
            r1 = r1_penalty(logits, real_)
            penalty = self.r1_gamma / 2 * r1 * self.r1_interval
            if d is not plain(d):  # DDP waits for a gradient of every parameter: zero where R1 has none
                penalty = penalty + 0 * logits.sum()
            penalty.backward()
            self.d_optimizer.step()
        # generator
        d.requires_grad_(False)
        generator.requires_grad_(True)
        g_optimizer.zero_grad(set_to_none=True)
        fake = generator(self._latents(generator, batch, device), mixing_prob=self.mixing_prob)
        loss_g = generator_loss(d(fake))
        loss_g.backward()
        g_optimizer.step()
        pl = None
        if self.pl_weight > 0 and self.pl_interval and iteration % self.pl_interval == 0:
            g_optimizer.zero_grad(set_to_none=True)
            n = max(1, batch // self.pl_batch_shrink)
            images, ws = generator(self._latents(generator, n, device), return_ws=True)
            pl, self.pl_mean = path_length_penalty(images, ws, self.pl_mean.to(device))
            (self.pl_weight * self.pl_interval * pl + 0 * images[0, 0, 0, 0]).backward()
            g_optimizer.step()
        d.requires_grad_(True)
        self.images_seen += batch
        if self.g_ema is not None:
            half_life = self.ema_kimg * 1000
            if self.ema_rampup:
                half_life = min(half_life, self.images_seen * self.ema_rampup)
            update_ema(self.g_ema, plain(generator), 0.5 ** (batch / max(half_life, 1e-8)))
        losses = {"loss": loss_g.detach(), "loss_d": loss_d.detach()}
        if r1 is not None:
            losses["r1"] = r1.detach()
        if pl is not None:
            losses["path_length"] = pl.detach()
        return {**losses, "fake": fake.detach()}

    def __call__(self, engine: Engine, batchdata: Mapping) -> dict:
        real = from_unit(batchdata[self.image_key].to(engine.state.device, non_blocking=engine.non_blocking))
        result = self.step(engine.network, engine.optimizer, real, engine.state.iteration)
        fake = result.pop("fake")
        output = {Keys.IMAGE: real, Keys.PRED: fake, Keys.LOSS: result.pop("loss"), **result}
        engine.state.output = output
        engine.fire_event(IterationEvents.MODEL_COMPLETED)  # MONAI decollates it as for its own iterations
        return engine.state.output
