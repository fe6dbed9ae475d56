"""PHANES training: two stages, each an ignite `Engine` as the other bundles' trainers are.

Stage 1 trains the RA soft-introspective VAE with its own encoder and decoder steps
(`VAEStep`, the engine's process function); between the stages the mask thresholds are
calibrated on healthy validation slices (`calibrate_mask_thresholds`); stage 2 trains the AOT-GAN
inpainter on healthy slices with masks = (stage-1 anomaly mask  OR  ~10 random ellipses) inside
the brain (`InpainterStep`). Handlers on each stage's engine report progress, validate stage 1,
log, write TensorBoard scalars (`<output_dir>/tensorboard`) and checkpoint every
`checkpoint_interval` iterations into `model_dir/checkpoint_stage{1,2}.pt`, from which a stage
resumes (the engine's own iteration counter); `model_dir/model.pt` holds both state dicts
(`model`) and the calibrated `mask_thresholds`.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from ignite.engine import Engine, Events

from medanomaly import masking
from medanomaly.bundles.distributed import average_gradients, broadcast_from_rank0, is_main_process, rank
from medanomaly.bundles.model_info import update_model_info, weights_file
from medanomaly.bundles.progress import report_progress
from medanomaly.data import IMAGE, MASK

from scripts.losses import (
    discriminator_loss,
    embedding_loss,
    generator_adversarial_loss,
    kl_divergence,
    perceptual_loss,
    reconstruction_error,
    style_loss,
)
from scripts.networks import PHANES, PatchDiscriminator

logger = logging.getLogger(__name__)


def _autocast(device, amp: bool):
    """bf16 autocast on `device` when `amp` (the configs set it on CUDA; on a CPU it is how the
    tests run the mixed-precision path: the same casts, so the same dtype mistakes would fail)."""
    if not amp:
        return contextlib.nullcontext()
    return torch.autocast(torch.device(device).type, dtype=torch.bfloat16)


# --------------------------------------------------------------------------- stage 1
class VAEStep:
    """One soft-intro VAE iteration (Daniel & Tamar 2021, with RA's reversed-embedding term):
    an encoder step (ELBO of real data minus the exponentiated ELBO of generated and reconstructed
    data, + `embedding_weight` * embedding loss of (x, rec)), then a decoder step. The
    exponentiated ELBOs of fake and reconstructed data enter the encoder loss with weight
    `negative_weight` each half (0.25: the reference code's 0.5 * 0.5)."""

    def __init__(self, vae, lr=5e-5, beta_kl=1.0, beta_rec=0.5, beta_neg=128.0, gamma_r=1e-8,
                 embedding_weight=0.005, negative_weight=0.25, scale=None, amp=False, device="cpu"):
        self.vae = vae
        self.opt_e = torch.optim.Adam(vae.encoder.parameters(), lr=lr)
        self.opt_d = torch.optim.Adam(vae.decoder.parameters(), lr=lr)
        self.beta_kl, self.beta_rec, self.beta_neg, self.gamma_r = beta_kl, beta_rec, beta_neg, gamma_r
        self.embedding_weight, self.negative_weight = embedding_weight, negative_weight
        self.scale, self.amp, self.device = scale, amp, device

    def state_dict(self):
        return {"opt_e": self.opt_e.state_dict(), "opt_d": self.opt_d.state_dict()}

    def load_state_dict(self, state):
        self.opt_e.load_state_dict(state["opt_e"])
        self.opt_d.load_state_dict(state["opt_d"])

    def _scale(self, x):
        return self.scale if self.scale is not None else 1.0 / (x.shape[-1] * x.shape[-2])

    def encoder_loss(self, x, noise) -> dict:
        """The encoder's loss (`loss_e`) and its parts. As in the reference, the decoder is frozen
        but not cut off: the exponentiated ELBOs of reconstructed and generated slices reach the
        encoder through the decoder's reconstructions of them as well as through their KL."""
        vae, scale = self.vae, self._scale(x)
        with _frozen(vae.decoder):
            mu, logvar, feats = vae.encode(x, return_features=True)
            z = vae.reparameterize(mu, logvar)
            rec = vae.decode(z)
            fake = vae.decode(noise).detach()
            fake_mu, fake_logvar = vae.encode(fake)
            rec_mu, rec_logvar, rec_feats = vae.encode(rec.detach(), return_features=True)
            rec_fake = vae.decode(vae.reparameterize(fake_mu, fake_logvar))
            rec_rec = vae.decode(vae.reparameterize(rec_mu, rec_logvar))
        loss_rec = reconstruction_error(x, rec.float()).mean()
        loss_kl = kl_divergence(mu.float(), logvar.float()).mean()
        exp_fake = self._exp_elbo(fake.float(), rec_fake.float(), fake_mu, fake_logvar, scale)
        exp_rec = self._exp_elbo(rec.float(), rec_rec.float(), rec_mu, rec_logvar, scale)
        loss_embed = embedding_loss([f.float() for f in feats], [f.float() for f in rec_feats])
        loss_e = (scale * (self.beta_rec * loss_rec + self.beta_kl * loss_kl)
                  + self.negative_weight * (exp_fake + exp_rec) + self.embedding_weight * loss_embed)
        return {"loss_e": loss_e, "rec_mse": loss_rec / x[0].numel(), "kl": loss_kl, "embed": loss_embed,
                "z": z.detach(), "exp_fake": exp_fake, "exp_rec": exp_rec}

    def _exp_elbo(self, target, reconstruction, mu, logvar, scale):
        """exp(-2 scale (beta_rec rec_err + beta_neg KL)), averaged over the batch."""
        error = reconstruction_error(target, reconstruction)
        kl = kl_divergence(mu.float(), logvar.float())
        return (-2 * scale * (self.beta_rec * error + self.beta_neg * kl)).exp().mean()

    def decoder_loss(self, x, z, noise):
        """The decoder's loss (`loss_d`): reconstruction of x from the encoder step's codes `z`, KL of
        the re-encoded reconstructions and samples, and their own reconstruction errors x gamma_r."""
        vae, scale = self.vae, self._scale(x)
        with _frozen(vae.encoder):
            fake = vae.decode(noise)
            rec = vae.decode(z)
            rec_mu, rec_logvar = vae.encode(rec)
            fake_mu, fake_logvar = vae.encode(fake)
            rec_rec = vae.decode(vae.reparameterize(rec_mu, rec_logvar).detach())
            rec_fake = vae.decode(vae.reparameterize(fake_mu, fake_logvar).detach())
        loss_rec = reconstruction_error(x, rec.float()).mean()
        loss_rr = reconstruction_error(rec.detach().float(), rec_rec.float()).mean()
        loss_fr = reconstruction_error(fake.detach().float(), rec_fake.float()).mean()
        kl = 0.5 * (kl_divergence(rec_mu.float(), rec_logvar.float()).mean()
                    + kl_divergence(fake_mu.float(), fake_logvar.float()).mean())
        return scale * (self.beta_rec * loss_rec + self.beta_kl * kl
                        + self.gamma_r * 0.5 * self.beta_rec * (loss_rr + loss_fr))

    def __call__(self, x: torch.Tensor) -> dict:
        self.vae.train()
        noise = torch.randn(x.shape[0], self.vae.zdim, device=x.device)
        with _autocast(self.device, self.amp):
            encoder = self.encoder_loss(x, noise)
        self.opt_e.zero_grad(set_to_none=True)
        encoder["loss_e"].backward()
        average_gradients(self.opt_e)
        self.opt_e.step()
        with _autocast(self.device, self.amp):
            loss_d = self.decoder_loss(x, encoder["z"], noise)  # the encoder step's draw of z
        self.opt_d.zero_grad(set_to_none=True)
        loss_d.backward()
        average_gradients(self.opt_d)
        self.opt_d.step()
        losses = {"loss_e": encoder["loss_e"], "loss_d": loss_d, "rec_mse": encoder["rec_mse"],
                  "kl": encoder["kl"], "embed": encoder["embed"]}
        return {k: float(v.detach()) for k, v in losses.items()}


@contextlib.contextmanager
def _frozen(module: torch.nn.Module):
    """`module`'s parameters take no gradient inside (the reference's requires_grad = False): the
    other half of the VAE trains through it."""
    flags = [p.requires_grad for p in module.parameters()]
    for p in module.parameters():
        p.requires_grad_(False)
    try:
        yield module
    finally:
        for p, flag in zip(module.parameters(), flags):
            p.requires_grad_(flag)


# --------------------------------------------------------------------------- stage 2
class InpainterStep:
    """One AOT-GAN iteration on healthy slices: discriminator step (SM-PatchGAN), then generator
    step with l1 * L1 + style * style + perceptual * perceptual (+ adversarial * adversarial when
    `adversarial_backprop`; the reference computes but never back-propagates that term)."""

    def __init__(self, inpainter, discriminator, lr=1e-4, betas=(0.5, 0.999), l1_weight=1.0, style_weight=250.0,
                 perceptual_weight=0.1, adversarial_weight=0.01, adversarial_backprop=True, features=None,
                 amp=False, device="cpu"):
        self.inpainter, self.discriminator, self.features = inpainter, discriminator, features
        self.opt_g = torch.optim.Adam(inpainter.parameters(), lr=lr, betas=tuple(betas))
        self.opt_d = torch.optim.Adam(discriminator.parameters(), lr=lr, betas=tuple(betas))
        self.l1_weight, self.style_weight, self.perceptual_weight = l1_weight, style_weight, perceptual_weight
        self.adversarial_weight, self.adversarial_backprop = adversarial_weight, adversarial_backprop
        self.amp, self.device = amp, device
        if (style_weight or perceptual_weight) and features is None:
            raise ValueError("Style / perceptual losses need a VGG19Features module (features=...).")

    def state_dict(self):
        return {"opt_g": self.opt_g.state_dict(), "opt_d": self.opt_d.state_dict()}

    def load_state_dict(self, state):
        self.opt_g.load_state_dict(state["opt_g"])
        self.opt_d.load_state_dict(state["opt_d"])

    def generator_loss(self, x, mask):
        """(total, parts, composed image) of the generator on one batch."""
        pred = self.inpainter(x, mask)
        composed = masking.compose(x, pred, mask)
        parts = {"l1": F.l1_loss(pred.float(), x)}
        if self.features is not None and (self.style_weight or self.perceptual_weight):
            fp, fx = self.features(pred.float()), self.features(x)
            parts["style"], parts["perceptual"] = style_loss(fp, fx), perceptual_loss(fp, fx)
        total = (self.l1_weight * parts["l1"] + self.style_weight * parts.get("style", 0.0)
                 + self.perceptual_weight * parts.get("perceptual", 0.0))
        return total, parts, composed

    def __call__(self, x: torch.Tensor, mask: torch.Tensor) -> dict:
        self.inpainter.train()
        self.discriminator.train()
        with _autocast(self.device, self.amp):
            total, parts, composed = self.generator_loss(x, mask)
            d_fake = self.discriminator(composed)
            adversarial = generator_adversarial_loss(d_fake.float(), mask)
            if self.adversarial_backprop:
                total = total + self.adversarial_weight * adversarial
        self.opt_g.zero_grad(set_to_none=True)
        total.backward()
        average_gradients(self.opt_g)
        self.opt_g.step()
        with _autocast(self.device, self.amp):
            d_loss = discriminator_loss(self.discriminator(x).float(),
                                        self.discriminator(composed.detach()).float(), mask)
        self.opt_d.zero_grad(set_to_none=True)
        d_loss.backward()
        average_gradients(self.opt_d)
        self.opt_d.step()
        losses = {"loss_g": total, "loss_d": d_loss, "adversarial": adversarial, **parts}
        return {k: float(v.detach()) for k, v in losses.items()}


# --------------------------------------------------------------------------- masks
@torch.no_grad()
def vae_mask_maps(vae, perceptual, x, saliency_sigma=2.0):
    vae.eval()
    rec = vae(x).float().clamp(0, 1)
    return masking.mask_map(x, rec, perceptual, saliency_sigma=saliency_sigma), rec


def brain_slice_batches(volumes, device, batch_size=32, min_brain_pixels=0):
    """(slices, brain masks) batches, (B, 1, H, W), of every axial slice of `volumes` with more than
    `min_brain_pixels` brain pixels."""
    for item in volumes:
        image, brain = item[IMAGE], item[MASK]  # (1, H, W, D)
        image = image.as_tensor() if hasattr(image, "as_tensor") else torch.as_tensor(image)
        brain = brain.as_tensor() if hasattr(brain, "as_tensor") else torch.as_tensor(brain)
        slices = image[0].permute(2, 0, 1)[:, None].float()
        masks = brain[0].permute(2, 0, 1)[:, None].float()
        keep = masks.flatten(1).sum(1) > min_brain_pixels
        slices, masks = slices[keep], masks[keep]
        for start in range(0, len(slices), batch_size):
            yield slices[start:start + batch_size].to(device), masks[start:start + batch_size].to(device)


@torch.no_grad()
def healthy_reconstruction_mse(vae, volumes, device, batch_size=32) -> float:
    """Stage 1's validation score (lower is better): the mean squared error of the deterministic
    reconstruction D(mu) over the brain pixels of the healthy validation volumes."""
    vae.eval()
    total, count = 0.0, 0.0
    for x, m in brain_slice_batches(volumes, device, batch_size):
        total += float((((vae(x).float() - x) ** 2) * m).sum())
        count += float(m.sum())
    return total / max(count, 1.0)


@torch.no_grad()
def calibrate_mask_thresholds(vae, perceptual, volumes, device, fprs=masking.DEFAULT_FPRS, batch_size=32,
                              max_values=2_000_000, seed=0):
    """Mask-map thresholds at the target healthy false-positive fractions, from the brain pixels
    of every axial slice (with brain) of the healthy validation volumes."""
    values = []
    for x, m in brain_slice_batches(volumes, device, batch_size):
        maps, _ = vae_mask_maps(vae, perceptual, x)
        values.append(maps[m > 0].cpu())
    values = torch.cat(values) if values else torch.zeros(0)
    if values.numel() > max_values:
        values = values[torch.from_numpy(np.random.default_rng(seed).choice(values.numel(), max_values, False))]
    return masking.thresholds_at_fprs(values, fprs)


def training_masks(x, brain, vae=None, perceptual=None, threshold=None, n_ellipses=10, rng=None):
    """Stage-2 masks: (stage-1 anomaly mask at `threshold`, dilated) OR random ellipses, in the brain."""
    ellipses = masking.random_ellipse_masks(x.shape[0], tuple(x.shape[-2:]), n_ellipses, rng=rng, device=x.device)
    mask = ellipses
    if vae is not None and threshold is not None:
        maps, _ = vae_mask_maps(vae, perceptual, x)
        mask = torch.maximum(mask, masking.binary_anomaly_mask(maps, threshold))
    return mask * (brain > 0).float()


# --------------------------------------------------------------------------- the engine
def _infinite(loader):
    for epoch in itertools.count():
        if hasattr(getattr(loader, "sampler", None), "set_epoch"):
            loader.sampler.set_epoch(epoch)
        yield from loader


def _slices(batch, device):
    def flat(t):  # (B, 1, H, W) slices (the slice sampler's samples are collated into the batch)
        t = t.as_tensor() if hasattr(t, "as_tensor") else torch.as_tensor(t)
        return t.reshape(-1, *t.shape[-3:]).to(device).float()
    return flat(batch[IMAGE]), flat(batch[MASK])


def save_model(model_dir, model: PHANES, mask_thresholds=None, stages_done=()):
    path = weights_file(model_dir)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"model": model.state_dict(), "mask_thresholds": mask_thresholds or {},
                "stages_done": list(stages_done)}, path)


