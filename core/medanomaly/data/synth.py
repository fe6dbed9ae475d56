"""The synthetic brain-MRI cohort: healthy and lesioned T1-like volumes with exact masks.

No public dataset can be downloaded here, so the cohort is made from the MNI152 template
and tissue maps that `nilearn` ships (see `synth_fields`). Each subject is drawn from its
own seed:

* anatomy: a random head pose (rotation up to 10 degrees, per-axis scaling within 8 %,
  translation), a smooth elastic deformation and a random ventricle/deep-brain expansion;
* acquisition: its own anisotropic voxel spacing (in-plane 1.2-1.8 mm, through-plane
  thicker, up to 2.5 mm), a slightly oblique slice prescription (so the NIfTI affine is a
  real, non-diagonal one) and a field of view with a random margin;
* contrast: grey-matter and CSF intensities drawn per subject (white matter > grey matter
  > CSF, T1-like), the template's own detail (deep nuclei) with a random weight, mild
  fine and mid-scale texture, an optional blur (resolution loss), a smooth multiplicative
  bias field, Rician noise and a random scanner gain; stored as int16, skull-stripped
  (exactly 0 outside the brain), with the brain mask beside it;
* lesions (`synth_lesions`): tumour (oedema around a dark or ring-enhancing core, with mass
  effect), stroke (hypo-intense cortical wedge or subcortical blob) or white-matter
  hyper-intensities; their intensities are set before bias field and noise; the ground
  truth is the exact union of lesion voxels inside the brain.

All template maps are resampled onto the subject grid in one pass each: pose, elastic
field and mass effects are composed into one coordinate map first
(`scipy.ndimage.map_coordinates`, linear). The random streams of pose, contrast, texture,
bias, noise and lesion are independent, so `synthesize_subject(seed, "tumour")` is
`synthesize_subject(seed)` with a tumour added and nothing else changed.

`generate_cohort` writes a cohort in the Decathlon datalist style (see `datalist`), cached
and idempotent; `ensure_cohort` finds or makes one under ``$MEDANOMALY_HOME/cohorts``.
"""

from __future__ import annotations

import gzip
import json
import logging
import multiprocessing
import os
import re
import sys
import time
import zlib
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping

import numpy as np
from scipy import ndimage
from threadpoolctl import threadpool_limits

from medanomaly.data import synth_mr
from medanomaly.data.contrast import CONTRASTS, DEFAULT_CONTRAST, MODALITY_LABELS, check_contrast, check_contrasts
from medanomaly.data.datalist import PATH_KEYS, load_datalist, read_datalist, write_datalist
from medanomaly.data.synth_fields import (
    TemplateMaps,
    bspline_field,
    control_points,
    load_template,
    random_rotation,
    rotation_matrix,
    smooth_field,
)
from medanomaly.data.synth_lesions import FAMILIES, HEALTHY, Canvas, Probe, bbox, plan_lesion, render_lesion
from medanomaly.data.synth_montage import save_montage

logger = logging.getLogger(__name__)

__all__ = [
    "FAMILIES",
    "GENERATOR_VERSION",
    "PRESETS",
    "SPLITS",
    "SyntheticSubject",
    "cohort_root",
    "ensure_cohort",
    "generate_cohort",
    "contrast_datalist",
    "plan_cohort",
    "resolve_datalist",
    "save_montage",
    "synthesize_subject",
]

#: Bump whenever the generated volumes change, so cached cohorts are regenerated.
GENERATOR_VERSION = "2.0"

SPLITS = ("training", "validation_healthy", "validation_lesion", "test_lesion", "test_healthy")
LESION_SPLITS = ("validation_lesion", "test_lesion")

PRESETS: dict[str, dict[str, int]] = {
    "tiny": {"training": 4, "validation_healthy": 2, "validation_lesion": 3, "test_lesion": 3, "test_healthy": 2},
    "demo": {"training": 32, "validation_healthy": 4, "validation_lesion": 6, "test_lesion": 12, "test_healthy": 4},
    "full": {"training": 200, "validation_healthy": 20, "validation_lesion": 30, "test_lesion": 60, "test_healthy": 20},
}

_STREAMS = ("pose", "elastic", "contrast", "texture", "blur", "bias", "noise", "lesion")
_VENTRICLES_MNI = np.array([0.0, -10.0, 16.0])  # centre of the lateral ventricles, MNI mm
_PROBE_MM = 3.0  # spacing of the coarse probe used to place lesions
_SUBJECT_FILE = re.compile(r"^sub-\d+_((T1w|T2w|FLAIR)\.(nii\.gz|json)|brainmask\.nii\.gz|lesion\.nii\.gz)$")
_TEMP_FILE = re.compile(r"^\.sub-\d+_.*\.tmp$")


# ----------------------------------------------------------------------------------------
# one subject


@dataclass
class SyntheticSubject:
    """One synthetic subject on its own grid (arrays indexed like the NIfTI voxels)."""

    images: dict[str, np.ndarray]  # contrast -> float32, scanner-like units, exactly 0 outside the brain
    brain_mask: np.ndarray  # uint8
    lesion: np.ndarray  # uint8 ground truth (all zero for a healthy subject)
    affine: np.ndarray  # 4x4 voxel -> RAS mm (oblique, anisotropic)
    family: str  # "healthy", "tumour", "stroke" or "wmh"
    info: dict  # JSON-serialisable synthesis parameters
    tissue: dict[str, np.ndarray] = field(default_factory=dict)  # gm / wm / csf / deep_gm fractions
    parts: dict[str, np.ndarray] = field(default_factory=dict)  # named lesion parts (bool)

    @property
    def image(self) -> np.ndarray:
        """The T1w image (or the first contrast rendered, without T1w)."""
        return self.images.get(DEFAULT_CONTRAST, next(iter(self.images.values())))

    @property
    def spacing(self) -> np.ndarray:
        return np.sqrt((self.affine[:3, :3] ** 2).sum(0))

    @property
    def lesion_voxels(self) -> int:
        return int(np.count_nonzero(self.lesion))

    @property
    def lesion_ml(self) -> float:
        return float(self.lesion_voxels * np.prod(self.spacing) / 1000.0)


