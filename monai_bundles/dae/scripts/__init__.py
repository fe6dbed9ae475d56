"""The dae bundle's own code: the coarse-noise corruption and the detector around MONAI's UNet."""

from pathlib import Path

from scripts.dae import CoarseNoised, DenoisingAutoencoderMethod, prepare_denoising_batch, prepare_reconstruction_batch

BUNDLE_ROOT = str(Path(__file__).resolve().parents[1])

__all__ = ["BUNDLE_ROOT", "CoarseNoised", "DenoisingAutoencoderMethod", "prepare_denoising_batch",
           "prepare_reconstruction_batch"]
