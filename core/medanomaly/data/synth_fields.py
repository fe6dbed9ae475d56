"""Building blocks of the synthetic cohort: the MNI152 template maps and smooth random fields.

The template maps come from the files that `nilearn` ships (no download): the ICBM 2009
T1 template, its grey- and white-matter probability maps and nilearn's brain mask (the
template above 0.2). They are loaded once per process, cropped to the brain and kept as
float32. Cerebrospinal fluid is what the mask holds beyond grey and white matter. Deep grey
nuclei (basal ganglia, thalamus) are the grey matter more than 15 mm below the brain's surface
within a box about the MNI midline that excludes the insula, cingulate and temporal cortex. The
T1 template's detail that a four-tissue model cannot explain (the corpus callosum, partial
volume, fine anatomy) is kept as a residual map, in units of the template's white-minus-grey
contrast, so subjects carry real anatomical detail in every contrast and not a cartoon of tissues.

Smooth random fields (elastic displacement, bias field, lesion irregularity) are cubic
B-spline free-form fields: a small grid of random control values, evaluated on the full
grid with one matrix product per axis, which is much faster than upsampling by
interpolation.
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass

import numpy as np

logger = logging.getLogger(__name__)

# Margin, in template voxels (1 mm), kept around the brain when the template is cropped.
_CROP_MARGIN = 4


@dataclass(frozen=True)
class TemplateMaps:
    """MNI152 maps cropped to the brain, float32, on a 1 mm grid.

    `affine` maps template voxel indices to MNI millimetres; `inv_affine` the other way.
    `residual` is the T1 template minus its best four-tissue fit, in units of the template's
    white-minus-grey contrast (a voxel at +1 looks one white-vs-grey step more like white
    matter), and 0 outside the mask.
    """

    mask: np.ndarray
    gm: np.ndarray  # all grey matter (cortical and deep)
    wm: np.ndarray
    deep_gm: np.ndarray  # the part of `gm` that lies in deep grey nuclei
    residual: np.ndarray
    affine: np.ndarray
    inv_affine: np.ndarray
    brain_min_mm: np.ndarray
    brain_max_mm: np.ndarray
    brain_centre_mm: np.ndarray


@functools.lru_cache(maxsize=1)
def load_template() -> TemplateMaps:
    """The MNI152 template maps, loaded from nilearn's package data (once per process)."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from nilearn import datasets

        t1_img = datasets.load_mni152_template(resolution=1)
        gm_img = datasets.load_mni152_gm_template(resolution=1)
        wm_img = datasets.load_mni152_wm_template(resolution=1)
        mask_img = datasets.load_mni152_brain_mask(resolution=1)
    affine = np.asarray(t1_img.affine, dtype=np.float64)
    for img in (gm_img, wm_img, mask_img):
        if img.shape != t1_img.shape or not np.allclose(img.affine, affine):
            raise RuntimeError("nilearn's MNI152 maps do not share one grid; this nilearn version is not supported.")
    mask = np.asarray(mask_img.dataobj, dtype=np.float32) > 0.5
    extent = [np.flatnonzero(mask.any(axis=tuple(a for a in range(3) if a != ax))) for ax in range(3)]
    lo = np.maximum(np.array([e[0] for e in extent]) - _CROP_MARGIN, 0)
    hi = np.minimum(np.array([e[-1] for e in extent]) + _CROP_MARGIN + 1, mask.shape)
    crop = tuple(slice(int(a), int(b)) for a, b in zip(lo, hi))

    def _crop(img) -> np.ndarray:
        return np.ascontiguousarray(np.asarray(img.get_fdata(dtype=np.float32), dtype=np.float32)[crop])

    t1, gm, wm = _crop(t1_img), _crop(gm_img), _crop(wm_img)
    mask = np.ascontiguousarray(mask[crop].astype(np.float32))
    gm = np.clip(gm, 0.0, 1.0) * mask
    wm = np.clip(wm, 0.0, 1.0) * mask
    csf = np.clip(mask - gm - wm, 0.0, 1.0)
    shift = np.eye(4)
    shift[:3, 3] = lo
    affine = affine @ shift
    deep = gm * _deep_nuclei_weight(mask > 0.5, affine)
    cortex = gm - deep
    inside = mask > 0.5
    design = np.stack([cortex[inside], deep[inside], wm[inside], csf[inside]], axis=1).astype(np.float64)
    coef, *_ = np.linalg.lstsq(design, t1[inside].astype(np.float64), rcond=None)
    fit = cortex * coef[0] + deep * coef[1] + wm * coef[2] + csf * coef[3]
    residual = ((t1 - fit) / (coef[2] - coef[0]) * mask).astype(np.float32)

    ijk = np.argwhere(inside)
    mm_lo = ijk.min(0) @ affine[:3, :3].T + affine[:3, 3]
    mm_hi = ijk.max(0) @ affine[:3, :3].T + affine[:3, 3]
    mm_centre = ijk.mean(0) @ affine[:3, :3].T + affine[:3, 3]
    logger.debug("MNI152 template loaded: cropped to %s voxels, tissue fit %s", gm.shape, coef)
    return TemplateMaps(
        mask=mask,
        gm=gm.astype(np.float32),
        wm=wm.astype(np.float32),
        deep_gm=deep.astype(np.float32),
        residual=residual,
        affine=affine,
        inv_affine=np.linalg.inv(affine),
        brain_min_mm=np.minimum(mm_lo, mm_hi),
        brain_max_mm=np.maximum(mm_lo, mm_hi),
        brain_centre_mm=mm_centre,
    )


