"""Data: MONAI transforms of the brain-MRI pipeline, Decathlon-style datalists and the synthetic cohort."""

from medanomaly.data.cache import PersistentCacheDataset
from medanomaly.data.contrast import CONTRASTS, DEFAULT_CONTRAST, check_contrast
from medanomaly.data.datalist import load_datalist, write_datalist
from medanomaly.data.synth import (
                                   PRESETS,
                                   cohort_root,
                                   datalist_items,
                                   ensure_cohort,
                                   generate_cohort,
                                   resolve_datalist,
                                   save_montage,
)
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
    "CONTRASTS", "DEFAULT_CONTRAST", "IMAGE", "LABEL", "MASK", "PRESETS", "PersistentCacheDataset", "check_contrast",
    "axial_axis", "brain_mask_from_image", "cohort_root",
    "datalist_items", "ensure_cohort", "generate_cohort", "intensity_window", "load_datalist", "preprocessing",
    "random_axial_slices", "resolve_datalist", "save_montage", "write_datalist",
]
