"""The phanes bundle's own code: RA soft-intro VAE, AOT-GAN inpainter, their two-stage trainer
and the PHANES detector. Shared pieces (masking, scoring, data, engine) come from `medanomaly`."""

from pathlib import Path

from scripts.losses import VGG19Features
from scripts.networks import PHANES, AOTGenerator, Inpainter, PatchDiscriminator, SoftIntroVAE
from scripts.phanes import PhanesMethod, load_mask_threshold, load_phanes
from scripts.trainer import InpainterStep, PhanesTrainer, VAEStep, calibrate_mask_thresholds

BUNDLE_ROOT = str(Path(__file__).resolve().parents[1])

__all__ = ["BUNDLE_ROOT", "PHANES", "AOTGenerator", "Inpainter", "PatchDiscriminator", "SoftIntroVAE",
           "VGG19Features", "PhanesMethod", "load_mask_threshold", "load_phanes", "InpainterStep", "PhanesTrainer",
           "VAEStep", "calibrate_mask_thresholds"]