@dataclass
class _Geometry:
    shape: tuple[int, int, int]
    spacing: np.ndarray  # (3,) mm
    affine: np.ndarray  # voxel -> world (RAS mm)
    rot_acq: np.ndarray  # slice prescription rotation (columns of the affine, normalised)
    lin: np.ndarray  # world -> MNI linear part (inverse head pose)
    centre_world: np.ndarray  # where the template's brain centre lies in the world
    info: dict


def _seed_sequence(seed) -> np.random.SeedSequence:
    if isinstance(seed, (int, np.integer)) and not isinstance(seed, bool) and seed >= 0:
        return np.random.SeedSequence(int(seed))
    if isinstance(seed, (list, tuple)) and all(isinstance(s, (int, np.integer)) and s >= 0 for s in seed):
        return np.random.SeedSequence([int(s) for s in seed])
    raise TypeError(f"seed must be a non-negative integer (or a sequence of them), not {seed!r}.")


def _draw_geometry(rng: np.random.Generator, tpl: TemplateMaps) -> _Geometry:
    in_plane = round(rng.uniform(1.2, 1.8), 2)
    through = round(min(2.5, in_plane + rng.uniform(0.2, 0.9)), 2)
    spacing = np.array([in_plane, in_plane, through])
    oblique = rng.uniform([-6.0, -6.0, -4.0], [6.0, 6.0, 4.0])
    rot_acq = rotation_matrix(oblique)
    head_rot = random_rotation(rng, 10.0)
    head_scale = rng.uniform(0.92, 1.08, 3)
    head = head_rot @ np.diag(head_scale)  # MNI -> world, about the brain centre
    centre_world = rng.uniform(-15.0, 15.0, 3)
    # field of view: the posed brain's box in the slice frame plus a random margin
    lo, hi = tpl.brain_min_mm, tpl.brain_max_mm
    corners = np.array([[x, y, z] for x in (lo[0], hi[0]) for y in (lo[1], hi[1]) for z in (lo[2], hi[2])])
    world = (corners - tpl.brain_centre_mm) @ head.T + centre_world
    in_frame = world @ rot_acq  # R^T y for each row
    margin_lo = rng.uniform(8.0, 25.0, 3) + 6.0
    margin_hi = rng.uniform(8.0, 25.0, 3) + 6.0
    origin_q = in_frame.min(0) - margin_lo
    shape = tuple(int(n) for n in np.ceil((in_frame.max(0) + margin_hi - origin_q) / spacing))
    affine = np.eye(4)
    affine[:3, :3] = rot_acq @ np.diag(spacing)
    affine[:3, 3] = rot_acq @ origin_q
    info = {
        "spacing_mm": [float(s) for s in spacing],
        "shape": list(shape),
        "oblique_deg": [round(float(a), 3) for a in oblique],
        "head_rotation_deg": round(float(np.rad2deg(np.arccos(np.clip((np.trace(head_rot) - 1) / 2, -1, 1)))), 3),
        "head_scale": [round(float(s), 4) for s in head_scale],
        "head_centre_mm": [round(float(c), 3) for c in centre_world],
    }
    return _Geometry(shape, spacing, affine, rot_acq, np.linalg.inv(head), centre_world, info)


def _world_to_q(geo: _Geometry, world: np.ndarray) -> np.ndarray:
    """World mm -> mm in the voxel frame (voxel index times spacing)."""
    return geo.rot_acq.T @ (np.asarray(world, dtype=np.float64) - geo.affine[:3, 3])


def _mni_to_q(geo: _Geometry, tpl: TemplateMaps, mni: np.ndarray) -> np.ndarray:
    """Approximate position (ignoring the elastic field) of an MNI point in the voxel frame."""
    world = np.linalg.solve(geo.lin, np.asarray(mni) - tpl.brain_centre_mm) + geo.centre_world
    return _world_to_q(geo, world)


def _coordinate_map(geo: _Geometry, tpl: TemplateMaps, rng: np.random.Generator) -> tuple[np.ndarray, dict]:
    """Template voxel coordinates of every subject voxel: pose + elastic field (float32,
    shape (3, X, Y, Z)). Radial pushes are added later with `_add_push`."""
    tinv = tpl.inv_affine[:3, :3]
    k = tinv @ geo.lin
    m_lin = k @ geo.affine[:3, :3]
    m_off = tinv @ (tpl.brain_centre_mm + geo.lin @ (geo.affine[:3, 3] - geo.centre_world)) + tpl.inv_affine[:3, 3]
    axes = [np.arange(n, dtype=np.float64) for n in geo.shape]
    coords = np.empty((3, *geo.shape), dtype=np.float32)
    for c in range(3):
        coords[c] = (
            (m_lin[c, 0] * axes[0] + m_off[c])[:, None, None]
            + (m_lin[c, 1] * axes[1])[None, :, None]
            + (m_lin[c, 2] * axes[2])[None, None, :]
        )
    sigma = rng.uniform(1.0, 3.0)
    ctrl_mm = rng.uniform(25.0, 40.0)
    n_ctrl = control_points(np.asarray(geo.shape) * geo.spacing, ctrl_mm)
    for b in range(3):
        disp = smooth_field(geo.shape, n_ctrl, rng) * np.float32(sigma)  # MNI mm along axis b
        for c in range(3):
            if abs(tinv[c, b]) > 1e-9:
                coords[c] += np.float32(tinv[c, b]) * disp
    return coords, {"elastic_sigma_mm": round(float(sigma), 3), "elastic_spacing_mm": round(float(ctrl_mm), 2)}


