"""Where a synthetic anomaly goes and what outline it has.

Every anomaly region is *star-shaped* around its centre: a pixel is inside when its
distance to the centre is below `boundary(angle)`. That one description covers ellipses,
rounded rectangles (super-ellipses) and irregular blobs (an ellipse whose rim is
perturbed by a few harmonics), and it tells the radial deformations, for every
direction, exactly how far the edge is.

Sizes follow the "many tasks" recipe: each side is (0.03 + Gamma(shape=2, scale=0.1)) x
the image size, clipped to 6-80 % of the brain's bounding box; the region is placed so
that at least half of it lies inside the brain.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from functools import cached_property, lru_cache

import numpy as np

SHAPE_KINDS = ("ellipse", "rounded_rectangle", "irregular")
_ANGLES = np.linspace(-np.pi, np.pi, 361)[:-1]  # dense enough to measure a smooth outline


@dataclass(frozen=True)
class AnomalyRegion:
    """A star-shaped region: centre (row, col) in pixels, semi-axes (along x, along y)
    before rotation by `angle` (radians), super-ellipse `exponent` (2 = ellipse, larger =
    closer to a rectangle) and rim `harmonics` (relative amplitude, phase, order)."""

    centre: tuple[float, float]
    semi_axes: tuple[float, float]
    angle: float = 0.0
    exponent: float = 2.0
    harmonics: tuple[tuple[float, float, int], ...] = ()

    def boundary(self, theta: np.ndarray) -> np.ndarray:
        """Distance from the centre to the edge in direction `theta` (atan2(drow, dcol))."""
        phi = np.asarray(theta, dtype=float) - self.angle
        a, b = self.semi_axes
        n = self.exponent
        radius = (np.abs(np.cos(phi) / a) ** n + np.abs(np.sin(phi) / b) ** n) ** (-1.0 / n)
        rim = 1.0 + sum(amp * np.cos(order * phi + phase) for amp, phase, order in self.harmonics)
        return radius * rim

    @cached_property
    def max_radius(self) -> float:
        return float(self.boundary(_ANGLES).max())

    @cached_property
    def area(self) -> float:
        """Exact area of the outline (not clipped by the image): 1/2 * integral of R(theta)^2."""
        return float(np.pi * np.mean(self.boundary(_ANGLES) ** 2))

    def footprint(self) -> np.ndarray:
        """Height and width of the outline's bounding box, in pixels."""
        radius = self.boundary(_ANGLES)
        rows, cols = radius * np.sin(_ANGLES), radius * np.cos(_ANGLES)
        return np.array([np.ptp(rows), np.ptp(cols)])

    def scaled(self, factor: float) -> AnomalyRegion:
        a, b = self.semi_axes
        return replace(self, semi_axes=(a * factor, b * factor))

    def window(self, image_shape: tuple[int, int]) -> tuple[slice, slice]:
        """The image rows and columns the region can touch (its bounding box, clipped)."""
        reach = self.max_radius + 1.0
        return tuple(
            slice(max(int(np.floor(c - reach)), 0), min(int(np.ceil(c + reach)) + 1, size))
            for c, size in zip(self.centre, image_shape)
        )

    def polar(self, image_shape: tuple[int, int]):
        """Pixel offsets from the centre over the region's window: `(window, drow, dcol,
        radius, relative_radius)` where relative_radius < 1 exactly inside the region."""
        window = self.window(image_shape)
        rows, cols = np.mgrid[window]
        drow, dcol = rows - self.centre[0], cols - self.centre[1]
        radius = np.hypot(drow, dcol)
        relative = radius / self.boundary(np.arctan2(drow, dcol))
        return window, drow, dcol, radius, relative

    def mask(self, image_shape: tuple[int, int]) -> np.ndarray:
        """Boolean image of the region (not restricted to the brain), read-only: it is cached, since
        placing, applying and labelling one anomaly each ask for it."""
        return _region_mask(self, tuple(image_shape))


@lru_cache(maxsize=16)
def _region_mask(region: AnomalyRegion, image_shape: tuple[int, int]) -> np.ndarray:
    window, *_, relative = region.polar(image_shape)
    full = np.zeros(image_shape, dtype=bool)
    full[window] = relative < 1.0
    full.flags.writeable = False
    return full


def random_outline(side_lengths: np.ndarray, rng: np.random.Generator) -> AnomalyRegion:
    """An outline with the given (height, width) before rotation, of a random kind, centred at 0."""
    kind = SHAPE_KINDS[rng.integers(len(SHAPE_KINDS))]
    exponent = rng.uniform(3.0, 8.0) if kind == "rounded_rectangle" else 2.0
    harmonics = ()
    if kind == "irregular":
        # Three low harmonics, amplitudes summing to < 0.4 so the radius stays positive.
        orders = rng.choice(np.arange(2, 6), size=3, replace=False)
        harmonics = tuple((rng.uniform(0.0, 0.13), rng.uniform(0, 2 * np.pi), int(k)) for k in orders)
    return AnomalyRegion(
        centre=(0.0, 0.0),
        semi_axes=(side_lengths[1] / 2, side_lengths[0] / 2),
        angle=rng.uniform(-np.pi / 2, np.pi / 2),
        exponent=exponent,
        harmonics=harmonics,
    )


def brain_extent(brain: np.ndarray) -> np.ndarray:
    """Height and width of the brain's bounding box (the whole image if the brain is empty)."""
    rows, cols = np.nonzero(brain)
    if rows.size == 0:
        return np.array(brain.shape, dtype=float)
    return np.array([np.ptp(rows) + 1, np.ptp(cols) + 1], dtype=float)


def sample_side_lengths(brain: np.ndarray, rng: np.random.Generator,
                        side_bounds: tuple[float, float] = (0.06, 0.8)) -> tuple[np.ndarray, np.ndarray]:
    """Random (height, width) of a region and the largest allowed footprint."""
    extent = brain_extent(brain)
    low = np.maximum(side_bounds[0] * extent, 3.0)  # at least a few pixels, or nothing is visible
    high = np.maximum(side_bounds[1] * extent, low)
    sides = (0.03 + rng.gamma(shape=2.0, scale=0.1, size=2)) * np.array(brain.shape)
    return np.clip(sides, low, high), high


def inside_fraction(region: AnomalyRegion, brain: np.ndarray) -> float:
    """Share of the region's area that lies inside the brain."""
    return float(np.count_nonzero(region.mask(brain.shape) & brain)) / max(region.area, 1e-9)


def sample_region(brain: np.ndarray, rng: np.random.Generator, min_inside: float = 0.5,
                  side_bounds: tuple[float, float] = (0.06, 0.8), attempts: int = 100) -> AnomalyRegion | None:
    """A random region with at least `min_inside` of its area in the brain, or None when the
    brain is too small to hold one (then the caller leaves the slice as it is)."""
    brain_pixels = np.argwhere(brain)
    if len(brain_pixels) == 0:
        return None
    sides, largest = sample_side_lengths(brain, rng, side_bounds)
    outline = random_outline(sides, rng)
    # Rotation can widen the footprint beyond the bound: shrink it back (as the reference does).
    outline = outline.scaled(min(1.0, float(np.min(largest / outline.footprint()))))
    for _ in range(4):  # a thin or tiny brain may not hold the region: halve it and try again
        for _ in range(attempts):
            centre = brain_pixels[rng.integers(len(brain_pixels))] + rng.uniform(-0.5, 0.5, size=2)
            candidate = replace(outline, centre=(float(centre[0]), float(centre[1])))
            if inside_fraction(candidate, brain) >= min_inside:
                return candidate
        outline = outline.scaled(0.5)
    return None
