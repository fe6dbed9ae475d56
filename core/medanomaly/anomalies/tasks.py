"""The five "many tasks" restoration tasks, each applied to one region of one slice.

Every task has the signature ``task(image, brain, region, rng, *, source=None, **options)``
and returns a new float64 image, in [0, 1], that differs from `image` only inside
``region ∩ brain``. `image` and `brain` are 2D; `source` is ``(image, brain)`` of the slice a
Poisson task takes its patch from (the other tasks ignore it).

* ``poisson_same`` / ``poisson_other``: a rotated, rescaled patch of another slice, Poisson
  blended in (mixed gradients and one DST solve on the region's bounding box by default, as in
  the reference code); the two differ only in where the caller's `SyntheticAnomaly` takes the
  source slice from.
* ``sink`` / ``source``: a smooth radial deformation that pulls the content towards the
  region's centre (sink) or pushes it outwards (source). Pixels sample the image at a
  displaced radius ``R(theta) * phi(r / R(theta))`` with ``phi(x) = x + a x (1 - x)^2`` for the
  sink and its inverse for the source: the centre stays put, displacement and its gradient
  vanish at the edge (no crease), and the map is monotonic (no folding) for a < 3. The
  largest displacement (the "push", 0.5-5 pixels at 128 x 128 as in the reference) sets a.
* ``intensity``: a smooth change of random sign and magnitude (scale/2 + Gamma(3, scale),
  scale 0.1), modulated by multi-octave smooth noise and faded in from the region's edge.
"""

from __future__ import annotations

from itertools import combinations
from typing import Callable

import numpy as np
from scipy import ndimage

from medanomaly.anomalies.poisson import poisson_blend, ring_window, warp_source
from medanomaly.anomalies.shapes import AnomalyRegion

_REFERENCE_SIZE = 128  # the reference code's push range is given in pixels of a 128-pixel slice
_MAX_BEND = 2.5  # keeps the radial profile strictly monotonic (it folds at a = 3)


# --- Poisson blending -----------------------------------------------------------------------

def poisson_blending(image: np.ndarray, brain: np.ndarray, region: AnomalyRegion, rng: np.random.Generator,
                     *, source: tuple[np.ndarray, np.ndarray] | None = None,
                     mixed_gradients: bool = True, solver: str = "box") -> np.ndarray:
    """Blend a random patch of `source` (default: this slice itself) into the region.
    `solver`: see `poisson_blend`; "box" (the reference code's one DST solve on the region's
    bounding box) by default, "auto" for the exact blend of Perez et al. on the region."""
    source_image, source_brain = (image, brain) if source is None else source
    candidates = np.argwhere(source_brain)
    if len(candidates) == 0:
        candidates = np.argwhere(np.ones(source_image.shape, dtype=bool))
    source_centre = candidates[rng.integers(len(candidates))] + rng.uniform(-0.5, 0.5, size=2)
    change = 1.0 + rng.exponential(0.1)
    mask = region.mask(image.shape)
    patch = warp_source(source_image, source_centre, np.asarray(region.centre), image.shape,
                        rotation=rng.uniform(-np.pi / 4, np.pi / 4),
                        scale=change if rng.random() < 0.5 else 1.0 / change, window=ring_window(mask & brain))
    blended = poisson_blend(image, patch, mask, brain, mixed_gradients=mixed_gradients, solver=solver)
    return np.clip(blended, 0.0, 1.0)


# --- Radial deformations ----------------------------------------------------------------------

def sink_profile(x: np.ndarray, bend: float) -> np.ndarray:
    """Relative radius a sink reads from for a pixel at relative radius x in [0, 1]."""
    return x + bend * x * (1.0 - x) ** 2


def source_profile(x: np.ndarray, bend: float) -> np.ndarray:
    """The inverse of `sink_profile`: a source deformation undoes a sink of the same bend."""
    table = np.linspace(0.0, 1.0, 1025)
    return np.interp(x, sink_profile(table, bend), table)


def radial_deformation(image: np.ndarray, brain: np.ndarray, region: AnomalyRegion, push: float,
                       inwards: bool) -> np.ndarray:
    """Deform the region so its content moves by up to `push` pixels towards its centre
    (`inwards`, a sink) or away from it (a source)."""
    window, drow, dcol, _, relative = region.polar(image.shape)
    inside = (relative < 1.0) & brain[window]
    # The profile's largest displacement is 4/27 of the bend times the radius.
    bend = min(27.0 * push / (4.0 * region.max_radius), _MAX_BEND)
    x = relative[inside]
    read_at = sink_profile(x, bend) if inwards else source_profile(x, bend)
    stretch = np.divide(read_at, x, out=np.ones_like(x), where=x > 0)
    coordinates = np.stack([region.centre[0] + drow[inside] * stretch, region.centre[1] + dcol[inside] * stretch])
    deformed = np.array(image, dtype=np.float64)
    deformed[window][inside] = ndimage.map_coordinates(deformed, coordinates, order=1, mode="nearest")
    return deformed