def _add_push(coords: np.ndarray, geo: _Geometry, tpl: TemplateMaps, centre_q, radius: float, strength: float) -> None:
    """Adds a radial push about `centre_q` (voxel-frame mm): tissue at distance r comes from
    r * (1 - strength * exp(-r^2 / radius^2)), i.e. it is pushed outward (strength > 0) or
    pulled inward (strength < 0); monotone, so anatomy folds nowhere, for |strength| < 1."""
    sl, (dx, dy, dz) = bbox(np.asarray(centre_q), 3.0 * radius, geo.spacing, geo.shape)
    if any(s.stop <= s.start for s in sl):
        return
    f = (-strength * np.exp(-(dx * dx + dy * dy + dz * dz) / (radius * radius))).astype(np.float32)
    kr = tpl.inv_affine[:3, :3] @ geo.lin @ geo.rot_acq  # voxel-frame mm -> template voxels
    d = (dx * f, dy * f, dz * f)
    for c in range(3):
        coords[c][sl] += (kr[c, 0] * d[0] + kr[c, 1] * d[1] + kr[c, 2] * d[2]).astype(np.float32)


def _probe(coords: np.ndarray, geo: _Geometry, tpl: TemplateMaps) -> Probe:
    stride = np.maximum(1, np.round(_PROBE_MM / geo.spacing)).astype(int)
    sub = np.ascontiguousarray(coords[:, :: stride[0], :: stride[1], :: stride[2]])

    def sample(a: np.ndarray) -> np.ndarray:
        return ndimage.map_coordinates(a, sub, order=1, mode="constant", cval=0.0, prefilter=False)

    return Probe(
        stride=stride,
        spacing=geo.spacing,
        mask=sample(tpl.mask),
        gm=sample(tpl.gm),
        wm=sample(tpl.wm),
        right=_right_hemisphere(sub, tpl),
    )


def _right_hemisphere(coords: np.ndarray, tpl: TemplateMaps) -> np.ndarray:
    """True where template voxel coordinates lie right of the MNI midline (x > 0)."""
    a = tpl.affine[0]
    return (a[0] * coords[0] + a[1] * coords[1] + a[2] * coords[2] + a[3]) > 0


def _sample_maps(coords: np.ndarray, tpl: TemplateMaps) -> dict[str, np.ndarray]:
    """Resamples the template maps onto the subject grid, one linear pass per map; tissue
    maps only where the brain mask is non-zero."""
    shape = coords.shape[1:]
    kw = dict(order=1, mode="constant", cval=0.0, prefilter=False)
    mask = ndimage.map_coordinates(tpl.mask, coords, output=np.float32, **kw)
    domain = np.flatnonzero(mask > 1e-3)
    sub = coords.reshape(3, -1)[:, domain]
    out = {"mask": mask}
    for name in ("gm", "wm", "deep_gm", "residual"):
        full = np.zeros(shape, dtype=np.float32)
        full.reshape(-1)[domain] = ndimage.map_coordinates(getattr(tpl, name), sub, output=np.float32, **kw)
        out[name] = full
    out["csf"] = np.clip(mask - out["gm"] - out["wm"], 0.0, 1.0)
    return out


def _check_family(lesion_family) -> str:
    if lesion_family in (None, HEALTHY):
        return HEALTHY
    if lesion_family not in FAMILIES:
        raise ValueError(f"Unknown lesion family {lesion_family!r}; choose one of {', '.join(FAMILIES)} or None.")
    return lesion_family


