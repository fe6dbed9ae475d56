"""The cddpm bundle's own code: the diffusion training step, sampling, and the detector
around MONAI's DiffusionModelUNet."""

from pathlib import Path

from scripts.cddpm import (
    ConditionedDiffusionMethod,
    SeedPerVolume,
    TextureSource,
    fixed_samples,
    fold_files,
    load_networks,
)
from scripts.diffusion import (
    DiffusionTrainingStep,
    DiffusionValidationStep,
    StridedDDPM,
    diffusion_loss,
    ema_model,
    make_scheduler,
    min_snr_weights,
    sample,
    strided_timesteps,
)

BUNDLE_ROOT = str(Path(__file__).resolve().parents[1])

__all__ = ["BUNDLE_ROOT", "ConditionedDiffusionMethod", "DiffusionTrainingStep", "DiffusionValidationStep",
           "SeedPerVolume", "StridedDDPM", "TextureSource", "diffusion_loss", "ema_model", "fixed_samples",
           "fold_files", "load_networks", "make_scheduler", "min_snr_weights", "sample", "strided_timesteps"]