def _random_push(image_shape: tuple[int, int], rng: np.random.Generator,
                 push_range: tuple[float, float]) -> float:
    return rng.uniform(*push_range) * min(image_shape) / _REFERENCE_SIZE


def sink_deformation(image: np.ndarray, brain: np.ndarray, region: AnomalyRegion, rng: np.random.Generator,
                     *, source=None, push: float | None = None,
                     push_range: tuple[float, float] = (0.5, 5.0)) -> np.ndarray:
    """Pull the region's content towards its centre (push in pixels; random when None,
    `push_range` pixels at 128 x 128, scaled with the slice size)."""
    push = _random_push(image.shape, rng, push_range) if push is None else push
    return radial_deformation(image, brain, region, push, inwards=True)


def source_deformation(image: np.ndarray, brain: np.ndarray, region: AnomalyRegion, rng: np.random.Generator,
                       *, source=None, push: float | None = None,
                       push_range: tuple[float, float] = (0.5, 5.0)) -> np.ndarray:
    """Push the region's content away from its centre (see `sink_deformation`)."""
    push = _random_push(image.shape, rng, push_range) if push is None else push
    return radial_deformation(image, brain, region, push, inwards=False)


# --- Smooth intensity change ------------------------------------------------------------------

def smooth_noise(shape: tuple[int, int], rng: np.random.Generator) -> np.ndarray:
    """Multi-octave smooth value noise in [0, 1]: a coarse random grid per octave,
    cubic-spline interpolated; octaves double the frequency and halve the amplitude."""
    max_cells = max(float(np.mean(shape)) / 3.0, 1.0)  # no feature smaller than ~3 pixels
    cells = min(1.0 + rng.exponential((max_cells - 1.0) / 4.5), max_cells) if max_cells > 1 else 1.0
    octaves = 1 + min(rng.poisson(1.0), int(np.floor(np.log2(max_cells / cells))))  # finest <= max_cells
    total = np.zeros(shape)
    for octave in range(octaves):
        per_axis = cells * 2**octave * rng.normal(1.0, 0.1, size=2).clip(0.5)
        coarse = rng.standard_normal(tuple(int(np.ceil(c)) + 4 for c in per_axis))
        rows, cols = np.meshgrid(*(1.5 + np.arange(s) * c / s for s, c in zip(shape, per_axis)), indexing="ij")
        total += 0.5**octave * ndimage.map_coordinates(coarse, [rows, cols], order=3, mode="nearest")
    total -= total.min()
    return total / max(total.max(), 1e-12)


def intensity_change(image: np.ndarray, brain: np.ndarray, region: AnomalyRegion, rng: np.random.Generator,
                     *, source=None, scale: float = 0.1) -> np.ndarray:
    """Add a smooth, noise-modulated brightening or darkening to the region."""
    window, *_, relative = region.polar(image.shape)
    shape_mask = relative < 1.0
    # Distance to the region's edge; the zero padding only matters where the image border clips it.
    depth = ndimage.distance_transform_edt(np.pad(shape_mask, 1))[1:-1, 1:-1]
    fade_width = min(min(image.shape) * (0.02 + rng.gamma(3.0, 0.01)), float(depth.max()))
    fade = np.clip(depth / max(fade_width, 1e-6), 0.0, 1.0)
    magnitude = (scale / 2 + rng.gamma(3.0, scale)) * rng.choice([-1.0, 1.0])
    change = magnitude * smooth_noise(shape_mask.shape, rng) * fade * brain[window]
    changed = np.array(image, dtype=np.float64)
    changed[window] = np.clip(changed[window] + change, 0.0, 1.0)
    return changed


# --- Registry and folds -------------------------------------------------------------------

Task = Callable[..., np.ndarray]
TASKS: dict[str, Task] = {
    "poisson_same": poisson_blending,
    "poisson_other": poisson_blending,
    "sink": sink_deformation,
    "source": source_deformation,
    "intensity": intensity_change,
}
TASK_NAMES: tuple[str, ...] = tuple(TASKS)


def task_folds(n_folds: int = 10, n_train_tasks: int = 3) -> list[tuple[tuple[str, ...], tuple[str, ...]]]:
    """Deterministic (training tasks, validation tasks) splits: the first `n_folds` of all
    combinations of `n_train_tasks` of the five tasks (in `TASK_NAMES` order), validated
    on the rest. 10 folds x 3 tasks = every combination; each task is validated in 4."""
    splits = list(combinations(TASK_NAMES, n_train_tasks))
    if not 1 <= n_folds <= len(splits):
        raise ValueError(f"n_folds={n_folds} is not possible with {n_train_tasks} training tasks out of "
                         f"{len(TASK_NAMES)}: choose 1 to {len(splits)} folds.")
    return [(train, tuple(t for t in TASK_NAMES if t not in train)) for train in splits[:n_folds]]