def synthesize_subject(
    seed, lesion_family: str | None = None, size_u: float | None = None, contrasts=CONTRASTS
) -> SyntheticSubject:
    """Synthesises one subject in memory, in each of `contrasts` (default T1w, T2w and FLAIR).

    Args:
        seed: non-negative integer (or sequence of them); the same seed gives the same subject.
        lesion_family: None / "healthy", "tumour", "stroke" or "wmh". The anatomy, contrast,
            bias and noise do not depend on it: only the lesion (and a tumour's mass effect)
            differs from the healthy version of the same seed.
        size_u: lesion size quantile in [0, 1] (log-uniform within the family's range);
            None draws it from the seed.
        contrasts: which contrasts to render; every contrast shares anatomy and lesion, and
            asking for fewer contrasts leaves the others' random draws unchanged.
    """
    family = _check_family(lesion_family)
    contrasts = check_contrasts(contrasts)
    tpl = load_template()
    rngs = {n: np.random.default_rng(s) for n, s in zip(_STREAMS, _seed_sequence(seed).spawn(len(_STREAMS)))}

    geo = _draw_geometry(rngs["pose"], tpl)
    coords, elastic_info = _coordinate_map(geo, tpl, rngs["elastic"])
    anat = rngs["elastic"]
    vent_strength, vent_radius = anat.uniform(-0.12, 0.3), anat.uniform(22.0, 30.0)
    _add_push(coords, geo, tpl, _mni_to_q(geo, tpl, _VENTRICLES_MNI), vent_radius, vent_strength)

    c = rngs["contrast"]
    tissues = synth_mr.draw_tissues(c)
    sequences = synth_mr.draw_sequences(c, tissues["csf"]["T1"])
    detail = float(c.uniform(0.5, 1.1))
    gains = {name: float(c.uniform(400.0, 1200.0)) for name in CONTRASTS}

    plan = None
    if family != HEALTHY:
        lrng = rngs["lesion"]
        u = float(lrng.uniform()) if size_u is None else float(size_u)
        if not 0.0 <= u <= 1.0:
            raise ValueError(f"size_u must lie in [0, 1], not {size_u}.")
        plan = plan_lesion(family, _probe(coords, geo, tpl), u, lrng)
        for push in plan.get("pushes", []):
            _add_push(coords, geo, tpl, push["centre_q"], push["radius"], push["strength"])

    maps = _sample_maps(coords, tpl)
    right = _right_hemisphere(coords, tpl) if plan is not None else None
    del coords
    brain = maps["mask"] >= 0.5

    lesion = np.zeros(geo.shape, dtype=bool)
    parts: dict[str, np.ndarray] = {}
    canvas = Canvas(geo.shape, maps["gm"], maps["wm"], maps["csf"], geo.spacing, right)
    if plan is not None:
        lesion, parts = render_lesion(plan, canvas, rngs["lesion"])
        lesion &= brain
        parts = {k: v & brain for k, v in parts.items()}
        if not lesion.any():  # cannot happen by construction (lesion centres lie in tissue)
            raise RuntimeError(f"Lesion of family {family} came out empty for seed {seed}; please report this.")
    compartments = {**tissues, **(plan or {}).get("relaxation", {})}

    # texture (fine grain, mid-scale inhomogeneity) and resolution loss are the subject's: shared
    t = rngs["texture"]
    fine_sigma, fine_amp, mid_amp = 0.7, float(t.uniform(0.01, 0.03)), float(t.uniform(0.01, 0.03))
    fine = ndimage.gaussian_filter(t.standard_normal(geo.shape, dtype=np.float32), fine_sigma, truncate=3.0)
    fine /= max(float(fine.std()), 1e-6)
    extent = np.asarray(geo.shape) * geo.spacing
    texture = 1.0 + fine_amp * fine + mid_amp * smooth_field(geo.shape, control_points(extent, 12.0), t)
    del fine
    b = rngs["blur"]
    blur_on = bool(b.random() < 0.5)
    blur_sigma = [float(b.uniform(0.2, 0.6))] * 2 + [float(b.uniform(0.2, 0.8))]

    # each contrast: its own signal, bias field, Rician noise and gain (drawn in CONTRASTS order,
    # so a contrast's draws do not depend on which others are rendered)
    images, acquisition = {}, {}
    for name in CONTRASTS:
        bias_amp, bias_ctrl = float(rngs["bias"].uniform(0.05, 0.2)), float(rngs["bias"].uniform(60.0, 100.0))
        bias_coeffs = rngs["bias"].standard_normal(control_points(extent, bias_ctrl), dtype=np.float32)
        noise_sigma = float(rngs["noise"].uniform(0.01, 0.035))
        noise_seed = int(rngs["noise"].integers(2**63))
        acquisition[name] = {"bias_field": {"amplitude": round(bias_amp, 4), "control_spacing_mm": round(bias_ctrl, 2)},
                             "rician_noise_sigma": round(noise_sigma, 4), "gain": round(gains[name], 2)}  # fmt: skip
        if name not in contrasts:
            continue
        signal = synth_mr.signals(name, compartments, sequences[name])
        image = _tissue_image(maps, signal, detail)
        for layer in canvas.layers:
            layer.apply(image, signal)
        image *= texture
        if blur_on:
            image = ndimage.gaussian_filter(image, blur_sigma, truncate=3.0)
        image *= np.exp(bias_amp * _unit_field(bias_coeffs, geo.shape))
        noise = np.random.default_rng(noise_seed)
        real = image + noise_sigma * noise.standard_normal(geo.shape, dtype=np.float32)
        imag = noise_sigma * noise.standard_normal(geo.shape, dtype=np.float32)
        image = np.sqrt(real * real + imag * imag)
        del real, imag
        image *= gains[name]
        image[~brain] = 0.0
        images[name] = image.astype(np.float32, copy=False)
    del texture

    info = {
        "generator": "medanomaly.data.synth",
        "version": GENERATOR_VERSION,
        "family": family,
        "contrasts": list(contrasts),
        **geo.info,
        **elastic_info,
        "ventricle_push": {"strength": round(float(vent_strength), 4), "radius_mm": round(float(vent_radius), 3)},
        "tissues": tissues,
        "sequences": sequences,
        "template_detail": round(detail, 4),
        "texture": {"fine": round(fine_amp, 4), "mid": round(mid_amp, 4)},
        "blur_sigma_vox": [round(s, 3) for s in blur_sigma] if blur_on else None,
        "acquisition": acquisition,
        "lesion": plan,
    }
    subject = SyntheticSubject(
        images=images,
        brain_mask=brain.astype(np.uint8),
        lesion=lesion.astype(np.uint8),
        affine=geo.affine,
        family=family,
        info=info,
        tissue={"gm": maps["gm"], "wm": maps["wm"], "csf": maps["csf"], "deep_gm": maps["deep_gm"]},
        parts=parts,
    )
    info["lesion_voxels"] = subject.lesion_voxels
    info["lesion_ml"] = round(subject.lesion_ml, 4)
    return subject