def load_model_file(model_dir):
    path = weights_file(model_dir)
    return torch.load(path, map_location="cpu", weights_only=True) if path.is_file() else None


class PhanesTrainer:
    """Runs stage 1 and / or stage 2 (`stage`: 1, 2 or 'both'), resumable per stage."""

    def __init__(self, model: PHANES, train_loader, validation_data, perceptual, model_dir, device="cpu", amp=False,
                 stage="both", stage1_iterations=100000, stage2_iterations=100000, learning_rate=5e-5,
                 inpainter_learning_rate=1e-4, vae_losses=None, inpainter_losses=None, discriminator=None,
                 features=None, n_ellipses=10, vae_masks=True, mask_fpr=0.05, checkpoint_interval=500,
                 log_interval=50, validation_interval=None, resume=False, seed=0, info=None, tensorboard_dir=None,
                 handlers=()):
        self.model, self.loader, self.validation = model.to(device), train_loader, validation_data
        self.perceptual = perceptual.to(device) if perceptual is not None else None
        self.model_dir, self.device, self.amp = Path(model_dir), device, amp
        self.stage = str(stage)
        self.iterations = {1: int(stage1_iterations), 2: int(stage2_iterations)}
        self.discriminator = (discriminator or PatchDiscriminator()).to(device)
        self.features = features.to(device) if features is not None else None
        self.vae_step = VAEStep(model.vae, lr=learning_rate, amp=amp, device=device, **(vae_losses or {}))
        self.inpainter_step = InpainterStep(model.inpainter, self.discriminator, lr=inpainter_learning_rate,
                                            features=self.features, amp=amp, device=device,
                                            **(inpainter_losses or {}))
        self.n_ellipses, self.vae_masks, self.mask_fpr = n_ellipses, vae_masks, mask_fpr
        self.checkpoint_interval, self.log_interval = checkpoint_interval, log_interval
        # stage 1 is validated every `validation_interval` iterations; the best VAE is kept
        self.validation_interval = int(validation_interval) if validation_interval else None
        self.best_vae: dict | None = None
        self.validation_curve: list = []  # [iteration, healthy validation reconstruction MSE]
        self.resume, self.seed, self.info = resume, seed, dict(info or {})
        self.tensorboard_dir, self.handlers = tensorboard_dir, list(handlers or ())
        self.rng = np.random.default_rng([seed, rank()])  # each rank its own ellipses
        self._last_report = -float("inf")
        self.mask_thresholds: dict = {}
        self.stages_done: list = []

    # ---- checkpoints
    def _checkpoint_path(self, stage):
        return self.model_dir / f"checkpoint_stage{stage}.pt"

    def _save_checkpoint(self, stage, iteration):
        step = self.vae_step if stage == 1 else self.inpainter_step
        state = {"model": self.model.state_dict(), "optimizers": step.state_dict(), "iteration": iteration,
                 "mask_thresholds": self.mask_thresholds, "rng": self.rng.bit_generator.state,
                 "torch_rng": torch.get_rng_state()}
        if stage == 1:
            state["best_vae"], state["validation_curve"] = self.best_vae, self.validation_curve
        if stage == 2:
            state["discriminator"] = self.discriminator.state_dict()
        self.model_dir.mkdir(parents=True, exist_ok=True)
        tmp = self._checkpoint_path(stage).with_suffix(".tmp")
        torch.save(state, tmp)
        tmp.replace(self._checkpoint_path(stage))

    def _load_checkpoint(self, stage) -> int:
        path = self._checkpoint_path(stage)
        if not (self.resume and path.is_file()):
            return 0
        state = torch.load(path, map_location=self.device, weights_only=False)
        self.model.load_state_dict(state["model"])
        (self.vae_step if stage == 1 else self.inpainter_step).load_state_dict(state["optimizers"])
        if stage == 2 and "discriminator" in state:
            self.discriminator.load_state_dict(state["discriminator"])
        if stage == 1:
            self.best_vae, self.validation_curve = state.get("best_vae"), state.get("validation_curve", [])
        self.mask_thresholds = state.get("mask_thresholds", {})
        self.rng.bit_generator.state = state["rng"]
        torch.set_rng_state(state["torch_rng"])
        if rank() > 0:  # rank 0's saved streams: the other ranks draw their own again
            self.rng = np.random.default_rng([self.seed, rank(), int(state["iteration"])])
            torch.manual_seed(self.seed + rank() + int(state["iteration"]))
        logger.info("Resuming stage %d from %s at iteration %d.", stage, path, state["iteration"])
        return int(state["iteration"])

    def _load_previous_model(self):
        """Stage 2 alone (or a resumed run past stage 1) starts from the saved model.pt."""
        saved = load_model_file(self.model_dir)
        if saved is not None:
            self.model.load_state_dict(saved["model"])
            self.mask_thresholds = saved.get("mask_thresholds", {})
            self.stages_done = saved.get("stages_done", [])

    # ---- stages
    def stage_engine(self, stage: int) -> Engine:
        """Stage `stage`'s ignite engine: one `VAEStep` / `InpainterStep` per iteration (its losses are
        the engine's output), with the progress, validation, logging, TensorBoard and checkpoint
        handlers; it runs `iterations[stage]` iterations over the training loader, repeated."""
        total = self.iterations[stage]
        threshold = self.mask_thresholds.get(f"{self.mask_fpr:g}") if self.vae_masks else None

        def step(engine, batch):
            x, brain = _slices(batch, self.device)
            if stage == 1:
                losses = self.vae_step(x)
            else:
                mask = training_masks(x, brain, self.model.vae if threshold is not None else None, self.perceptual,
                                      threshold, self.n_ellipses, self.rng)
                losses = self.inpainter_step(x, mask)
            # several processes: rank 0's BatchNorm statistics, as DistributedDataParallel keeps them
            broadcast_from_rank0(self.model, self.discriminator, buffers_only=True)
            return losses

        engine = Engine(step)

        def every(n, handler):  # handler(iteration) every n iterations, and at the last one
            when = Events.ITERATION_COMPLETED(event_filter=lambda _, i: i % n == 0 or i == total)
            engine.add_event_handler(when, lambda e: handler(e.state.iteration))

        if stage == 1 and self.validation_interval:  # every rank: the same weights, the same best VAE
            every(self.validation_interval, self._validate_stage1)
        for handler in self.handlers:
            handler.attach(engine)
        if not is_main_process():  # rank 0 alone reports, logs and writes files
            return engine
        every(1, lambda done: self._report_progress(stage, done))
        every(self.log_interval, lambda done: logger.info("stage %d iteration %d/%d %s", stage, done, total, " ".join(
            f"{k}={v:.5g}" for k, v in engine.state.output.items())))
        every(self.checkpoint_interval, lambda done: self._save_checkpoint(stage, done))
        if self.tensorboard_dir:
            from monai.handlers import TensorBoardStatsHandler

            TensorBoardStatsHandler(log_dir=str(self.tensorboard_dir), iteration_log=True, epoch_log=False,
                                    output_transform=lambda losses: {f"stage{stage}/{k}": v for k, v in losses.items()},
                                    ).attach(engine)
        return engine

    def _run_stage(self, stage):
        start = self._load_checkpoint(stage)
        total = self.iterations[stage]
        if stage == 2 and not self.mask_thresholds:
            self._calibrate()
        started, last = time.perf_counter(), {}
        if start < total:  # a stage checkpointed at its end is done
            engine = self.stage_engine(stage)
            engine.load_state_dict({"iteration": start, "epoch_length": total, "max_epochs": 1})
            engine.run(_infinite(self.loader), max_epochs=1, epoch_length=total)
            last = engine.state.output or {}
        if stage not in self.stages_done:
            self.stages_done.append(stage)
        if stage == 1 and self.best_vae is not None:
            self.model.vae.load_state_dict(self.best_vae)
        if stage == 1 and (start < total or not self.mask_thresholds):
            self._calibrate()
        if not is_main_process():
            return
        save_model(self.model_dir, self.model, self.mask_thresholds, self.stages_done)
        update_model_info(self.model_dir, **self.info, **{
            f"stage{stage}_iterations_done": total, f"stage{stage}_seconds": round(time.perf_counter() - started, 1),
            f"stage{stage}_final_losses": {k: round(v, 6) for k, v in last.items()},
            "mask_thresholds": self.mask_thresholds, "stages_done": self.stages_done,
            **(self._validation_record() if stage == 1 and self.validation_curve else {})})

    def _validate_stage1(self, done):
        """Healthy validation reconstruction MSE now; the VAE is kept when it is the best so far."""
        mse = healthy_reconstruction_mse(self.model.vae, self.validation, self.device)
        best = min((m for _, m in self.validation_curve), default=float("inf"))
        self.validation_curve.append([done, round(mse, 6)])
        if mse < best:
            self.best_vae = {k: v.detach().cpu().clone() for k, v in self.model.vae.state_dict().items()}
        logger.info("stage 1 iteration %d: healthy validation reconstruction MSE %.5f (best %.5f)", done, mse,
                    min(mse, best))

    def _validation_record(self):
        best_iteration, best_mse = min(self.validation_curve, key=lambda point: point[1])
        return {"stage1_validation_mse": self.validation_curve, "stage1_best_iteration": best_iteration,
                "stage1_best_validation_mse": best_mse}

    def _report_progress(self, stage, done, every_seconds=5.0):
        """A `[medanomaly] progress` line (the bar of `medanomaly train` and Slicer) at most every
        `every_seconds`: the iterations done over those of every stage this run trains."""
        now = time.monotonic()
        if now - self._last_report < every_seconds and done < self.iterations[stage]:
            return
        self._last_report = now
        stages = [1, 2] if self.stage == "both" else [int(self.stage)]
        before = sum(self.iterations[s] for s in stages if s < stage)
        total = sum(self.iterations[s] for s in stages)
        report_progress((before + done) / max(total, 1), f"stage {stage}: iteration {done}/{self.iterations[stage]}")

    def _calibrate(self):
        logger.info("Calibrating the mask thresholds on %d healthy validation volume(s).", len(self.validation))
        self.mask_thresholds = calibrate_mask_thresholds(self.model.vae, self.perceptual, self.validation, self.device)
        logger.info("Mask thresholds (healthy false-positive fraction -> threshold): %s", self.mask_thresholds)

    def run(self):
        if self.stage not in ("1", "2", "both"):
            raise ValueError(f"stage must be 1, 2 or 'both', got {self.stage!r}.")
        torch.manual_seed(self.seed + rank())
        if self.stage == "2":
            self._load_previous_model()
        # several processes (configs/multi_gpu_train.yaml): every rank starts from rank 0's weights
        broadcast_from_rank0(self.model, self.discriminator)
        if self.stage in ("1", "both"):
            self._run_stage(1)
        if self.stage in ("2", "both"):
            self._run_stage(2)
        return self
