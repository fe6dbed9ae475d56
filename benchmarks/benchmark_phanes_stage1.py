#!/usr/bin/env python
"""PHANES stage 1 at the demo scale: which training setting lets the soft-intro VAE reconstruct
healthy slices? Trains the demo overlay's VAE from scratch with each setting for the same number of
iterations and prints the healthy validation brain MSE of D(E(x)) every `--every` iterations, next
to a constant prediction (the mean healthy validation slice).

    python benchmarks/benchmark_phanes_stage1.py [--contrast T2w] [--iterations 1000] [--every 250]
                                                 [--settings ae soft soft-rec2 soft-rec2-lr1e-4]

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
import time

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


def train_setting(name, parser, x_val, brain_val, iterations, every):
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
                curve.append((i, brain_mse(vae(x_val), x_val, brain_val)))
    return curve, time.perf_counter() - started


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--contrast", default="T2w")
    parser.add_argument("--iterations", type=int, default=1000)
    parser.add_argument("--every", type=int, default=250)
    parser.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
    args = parser.parse_args(argv)
    with bundle_scripts("phanes", "trainer", "networks", "losses"):
        config = demo_config(args.contrast)
        x_val, brain_val = validation_slices(config)
        constant = brain_mse(x_val.mean(0, keepdim=True), x_val, brain_val)
        print(f"healthy validation brain MSE of the mean slice (a constant prediction): {constant:.4f}")
        for name in args.settings:
            curve, seconds = train_setting(name, config, x_val, brain_val, args.iterations, args.every)
            points = "  ".join(f"{i}: {mse:.4f}" for i, mse in curve)
            print(f"{name:18s} {points}  ({seconds:.0f} s)", flush=True)


if __name__ == "__main__":
    main()