def _tissue_image(maps: dict[str, np.ndarray], signal: dict[str, float], detail: float) -> np.ndarray:
    """Partial-volume mix of the healthy tissues' signals, plus the template's anatomical detail
    scaled by this contrast's white-minus-grey difference (so it flips sign on T2w and FLAIR)."""
    cortex = maps["gm"] - maps["deep_gm"]
    image = (maps["wm"] * signal["wm"] + cortex * signal["gm"] + maps["deep_gm"] * signal["deep_gm"]
             + maps["csf"] * signal["csf"])  # fmt: skip
    image += (detail * (signal["wm"] - signal["gm"])) * maps["residual"]
    return np.maximum(image, 0.0, out=image)


def _unit_field(coeffs: np.ndarray, shape) -> np.ndarray:
    """A B-spline field of zero mean and unit standard deviation, clipped at 2.5 (as smooth_field)."""
    f = bspline_field(coeffs, shape)
    f -= f.mean()
    f /= max(float(f.std()), 1e-12)
    return np.clip(f, -2.5, 2.5, out=f)


# ----------------------------------------------------------------------------------------
# files


def _nifti_gz_bytes(array: np.ndarray, affine: np.ndarray, description: str) -> bytes:
    import nibabel as nib

    img = nib.Nifti1Image(array, affine)
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    img.header.set_xyzt_units("mm", "sec")
    img.header["descrip"] = description[:79].encode()
    # gzip by hand: no file name or time stamp in the header, so equal seeds give equal bytes
    return gzip.compress(img.to_bytes(), compresslevel=1, mtime=0)


def _atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def _subject_paths(root: Path, plan: Mapping, contrasts=CONTRASTS) -> dict[str, Path]:
    """A subject's files: ``image:<C>`` and ``sidecar:<C>`` per contrast, ``mask``, ``label``."""
    folder = root / plan["split"]
    sid = plan["subject"]
    paths = {"mask": folder / f"{sid}_brainmask.nii.gz"}
    for name in contrasts:
        paths[f"image:{name}"] = folder / f"{sid}_{name}.nii.gz"
        paths[f"sidecar:{name}"] = folder / f"{sid}_{name}.json"
    if plan["split"] != "training":
        paths["label"] = folder / f"{sid}_lesion.nii.gz"
    return paths


def _sidecar_key(plan: Mapping) -> dict:
    return {
        "GeneratorVersion": GENERATOR_VERSION,
        "Split": plan["split"],
        "Subject": plan["subject"],
        "SubjectSeed": plan["seed"],
        "Family": plan["family"],
        "SizeQuantile": plan["size_u"],
    }


def _entries(root: Path, plan: Mapping, contrasts, lesion_voxels: int, lesion_ml: float) -> dict[str, dict]:
    """The subject's datalist entry in each contrast's datalist (contrast -> entry)."""
    paths = _subject_paths(root, plan, contrasts)
    entries = {}
    for name in contrasts:
        entry = {"image": paths[f"image:{name}"].relative_to(root).as_posix(),
                 "mask": paths["mask"].relative_to(root).as_posix()}  # fmt: skip
        if "label" in paths:
            entry["label"] = paths["label"].relative_to(root).as_posix()
        entry.update(
            subject=plan["subject"],
            family=plan["family"],
            lesion_voxels=int(lesion_voxels),
            lesion_ml=round(float(lesion_ml), 4),
        )
        entries[name] = entry
    return entries


