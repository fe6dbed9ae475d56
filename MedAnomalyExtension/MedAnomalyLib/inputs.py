"""Checks of the volumes a user picks, before anything is written or launched (standard
library only, so the module can run them even before ``medanomaly`` is installed)."""

from __future__ import annotations


class InputError(ValueError):
    """The chosen input cannot be used; the message says what to do."""


def check_input(dimensions, components: int = 1, name: str = "The input volume") -> None:
    """Raises `InputError` unless (dimensions, scalar components) describe a 3D single-channel
    volume: no image data, a colour / vector / multi-volume (4D) image, or a single slice (2D)."""
    dimensions = tuple(int(d) for d in dimensions or ())
    if len(dimensions) != 3 or min(dimensions, default=0) <= 0:
        raise InputError(f"{name} has no image data. Load a volume first.")
    if components != 1:
        raise InputError(
            f"{name} has {components} values per voxel (a colour, vector or multi-volume / 4D image). "
            "Pick a single 3D scalar volume, e.g. one frame of a sequence or one channel.")
    if min(dimensions) < 2:
        raise InputError(f"{name} is a 2D image (size {dimensions[0]} x {dimensions[1]} x {dimensions[2]}). "
                         "Anomaly detection needs a 3D brain MRI volume.")


def same_grid(input_dimensions, input_ijk_to_ras, other_dimensions, other_ijk_to_ras, tolerance: float = 1e-3) -> bool:
    """Same size, and the same 4x4 IJK-to-RAS matrix within `tolerance` mm (the rule of
    `medanomaly.io.check_same_grid`)."""
    same_size = tuple(int(d) for d in input_dimensions) == tuple(int(d) for d in other_dimensions)
    return same_size and all(abs(float(a) - float(b)) <= tolerance
                             for row_a, row_b in zip(input_ijk_to_ras, other_ijk_to_ras) for a, b in zip(row_a, row_b))


def check_same_grid(input_dimensions, input_ijk_to_ras, mask_dimensions, mask_ijk_to_ras,
                    tolerance: float = 1e-3) -> None:
    """Raises `InputError` unless the brain mask lies on exactly the input's voxel grid."""
    if not same_grid(input_dimensions, input_ijk_to_ras, mask_dimensions, mask_ijk_to_ras, tolerance):
        raise InputError("The brain mask is not on the input volume's grid (size, spacing, origin and axes must "
                         "match). Resample it to the input first (e.g. with the Resample Scalar/Vector/DWI Volume "
                         "module), or leave the mask empty: the method then finds the brain itself.")
