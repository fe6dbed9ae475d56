#!/usr/bin/env python
"""PHANES stage 1 at the demo scale: which training setting lets the soft-intro VAE reconstruct
healthy slices? Trains the demo overlay's VAE from scratch with each setting for the same number of
iterations and prints the healthy validation brain MSE of D(E(x)) every `--every` iterations, next
to a constant prediction (the mean healthy validation slice).

    python benchmarks/benchmark_phanes_stage1.py [--contrast T2w] [--iterations 1000] [--every 250]
                                                 [--settings ae soft soft-rec2 soft-rec2-lr1e-4] [--shipped]

Each checkpoint is scored twice: in eval mode with the BatchNorm running statistics training left
(what inference uses), and with statistics recomputed from real healthy training slices (the
soft-intro step also sends generated and reconstructed slices through every BatchNorm layer).
`--shipped` first scores the shipped stage 1 of `--contrast` both ways.

Settings: `ae` trains the same network as a plain autoencoder (D(mu), summed squared error only; a
reference for what the network can learn in that time, not the method); `soft` is the soft-intro
VAE step with the paper's loss weights (beta_rec 0.5) at the demo overlay's learning rate; `-rec2`
sets beta_rec 2.0 (the paper's per-image balance at 64 px: the demo overlay's), `-lr1e-4` the
learning rate. Validation: the slices with more than 100 brain pixels of the first two healthy
validation volumes. One process, settings one after the
other, seeded identically.
"""

from __future__ import annotations

import argparse
import copy
import time
from pathlib import Path

import torch

from medanomaly.bundles import bundle_scripts, find_bundle

SETTINGS = {  # name: (plain autoencoder?, loss overrides, learning rate or None for the overlay's)
    "ae": (True, {}, None),
    "soft": (False, {"beta_rec": 0.5}, None),
    "soft-rec2": (False, {"beta_rec": 2.0}, None),
    "soft-rec2-lr1e-4": (False, {"beta_rec": 2.0}, 1e-4),
}


def demo_config(contrast: str):
    from monai.bundle import ConfigParser

    configs = find_bundle("phanes").configs_dir
    parser = ConfigParser()
    parser.read_config([str(configs / "train.yaml"), str(configs / "demo.yaml")])
    parser.update({"contrast": contrast})
    return parser


def validation_slices(parser, n_volumes: int = 2, min_brain_pixels: int = 100):
    from scripts.trainer import brain_slice_batches

    dataset = parser.get_parsed_content("validate#dataset")
    volumes = [dataset[i] for i in range(n_volumes)]
    batches = list(brain_slice_batches(volumes, "cpu", batch_size=10_000, min_brain_pixels=min_brain_pixels))
    return torch.cat([x for x, _ in batches]), torch.cat([m for _, m in batches])


def brain_mse(prediction, x, brain) -> float:
    return float((((prediction - x) ** 2) * brain).sum() / brain.sum())


def training_batches(parser, n_batches: int = 32):
    """`n_batches` batches of healthy training slices (the training loader's), for BatchNorm statistics."""
    from scripts.trainer import _infinite, _slices

    data = _infinite(parser.get_parsed_content("train#dataloader"))
    return [_slices(next(data), "cpu")[0] for _ in range(n_batches)]


def with_real_batchnorm_statistics(vae, batches):
    """A copy of `vae` whose BatchNorm running statistics are recomputed from real healthy slices
    (encoder on x, decoder on E(x)'s mu). The soft-intro step also passes generated and
    reconstructed slices through every BatchNorm layer, so the trained running statistics mix
    real and synthetic batches; eval mode uses them."""
    recalibrated = copy.deepcopy(vae)
    torch.optim.swa_utils.update_bn(batches, recalibrated)
    return recalibrated.eval()


def shipped_stage1(parser, contrast: str, x_val, brain_val, batches):
    """Healthy validation brain MSE of the shipped stage 1 (models/<contrast>/ where shipped): eval
    mode with its trained BatchNorm statistics, and with statistics of real slices."""
    from medanomaly.bundles.model_info import shipped_model_dir

    from scripts.networks import SoftIntroVAE

    model_dir = shipped_model_dir(find_bundle("phanes").model_dir, contrast)
    vae = SoftIntroVAE(1, parser["vae_channels"], parser["zdim"], parser["image_size"][0])
    state = torch.load(Path(model_dir) / "model.pt", map_location="cpu", weights_only=True)["model"]
    vae.load_state_dict({k[len("vae."):]: v for k, v in state.items() if k.startswith("vae.")})
    with torch.no_grad():
        trained = brain_mse(vae.eval()(x_val), x_val, brain_val)
        real = brain_mse(with_real_batchnorm_statistics(vae, batches)(x_val), x_val, brain_val)
    return model_dir, trained, real


def train_setting(name, parser, x_val, brain_val, iterations, every, batches):
    from scripts.losses import reconstruction_error
    from scripts.networks import SoftIntroVAE
    from scripts.trainer import VAEStep, _infinite, _slices

    plain, losses, lr = SETTINGS[name]
    torch.manual_seed(0)
    vae = SoftIntroVAE(1, parser["vae_channels"], parser["zdim"], parser["image_size"][0])
    lr = lr or parser["learning_rate"]
    step = VAEStep(vae, lr=lr, **{**parser.get_parsed_content("vae_losses"), **losses})
    optimizer = torch.optim.Adam(vae.parameters(), lr=lr)
    data, curve, started = _infinite(parser.get_parsed_content("train#dataloader")), [], time.perf_counter()
    for i in range(1, iterations + 1):
        x, _ = _slices(next(data), "cpu")
        if plain:
            vae.train()
            loss = reconstruction_error(x, vae(x)).mean()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        else:
            step(x)
        if i % every == 0 or i == iterations:
            vae.eval()
            with torch.no_grad():
                real = with_real_batchnorm_statistics(vae, batches)
                curve.append((i, brain_mse(vae(x_val), x_val, brain_val), brain_mse(real(x_val), x_val, brain_val)))
    return curve, time.perf_counter() - started


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--contrast", default="T2w")
    parser.add_argument("--iterations", type=int, default=1000)
    parser.add_argument("--every", type=int, default=250)
    parser.add_argument("--settings", nargs="*", default=list(SETTINGS), choices=list(SETTINGS))
    parser.add_argument("--shipped", action="store_true", help="score the shipped stage 1 of --contrast, then train")
    args = parser.parse_args(argv)
    with bundle_scripts("phanes", "trainer", "networks", "losses"):
        config = demo_config(args.contrast)
        x_val, brain_val = validation_slices(config)
        constant = brain_mse(x_val.mean(0, keepdim=True), x_val, brain_val)
        print(f"healthy validation brain MSE of the mean slice (a constant prediction): {constant:.4f}")
        batches = training_batches(demo_config(args.contrast))  # its own loader: training's draws stay as they were
        if args.shipped:
            model_dir, trained, real = shipped_stage1(config, args.contrast, x_val, brain_val, batches)
            print(f"shipped stage 1 ({model_dir}): {trained:.4f} with its trained BatchNorm statistics, "
                  f"{real:.4f} with statistics of real training slices", flush=True)
        print("per checkpoint: trained BatchNorm statistics / statistics of real training slices")
        for name in args.settings:
            curve, seconds = train_setting(name, config, x_val, brain_val, args.iterations, args.every, batches)
            points = "  ".join(f"{i}: {mse:.4f} / {real:.4f}" for i, mse, real in curve)
            print(f"{name:18s} {points}  ({seconds:.0f} s)", flush=True)


if __name__ == "__main__":
    main()
