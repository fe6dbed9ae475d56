"""Foreign patch interpolation (FPI, Tan et al. 2020), the pseudo-anomaly of SAGAN.

One square, centre in the central 60 % of the slice, half-width 5-20 % of the width, is
replaced by ``(1 - alpha) x + alpha x_other`` with alpha ~ U(0, 1) and x_other another
healthy slice at the same location. Linear, so it works on [0, 1] or [-1, 1] images alike.
"""

from __future__ import annotations

import numpy as np

from medanomaly.anomalies.sources import as_slice, brain_of, like_input


def fpi_square(image_shape: tuple[int, int], rng: np.random.Generator,
               centre_range: tuple[float, float] = (0.2, 0.8),
               half_width_range: tuple[float, float] = (0.05, 0.2)) -> tuple[slice, slice]:
    """Rows and columns of a random FPI square (clipped to the image)."""
    height, width = image_shape
    half = max(int(round(rng.uniform(*half_width_range) * width)), 1)
    centre = [int(round(rng.uniform(centre_range[0] * size, centre_range[1] * size))) for size in image_shape]
    return tuple(slice(max(c - half, 0), min(c + half, size)) for c, size in zip(centre, (height, width)))


def foreign_patch_interpolation(image, other, brain_mask=None, rng: np.random.Generator | int | None = None,
                                alpha: float | None = None, **square_options):
    """`(image', mask, alpha)`: `image` with one square alpha-blended with `other` (same shape).

    With a `brain_mask`, the result is zeroed outside the brain and the mask is the square
    times the brain; without one, the whole square is blended (the paper's FPI). Arrays are
    (H, W) or (1, H, W); outputs are float32 in the layout of `image`."""
    rng = rng if isinstance(rng, np.random.Generator) else np.random.default_rng(rng)
    x, x_other = as_slice(image), as_slice(other, "other image")
    if x_other.shape != x.shape:
        raise ValueError(f"FPI blends the same location of two slices: the other slice has shape "
                         f"{x_other.shape}, the image {x.shape}. Resize them to one grid first.")
    rows, cols = fpi_square(x.shape, rng, **square_options)
    alpha = float(rng.uniform(0.0, 1.0)) if alpha is None else float(alpha)
    mask = np.zeros(x.shape, dtype=bool)
    mask[rows, cols] = True
    blended = x.copy()
    blended[mask] = (1.0 - alpha) * x[mask] + alpha * x_other[mask]
    if brain_mask is not None:
        brain = brain_of(x, brain_mask)
        blended, mask = blended * brain, mask & brain
    return like_input(blended, image), like_input(mask, image), alpha