def _completed_entries(root: Path, plan: Mapping, contrasts) -> dict[str, dict] | None:
    """The datalist entries of a subject already on disk with this plan in every contrast, else None."""
    paths = _subject_paths(root, plan, contrasts)
    if not all(p.is_file() for p in paths.values()):
        return None
    key = _sidecar_key(plan)
    side = {}
    for name in contrasts:
        try:
            side = json.loads(paths[f"sidecar:{name}"].read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None
        if any(side.get(k) != v for k, v in key.items()) or side.get("Contrast") != name:
            return None
    return _entries(root, plan, contrasts, side.get("LesionVoxels", 0), side.get("LesionVolumeMl", 0.0))


def _generate_subject_files(plan: dict, root: str, contrasts=CONTRASTS) -> dict[str, dict]:
    """Synthesises one planned subject and writes its files (worker entry point); returns its
    entry per contrast. Sidecars are written last: they mark a finished subject."""
    root_path = Path(root)
    paths = _subject_paths(root_path, plan, contrasts)
    paths["mask"].parent.mkdir(parents=True, exist_ok=True)
    for name in contrasts:
        paths[f"sidecar:{name}"].unlink(missing_ok=True)
    family = None if plan["family"] == HEALTHY else plan["family"]
    subject = synthesize_subject(plan["seed"], family, plan["size_u"], contrasts=contrasts)
    desc = f"medanomaly synth v{GENERATOR_VERSION} {plan['subject']} {plan['family']}"
    for name in contrasts:
        image = np.clip(np.rint(subject.images[name]), 0, np.iinfo(np.int16).max).astype(np.int16)
        _atomic_write(paths[f"image:{name}"], _nifti_gz_bytes(image, subject.affine, f"{desc} {name}"))
    _atomic_write(paths["mask"], _nifti_gz_bytes(subject.brain_mask, subject.affine, desc + " brain mask"))
    if "label" in paths:
        _atomic_write(paths["label"], _nifti_gz_bytes(subject.lesion, subject.affine, desc + " lesion"))
    for name in contrasts:
        sidecar = {
            **_sidecar_key(plan),
            "Contrast": name,
            "Generator": "medanomaly.data.synth",
            "Modality": f"{name} (synthetic, skull-stripped)",
            "SequenceParameters": subject.info["sequences"][name],
            "VoxelSpacing": [float(s) for s in subject.spacing.round(4)],
            "LesionVoxels": subject.lesion_voxels,
            "LesionVolumeMl": round(subject.lesion_ml, 4),
            "Synthesis": subject.info,
        }
        _atomic_write(paths[f"sidecar:{name}"], (json.dumps(sidecar, indent=1) + "\n").encode())
    return _entries(root_path, plan, contrasts, subject.lesion_voxels, subject.lesion_ml)


# ----------------------------------------------------------------------------------------
# cohort


def _resolve_preset(preset) -> tuple[str, dict[str, int]]:
    if isinstance(preset, str):
        if preset not in PRESETS:
            raise ValueError(f"Unknown cohort preset {preset!r}; choose one of {', '.join(PRESETS)}.")
        return preset, dict(PRESETS[preset])
    if isinstance(preset, Mapping):
        unknown = set(preset) - set(SPLITS)
        if unknown:
            raise ValueError(
                f"Unknown split(s) {sorted(unknown)} in the cohort sizes; the splits are {', '.join(SPLITS)}."
            )
        sizes = {s: int(preset.get(s, 0)) for s in SPLITS}
        if any(n < 0 for n in sizes.values()):
            raise ValueError("Cohort sizes must be non-negative.")
        return "custom", sizes
    raise TypeError(f"preset must be a preset name ({', '.join(PRESETS)}) or a mapping of split sizes.")


def _split_code(split: str) -> int:
    return zlib.crc32(split.encode("utf-8"))


def plan_cohort(preset="demo", seed: int = 0) -> list[dict]:
    """The subjects of a cohort: split, index, subject id, subject seed, family, size quantile.

    Each subject's seed depends only on (cohort seed, split, index in the split), so subjects
    do not depend on the number of workers. Lesion families are balanced within each lesion
    split (shuffled), and each family's sizes are stratified over [0, 1] (log-uniform sizes).
    """
    _, sizes = _resolve_preset(preset)
    if not isinstance(seed, (int, np.integer)) or isinstance(seed, bool) or seed < 0:
        raise TypeError(f"The cohort seed must be a non-negative integer, not {seed!r}.")
    plans, counter = [], 0
    for split in SPLITS:
        n, code = sizes[split], _split_code(split)
        families: list[str] = [HEALTHY] * n
        quantiles: list[float | None] = [None] * n
        if split in LESION_SPLITS and n:
            rng = np.random.default_rng(np.random.SeedSequence(int(seed), spawn_key=(code, 0, 0)))
            families = [FAMILIES[i % len(FAMILIES)] for i in rng.permutation(n)]
            for fam in FAMILIES:
                members = [i for i, f in enumerate(families) if f == fam]
                strata = rng.permutation(len(members))
                for i, s in zip(members, strata):
                    quantiles[i] = round(float((s + rng.uniform()) / len(members)), 6)
        for index in range(n):
            counter += 1
            ss = np.random.SeedSequence(int(seed), spawn_key=(code, 1, index))
            plans.append(
                {
                    "split": split,
                    "index": index,
                    "subject": f"sub-{counter:04d}",
                    "seed": int(ss.generate_state(1, np.uint64)[0]),
                    "family": families[index],
                    "size_u": quantiles[index],
                }
            )
    return plans


def medanomaly_home() -> Path:
    """``$MEDANOMALY_HOME``, default ~/.cache/medanomaly: synthetic cohorts and preprocessed caches."""
    return Path(os.environ.get("MEDANOMALY_HOME") or os.path.join(os.path.expanduser("~"), ".cache", "medanomaly"))


def cohort_root(name: str) -> Path:
    """``$MEDANOMALY_HOME/cohorts/<name>``."""
    return medanomaly_home() / "cohorts" / name


def _provenance(preset_name: str, sizes: dict, seed: int, contrasts=CONTRASTS) -> dict:
    return {"generator": "medanomaly.data.synth", "version": GENERATOR_VERSION, "preset": preset_name,
            "sizes": sizes, "seed": int(seed), "contrasts": list(contrasts)}  # fmt: skip


def contrast_datalist(root, contrast: str) -> Path:
    """``root/datalist_<contrast>.json``: the cohort's datalist of one contrast."""
    return Path(root) / f"datalist_{check_contrast(contrast)}.json"


def _is_current(datalist: Path, provenance: dict) -> bool:
    """True when `datalist` was written for this preset, seed and generator version and
    every file it lists exists."""
    try:
        doc = read_datalist(datalist)
    except (OSError, ValueError):
        return False
    if doc.get("medanomaly") != provenance:
        return False
    base = datalist.parent
    for split in SPLITS:
        for item in doc.get(split, []):
            for k in ("image", "mask", "label"):
                if k in item and not (base / item[k]).is_file():
                    return False
    return True


def _refuse_foreign_datalist(datalist: Path) -> None:
    """Never overwrite a datalist that this generator did not write (e.g. a real cohort's)."""
    if not datalist.exists():
        return
    try:
        doc = read_datalist(datalist)
    except (OSError, ValueError):
        doc = {}
    if (doc.get("medanomaly") or {}).get("generator") != "medanomaly.data.synth":
        raise FileExistsError(
            f"{datalist} exists and was not written by the synthetic cohort generator; choose an empty "
            "folder for the synthetic cohort (or remove that file if it is yours to discard)."
        )


def _worker_init() -> None:
    # One BLAS thread in every worker (two workers on two cores), and in this process when it
    # generates alone: a multi-threaded matrix product rounds differently, and the bytes of a
    # subject must not depend on how many workers made the cohort.
    threadpool_limits(1)
    load_template()


def _default_workers() -> int:
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        cpus = os.cpu_count() or 1
    return max(1, min(2, cpus))


def _remove_stale(root: Path, plans: list[dict], started: float, contrasts) -> None:
    keep = {p.name for plan in plans for p in _subject_paths(root, plan, contrasts).values()}
    for split in SPLITS:
        folder = root / split
        if not folder.is_dir():
            continue
        for f in folder.iterdir():
            stale_subject = _SUBJECT_FILE.match(f.name) and f.name not in keep
            stale_temp = _TEMP_FILE.match(f.name) and f.stat().st_mtime < started - 600
            if f.is_file() and (stale_subject or stale_temp):
                f.unlink()


def generate_cohort(
    root,
    preset="demo",
    seed: int = 0,
    workers: int | None = None,
    progress: bool = True,
    overwrite: bool = False,
    contrasts=CONTRASTS,
) -> Path:
    """Writes the synthetic cohort under `root`; returns the path of its ``datalist.json``.

    Every subject is rendered in each of `contrasts` (default T1w, T2w, FLAIR) from one anatomy
    and one lesion: ``sub-0001_T1w.nii.gz``, ``_T2w``, ``_FLAIR`` share ``_brainmask`` and
    ``_lesion``. Each contrast has its datalist ``datalist_<C>.json`` (top-level ``"contrast"``);
    ``datalist.json`` is the first contrast's (T1w by default).

    Cached and idempotent: when ``root/datalist.json`` was written for the same preset, seed
    and generator version (its ``"medanomaly"`` key) and all its files exist, it is returned
    without any work. Otherwise subjects already on disk with the same plan (finished
    subjects of an interrupted run) are kept and the rest are generated, in parallel over a
    process pool of `workers` (default min(2, CPUs)). Every file is written atomically
    (temporary file, then rename) and the datalist last, so an interrupted run is never
    mistaken for a finished one. ``overwrite=True`` regenerates everything. A montage of
    lesion subjects is saved as ``root/montage.png``.

    Args:
        root: the cohort folder (created if needed).
        preset: "tiny", "demo", "full" (see `PRESETS`) or a mapping split -> number of subjects.
        seed: cohort seed (non-negative integer).
        workers: number of processes; 1 generates in this process.
        progress: show a tqdm progress bar.
        overwrite: regenerate even what is cached.
        contrasts: the contrasts to render (names of `CONTRASTS`, or "all").
    """
    from tqdm.auto import tqdm

    root = Path(root).expanduser()
    contrasts = check_contrasts(contrasts)
    preset_name, sizes = _resolve_preset(preset)
    provenance = _provenance(preset_name, sizes, seed, contrasts)
    datalist = root / "datalist.json"
    if not overwrite and all(_is_current(contrast_datalist(root, c), provenance) for c in contrasts):
        logger.debug("Synthetic cohort at %s is up to date.", root)
        return datalist
    for path in [datalist, *(contrast_datalist(root, c) for c in CONTRASTS)]:
        _refuse_foreign_datalist(path)

    started = time.time()
    plans = plan_cohort(sizes, seed)
    root.mkdir(parents=True, exist_ok=True)
    entries: dict[str, dict[str, dict]] = {}  # subject -> contrast -> entry
    todo = []
    for plan in plans:
        done = None if overwrite else _completed_entries(root, plan, contrasts)
        if done is None:
            todo.append(plan)
        else:
            entries[plan["subject"]] = done
    logger.info(
        "Generating synthetic cohort '%s' (seed %d, %s) in %s: %d subjects to make, %d already on disk.",
        preset_name, seed, ", ".join(contrasts), root, len(todo), len(entries),
    )  # fmt: skip

    workers = _default_workers() if workers is None else max(1, int(workers))
    workers = min(workers, max(1, len(todo)))
    bar = tqdm(total=len(plans), initial=len(entries), desc="synthetic cohort", unit="subject", disable=not progress)
    try:
        if workers == 1:
            with threadpool_limits(1):  # as in the workers (see _worker_init)
                for plan in todo:
                    entries[plan["subject"]] = _generate_subject_files(plan, str(root), contrasts)
                    bar.update(1)
        elif todo:
            methods = multiprocessing.get_all_start_methods()
            use_fork = sys.platform.startswith("linux") and "fork" in methods
            context = multiprocessing.get_context("fork" if use_fork else "spawn")
            pool = ProcessPoolExecutor(max_workers=workers, mp_context=context, initializer=_worker_init)
            try:
                futures = {pool.submit(_generate_subject_files, plan, str(root), contrasts): plan for plan in todo}
                for fut in as_completed(futures):
                    plan = futures[fut]
                    try:
                        entries[plan["subject"]] = fut.result()
                    except Exception as exc:
                        raise RuntimeError(
                            f"Generating synthetic subject {plan['subject']} ({plan['split']}, {plan['family']}) "
                            f"failed: {exc}"
                        ) from exc
                    bar.update(1)
            finally:  # on error or Ctrl-C: drop queued subjects, let running ones finish their files
                pool.shutdown(wait=True, cancel_futures=True)
    finally:
        bar.close()

    _remove_stale(root, plans, started, contrasts)
    for name in contrasts:
        splits = {split: [entries[p["subject"]][name] for p in plans if p["split"] == split] for split in SPLITS}
        _write_cohort_datalist(root, contrast_datalist(root, name), splits, name, provenance)
    primary = contrast_datalist(root, contrasts[0])
    _write_cohort_datalist(root, datalist, splits_of(primary), contrasts[0], provenance)
    key = next((k for k in ("test_lesion", "validation_lesion") if sizes[k]), None)
    try:
        if key is not None:
            save_montage(datalist, root / "montage.png", n=6, key=key)
    except Exception as exc:  # the montage is a convenience: never lose a cohort over it
        logger.warning("Could not draw the cohort montage: %s", exc)
    logger.info("Synthetic cohort ready: %s (%.1f s).", datalist, time.time() - started)
    return datalist


def splits_of(datalist: Path) -> dict[str, list]:
    """The split lists of a datalist file, paths as stored."""
    doc = read_datalist(datalist)
    return {split: doc.get(split, []) for split in SPLITS}


def _write_cohort_datalist(root: Path, path: Path, splits: dict, contrast: str, provenance: dict) -> None:
    """Writes one contrast's datalist (atomically, last: it marks the cohort as finished)."""
    pending = root / f".{path.stem}.pending.json"
    write_datalist(
        pending,
        splits,
        name=f"MedAnomaly synthetic brain MRI ({contrast})",
        description=(
            f"Synthetic skull-stripped {contrast} brain MRI made from the MNI152 template and tissue maps "
            "shipped with nilearn: random pose, elastic deformation, tissue T1/T2/PD and sequence timings "
            "(signal from the sequence equations), texture, bias field, Rician noise, anisotropic oblique "
            "grids; lesion subjects carry a tumour, stroke or white-matter hyper-intensities with exact "
            "ground-truth masks, the same in every contrast."
        ),
        modality={"0": MODALITY_LABELS[contrast]},
        labels={"0": "background", "1": "lesion"},
        metadata={
            "contrast": contrast,
            "reference": "medanomaly.data.synth",
            "licence": "Derived from the ICBM 2009 MNI152 template (see nilearn's licence notes)",
            "release": GENERATOR_VERSION,
            "numTest": sum(len(splits[s]) for s in SPLITS if s.startswith("test")),
            "medanomaly": provenance,
        },
    )
    os.replace(pending, path)


def resolve_datalist(datalist, contrast: str | None = None) -> Path:
    """The datalist file for `datalist`: a synthetic preset's (generated on first use; the file of
    `contrast`, default T1w) or the path of a Decathlon-style JSON file, which must exist."""
    if str(datalist) in PRESETS:
        return ensure_cohort(str(datalist), contrast=contrast or DEFAULT_CONTRAST)
    path = Path(datalist).expanduser()
    if not path.is_file():
        raise FileNotFoundError(
            f"Datalist {datalist} is neither a synthetic cohort preset ({', '.join(PRESETS)}) nor an existing file."
        )
    return path.resolve()


def datalist_items(datalist, keys="test_lesion", contrast: str | None = None) -> list[dict]:
    """The entries of the `keys` splits of `datalist` (a Decathlon-style JSON file, or a synthetic
    preset generated on first use, in `contrast`), file paths absolute; the datalist's top-level
    "contrast" is copied into its entries (an entry's own wins). Empty splits and files that do
    not exist are errors that name the datalist, before any volume is read."""
    path = resolve_datalist(datalist, contrast)
    declared = read_datalist(path).get("contrast")
    keys = [keys] if isinstance(keys, str) else list(keys)
    declared_contrast = {"contrast": declared} if declared else {}
    items = [{**declared_contrast, **item} for key in keys for item in load_datalist(path, key)]
    if not items:
        raise ValueError(f"The datalist {path} has no volumes under {', '.join(map(repr, keys))}: nothing to run on.")
    missing = [(item.get("subject", item["image"]), key, item[key]) for item in items for key in PATH_KEYS
               if isinstance(item.get(key), str) and not os.path.exists(item[key])]
    if missing:
        subject, key, file = missing[0]
        raise FileNotFoundError(f"The datalist {path} names files that do not exist ({len(missing)} in all), e.g. the "
                                f"{key} of {subject}: {file}. Fix the paths (relative to the datalist's folder).")
    return items


def ensure_cohort(preset="demo", seed: int = 0, root=None, contrast: str | None = None) -> Path:
    """The datalist of a synthetic cohort, generated first (in every contrast) if it is missing or
    out of date: ``datalist_<contrast>.json`` when `contrast` is given, else ``datalist.json`` (T1w).

    `root` defaults to ``cohort_root(preset)`` (``cohort_root(f"{preset}-seed{seed}")`` for
    seed != 0).
    """
    preset_name, sizes = _resolve_preset(preset)
    if root is None:
        root = cohort_root(preset_name if seed == 0 else f"{preset_name}-seed{seed}")
    root = Path(root).expanduser()
    datalist = root / "datalist.json" if contrast is None else contrast_datalist(root, contrast)
    if _is_current(datalist, _provenance(preset_name, sizes, seed)):
        return datalist
    n = sum(sizes.values())
    logger.info(
        "Synthetic cohort '%s' (seed %d, %d subjects, %s) not found at %s; generating it now "
        "(a few seconds per subject and worker).", preset_name, seed, n, ", ".join(CONTRASTS), root,
    )  # fmt: skip
    generate_cohort(root, preset=preset, seed=seed)
    return datalist
