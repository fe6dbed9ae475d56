"""Synthetic anomalies used *for training*, never the test lesions.

* The five "many tasks" restoration tasks of the image-conditioned diffusion model
  (`TASKS`: "poisson_same", "poisson_other", "sink", "source", "intensity"), the
  `SyntheticAnomaly` that applies 1-4 of them to a slice (20 % of slices left clean) and
  `task_folds`, the 10 train/validation splits over the tasks.
* `foreign_patch_interpolation` (FPI), the pseudo-anomaly of SAGAN.
* MONAI dictionary transforms `RandSyntheticAnomalyd` and `RandFPId` (loaded on first
  use, so the numpy core imports without torch).

Everything works on one 2D slice, (H, W) or (1, H, W), in [0, 1] and 0 outside the brain,
and draws its random numbers from a numpy Generator.
"""

from medanomaly.anomalies.fpi import foreign_patch_interpolation, fpi_square
from medanomaly.anomalies.poisson import poisson_blend, warp_source
from medanomaly.anomalies.shapes import AnomalyRegion, inside_fraction, sample_region
from medanomaly.anomalies.synthetic import AnomalyResult, SyntheticAnomaly
from medanomaly.anomalies.tasks import (
    TASK_NAMES,
    TASKS,
    intensity_change,
    poisson_blending,
    radial_deformation,
    sink_deformation,
    smooth_noise,
    source_deformation,
    task_folds,
)

fpi = foreign_patch_interpolation

_TRANSFORMS = {"RandSyntheticAnomalyd", "RandFPId"}

__all__ = [
    "AnomalyRegion", "AnomalyResult", "RandFPId", "RandSyntheticAnomalyd", "SyntheticAnomaly", "TASKS",
    "TASK_NAMES", "foreign_patch_interpolation", "fpi", "fpi_square", "inside_fraction", "intensity_change",
    "poisson_blend", "poisson_blending", "radial_deformation", "sample_region", "sink_deformation",
    "smooth_noise", "source_deformation", "task_folds", "warp_source",
]


def __getattr__(name: str):
    if name in _TRANSFORMS:
        from medanomaly.anomalies import transforms

        return getattr(transforms, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
