"""Data: MONAI transforms of the brain-MRI pipeline, Decathlon-style datalists and the synthetic cohort."""

from medanomaly.data.datalist import load_datalist, write_datalist
from medanomaly.data.synth import PRESETS, cohort_root, ensure_cohort, generate_cohort, save_montage
from medanomaly.data.transforms import (
    IMAGE,
    LABEL,
    MASK,
    axial_axis,
    brain_mask_from_image,
    intensity_window,
    preprocessing,
    random_axial_slices,
)

__all__ = [
    "IMAGE", "LABEL", "MASK", "PRESETS", "axial_axis", "brain_mask_from_image", "cohort_root",
    "ensure_cohort", "generate_cohort", "intensity_window", "load_datalist", "preprocessing",
    "random_axial_slices", "save_montage", "write_datalist",
]
