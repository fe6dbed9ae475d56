"""The scrps bundle's own code: StyleGAN2, its training step, W+ inversion, repository building
and the detector (retrieval, combination and swap live in `medanomaly.latent`)."""

from pathlib import Path

from scripts.inversion import LatentInverter, learning_rate, resize
from scripts.scrps import SCRPSMethod, brain_slices, build_repository, load_generator
from scripts.stylegan2 import (
    Discriminator,
    Generator,
    constant_shape,
    discriminator_loss,
    generator_loss,
    layer_map,
    num_ws,
    path_length_penalty,
    r1_penalty,
    to_unit,
)
from scripts.training import StyleGAN2Step, ema_copy, update_ema

BUNDLE_ROOT = str(Path(__file__).resolve().parents[1])

__all__ = ["BUNDLE_ROOT", "Discriminator", "Generator", "LatentInverter", "SCRPSMethod", "StyleGAN2Step",
           "brain_slices", "build_repository", "constant_shape", "discriminator_loss", "ema_copy", "generator_loss",
           "layer_map", "learning_rate", "load_generator", "num_ws", "path_length_penalty", "r1_penalty", "resize",
           "to_unit", "update_ema"]
