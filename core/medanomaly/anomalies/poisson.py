"""Poisson image editing (Perez et al. 2003) on one 2D slice.

Inside the region the result f solves the discrete Poisson equation
``sum_q (f_p - f_q) = sum_q v_pq`` over the 4-neighbours q of p, where the guidance
v_pq is the source's gradient g_p - g_q ("source gradients"), or whichever of the
source's and the target's gradient is stronger ("mixed gradients"). Outside the region
f is the target, which gives the Dirichlet boundary: the blended patch meets its
surroundings without a seam but carries the source's texture.

Edges to pixels outside the brain (or outside the image) are left out of the equation
(zero flux): the brain surface is not the anomaly's boundary, and pinning the patch to
the black background there would darken it. The symmetric positive-definite system is
solved by conjugate gradients started from the target, a few milliseconds for the
largest patches of a 128 x 128 slice.
"""

from __future__ import annotations

import logging

import numpy as np
from scipy import ndimage, sparse
from scipy.sparse.linalg import cg

logger = logging.getLogger(__name__)
_NEIGHBOURS = ((0, 1), (0, -1), (1, 0), (-1, 0))
# A tiny pull towards the target keeps the system definite for pieces of the region that
# touch no brain outside it (no Dirichlet data); it changes the result by ~1e-4 at most.
_TARGET_PULL = 1e-4


def poisson_blend(target: np.ndarray, source: np.ndarray, region: np.ndarray,
                  brain: np.ndarray | None = None, mixed_gradients: bool = False,
                  tolerance: float = 1e-6) -> np.ndarray:
    """Blend `source` into `target` (2D arrays of one shape, the source already aligned on
    the target's grid) inside the boolean `region` (restricted to `brain` when given).
    Returns a float64 image equal to the target outside the region; not clipped."""
    target = np.asarray(target, dtype=np.float64)
    source = np.asarray(source, dtype=np.float64)
    brain = np.ones(target.shape, dtype=bool) if brain is None else np.asarray(brain, dtype=bool)
    inside = np.asarray(region, dtype=bool) & brain
    rows, cols = np.nonzero(inside)
    n = rows.size
    if n == 0:
        return target.copy()

    index = np.full(target.shape, -1, dtype=np.int64)
    index[rows, cols] = np.arange(n)
    diagonal = np.full(n, _TARGET_PULL)
    rhs = _TARGET_PULL * target[rows, cols]
    off_rows, off_cols = [], []
    for drow, dcol in _NEIGHBOURS:
        n_rows, n_cols = rows + drow, cols + dcol
        on_image = (n_rows >= 0) & (n_rows < target.shape[0]) & (n_cols >= 0) & (n_cols < target.shape[1])
        n_rows, n_cols = np.clip(n_rows, 0, target.shape[0] - 1), np.clip(n_cols, 0, target.shape[1] - 1)
        linked = on_image & brain[n_rows, n_cols]
        guidance = source[rows, cols] - source[n_rows, n_cols]
        if mixed_gradients:
            target_gradient = target[rows, cols] - target[n_rows, n_cols]
            guidance = np.where(np.abs(target_gradient) > np.abs(guidance), target_gradient, guidance)
        diagonal += linked
        rhs += np.where(linked, guidance, 0.0)
        neighbour = index[n_rows, n_cols]
        unknown = linked & (neighbour >= 0)
        off_rows.append(np.nonzero(unknown)[0])
        off_cols.append(neighbour[unknown])
        known = linked & (neighbour < 0)  # the Dirichlet boundary: the target's own values
        rhs += np.where(known, target[n_rows, n_cols], 0.0)

    off_rows, off_cols = np.concatenate(off_rows), np.concatenate(off_cols)
    matrix = sparse.csr_matrix(
        (np.concatenate([diagonal, -np.ones(off_rows.size)]),
         (np.concatenate([np.arange(n), off_rows]), np.concatenate([np.arange(n), off_cols]))),
        shape=(n, n),
    )
    solution, info = cg(matrix, rhs, x0=target[rows, cols], rtol=tolerance, atol=0.0, maxiter=10 * n)
    if info != 0:
        logger.warning("Poisson blending of %d pixels stopped before converging (cg info %d).", n, info)
    blended = target.copy()
    blended[rows, cols] = solution
    return blended


def warp_source(source: np.ndarray, source_centre: np.ndarray, target_centre: np.ndarray,
                target_shape: tuple[int, int], rotation: float = 0.0, scale: float = 1.0) -> np.ndarray:
    """The source resampled onto the target grid: the target pixel at `target_centre` reads
    the source at `source_centre`; around it the patch is rotated by `rotation` (radians)
    and magnified by 1 / `scale`. Pixels that fall outside the source read 0."""
    rows, cols = np.mgrid[: target_shape[0], : target_shape[1]].astype(np.float64)
    drow, dcol = rows - target_centre[0], cols - target_centre[1]
    cos, sin = np.cos(rotation) * scale, np.sin(rotation) * scale
    coordinates = np.stack([source_centre[0] + cos * drow - sin * dcol,
                            source_centre[1] + sin * drow + cos * dcol])
    return ndimage.map_coordinates(np.asarray(source, dtype=np.float64), coordinates, order=1,
                                   mode="constant", cval=0.0)