# Deep grey nuclei lie within this MNI box (mm) and deeper than _DEEP_MM below the brain surface.
_DEEP_BOX_MM = ((-30.0, 30.0), (-38.0, 26.0), (-12.0, 22.0))
_DEEP_MM = 15.0


def _deep_nuclei_weight(brain: np.ndarray, affine: np.ndarray) -> np.ndarray:
    """A soft (0..1, 3 mm ramps) indicator of the deep-nuclei region on the template grid."""
    from scipy import ndimage

    depth = ndimage.distance_transform_edt(brain)  # template voxels are 1 mm
    weight = np.clip((depth - _DEEP_MM) / 3.0 + 0.5, 0.0, 1.0)
    for axis, (lo_mm, hi_mm) in enumerate(_DEEP_BOX_MM):
        idx = np.arange(brain.shape[axis], dtype=np.float64)
        mm = affine[axis, axis] * idx + affine[axis, 3]  # MNI templates are axis-aligned
        ramp = np.clip(np.minimum(mm - lo_mm, hi_mm - mm) / 3.0 + 0.5, 0.0, 1.0)
        shape = [1, 1, 1]
        shape[axis] = -1
        weight = weight * ramp.reshape(shape)
    return weight.astype(np.float32)


@functools.lru_cache(maxsize=256)
def bspline_weights(n_out: int, n_ctrl: int) -> np.ndarray:
    """(n_out, n_ctrl) float32 weights of a uniform cubic B-spline with `n_ctrl` control
    points (n_ctrl >= 4) spread over `n_out` samples."""
    if n_ctrl < 4:
        raise ValueError("A cubic B-spline field needs at least 4 control points per axis.")
    t = np.linspace(0.0, n_ctrl - 3, n_out) if n_out > 1 else np.zeros(1)
    j = np.minimum(np.floor(t).astype(int), n_ctrl - 4)
    f = t - j
    basis = np.stack(
        [(1 - f) ** 3 / 6, (3 * f**3 - 6 * f**2 + 4) / 6, (-3 * f**3 + 3 * f**2 + 3 * f + 1) / 6, f**3 / 6], axis=1
    )
    w = np.zeros((n_out, n_ctrl), dtype=np.float32)
    rows = np.arange(n_out)
    for k in range(4):
        w[rows, j + k] = basis[:, k]
    w.setflags(write=False)
    return w


def bspline_field(coeffs: np.ndarray, shape: tuple[int, int, int]) -> np.ndarray:
    """Evaluates a 3D cubic B-spline with control values `coeffs` on a grid of `shape`."""
    wx, wy, wz = (bspline_weights(int(n), int(c)) for n, c in zip(shape, coeffs.shape))
    f = np.tensordot(wx, coeffs.astype(np.float32), axes=(1, 0))  # (nx, cy, cz)
    f = np.tensordot(f, wy, axes=(1, 1))  # (nx, cz, ny)
    f = np.tensordot(f, wz, axes=(1, 1))  # (nx, ny, nz)
    return np.ascontiguousarray(f, dtype=np.float32)


def control_points(extent_mm: np.ndarray | tuple, spacing_mm: float) -> tuple[int, int, int]:
    """Number of B-spline control points per axis for control points about `spacing_mm` apart."""
    return tuple(int(max(4, np.ceil(float(e) / spacing_mm) + 3)) for e in extent_mm)


def smooth_field(
    shape: tuple[int, int, int], n_ctrl: tuple[int, int, int], rng: np.random.Generator, clip: float | None = 2.5
) -> np.ndarray:
    """A smooth random field of zero mean and unit standard deviation (float32)."""
    coeffs = rng.standard_normal(n_ctrl, dtype=np.float32)
    f = bspline_field(coeffs, shape)
    f -= f.mean()
    std = float(f.std())
    if std > 0:
        f /= std
    if clip is not None:
        np.clip(f, -clip, clip, out=f)
    return f


def rotation_matrix(angles_deg) -> np.ndarray:
    """Rotation about x, then y, then z, by the given angles in degrees."""
    ax, ay, az = np.deg2rad(np.asarray(angles_deg, dtype=np.float64))
    rx = np.array([[1, 0, 0], [0, np.cos(ax), -np.sin(ax)], [0, np.sin(ax), np.cos(ax)]])
    ry = np.array([[np.cos(ay), 0, np.sin(ay)], [0, 1, 0], [-np.sin(ay), 0, np.cos(ay)]])
    rz = np.array([[np.cos(az), -np.sin(az), 0], [np.sin(az), np.cos(az), 0], [0, 0, 1]])
    return rz @ ry @ rx


def axis_angle_rotation(axis, angle_deg: float) -> np.ndarray:
    """Rotation by `angle_deg` about `axis` (Rodrigues)."""
    k = np.asarray(axis, dtype=np.float64)
    k = k / np.linalg.norm(k)
    kx = np.array([[0, -k[2], k[1]], [k[2], 0, -k[0]], [-k[1], k[0], 0]])
    a = np.deg2rad(angle_deg)
    return np.eye(3) + np.sin(a) * kx + (1 - np.cos(a)) * (kx @ kx)


def random_rotation(rng: np.random.Generator, max_deg: float) -> np.ndarray:
    """A rotation about a uniformly random axis by an angle uniform in [0, max_deg]."""
    axis = rng.standard_normal(3)
    return axis_angle_rotation(axis, rng.uniform(0.0, max_deg))


def log_uniform(lo: float, hi: float, u: float) -> float:
    """The value at quantile `u` in [0, 1] of a log-uniform distribution on [lo, hi]."""
    return float(np.exp(np.log(lo) + float(u) * (np.log(hi) - np.log(lo))))
