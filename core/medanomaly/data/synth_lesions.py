"""Test lesions of the synthetic cohort: tumour, stroke and white-matter hyper-intensities.

A lesion is made in two steps, both driven by the subject's own lesion random stream:

* `plan_lesion` places it and draws its shape and intensity parameters from a coarse
  probe of the subject's (healthy, un-pushed) anatomy on its own grid. A tumour's plan
  carries a radial *push* (mass effect) that the generator adds to the coordinate map
  before the template maps are resampled, so the surrounding anatomy is displaced.
* `render_lesion` draws the lesion's exact shape on the subject grid (in millimetres of the
  voxel frame, so anisotropic voxels give round lesions) as *layers*: where, and how much of
  the tissue, each lesion compartment (oedema, necrosis, enhancing rim, infarct, gliosis,
  WMH ...) replaces. The generator then turns the layers into signal for each contrast from
  the compartments' T1 / T2 / PD (`synth_mr`), so one lesion looks in T1w, T2w and FLAIR the
  way it does in real scans, with one ground-truth mask for all contrasts.

Shapes are level sets: a signed depth in millimetres, positive inside. The ground truth is
every voxel with positive depth (and the right tissue, and inside the brain); the replaced
fraction ramps from 35 % at the border to full strength 1.5 mm inside, like partial volume,
and is exactly zero outside the ground truth.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from scipy import ndimage

from medanomaly.data.synth_fields import control_points, log_uniform, random_rotation, smooth_field
from medanomaly.data.synth_mr import draw_tissues

FAMILIES = ("tumour", "stroke", "wmh")
HEALTHY = "healthy"

# Size ranges sampled log-uniformly by a subject's size quantile `size_u` in [0, 1]:
# tumour and stroke by target volume in ml (before the tissue constraints trim them),
# wmh by the typical radius of one focus in mm.
SIZE_RANGES = {"tumour": (2.0, 120.0), "stroke": (0.3, 80.0), "wmh": (1.0, 4.0)}

_EDGE_MM = 1.5  # depth over which the intensity change ramps up to full strength
_EDGE_FLOOR = 0.35  # strength of the change in the lesion's outermost voxels


@dataclass
class Probe:
    """Tissue maps sampled every `stride` voxels of the subject grid (before mass effect)."""

    stride: np.ndarray
    spacing: np.ndarray
    mask: np.ndarray
    gm: np.ndarray
    wm: np.ndarray
    right: np.ndarray  # bool: the point lies in the right hemisphere (MNI x > 0)
    csf: np.ndarray = field(init=False)
    depth: np.ndarray = field(init=False)

    def __post_init__(self) -> None:
        self.csf = np.clip(self.mask - self.gm - self.wm, 0.0, 1.0)
        self.depth = ndimage.distance_transform_edt(self.mask >= 0.5, sampling=self.spacing * self.stride)

    def q_mm(self, coarse_index) -> np.ndarray:
        """Position (mm, in the voxel frame) of a probe point."""
        return np.asarray(coarse_index) * self.stride * self.spacing

    @property
    def centroid_q(self) -> np.ndarray:
        idx = np.argwhere(self.mask >= 0.5)
        return self.q_mm(idx.mean(0))


@dataclass
class Layer:
    """Within `region` (slices of the subject grid), a fraction `alpha` of the voxel's signal
    is replaced by `hetero` times the signal of a mix of compartments (`mix`: name -> weight,
    weights scalar or arrays that sum to 1)."""

    region: tuple
    alpha: np.ndarray
    mix: dict
    hetero: np.ndarray | float = 1.0

    def apply(self, image: np.ndarray, signal: dict[str, float]) -> None:
        """Blends this layer into `image` (changed in place) given each compartment's signal."""
        target = sum(weight * signal[name] for name, weight in self.mix.items())
        view = image[self.region]
        view += self.alpha * (target * self.hetero - view)


@dataclass
class Canvas:
    """What rendering a lesion reads (tissue maps on the subject grid) and the layers it draws."""

    shape: tuple
    gm: np.ndarray
    wm: np.ndarray
    csf: np.ndarray
    spacing: np.ndarray
    right: np.ndarray  # bool: the voxel lies in the right hemisphere (MNI x > 0)
    layers: list = field(default_factory=list)

    def blend(self, region, alpha, mix: dict, hetero=1.0) -> None:
        self.layers.append(Layer(region, np.asarray(alpha, dtype=np.float32), mix, hetero))


def _choose(probe: Probe, conditions, rng: np.random.Generator, with_index: bool = False):
    """A random probe point meeting the first satisfiable condition: its position in mm
    (and its probe index if `with_index`)."""
    for cond in conditions:
        idx = np.argwhere(cond & (probe.mask >= 0.5))
        if len(idx):
            pick = idx[rng.integers(len(idx))]
            return (probe.q_mm(pick), tuple(pick)) if with_index else probe.q_mm(pick)
    raise RuntimeError("The subject's brain mask is empty: cannot place a lesion.")


def _radius_for_volume(volume_ml: float) -> float:
    return float((3.0 * volume_ml * 1000.0 / (4.0 * np.pi)) ** (1.0 / 3.0))


def _as_list(a) -> list:
    return [round(float(v), 4) for v in np.asarray(a).ravel()]


def plan_lesion(family: str, probe: Probe, size_u: float, rng: np.random.Generator) -> dict:
    """Places a lesion of `family` and draws its parameters (JSON-serialisable dict).

    A plan may hold ``"pushes"``: radial mass effects ``{"centre_q", "radius", "strength"}``
    for the generator to add to its coordinate map.
    """
    if family == "tumour":
        return _plan_tumour(probe, size_u, rng)
    if family == "stroke":
        return _plan_stroke(probe, size_u, rng)
    if family == "wmh":
        return _plan_wmh(probe, size_u, rng)
    raise ValueError(f"Unknown lesion family {family!r}; choose one of {', '.join(FAMILIES)}.")


def render_lesion(plan: dict, canvas: Canvas, rng: np.random.Generator) -> tuple[np.ndarray, dict]:
    """Draws the planned lesion as layers on `canvas`; returns the lesion mask (bool, subject
    grid) and its named parts (bool masks)."""
    family = plan["family"]
    if family == "tumour":
        return _render_tumour(plan, canvas, rng)
    if family == "stroke":
        return _render_stroke(plan, canvas, rng)
    if family == "wmh":
        return _render_wmh(plan, canvas, rng)
    raise ValueError(f"Unknown lesion family {family!r}.")


# ----------------------------------------------------------------------------------------
# geometry helpers


def bbox(centre_q: np.ndarray, half_mm: float, spacing: np.ndarray, shape) -> tuple[tuple, list]:
    """Slices of the box of half-size `half_mm` around `centre_q`, and its voxel offsets from
    the centre in mm as three broadcastable arrays."""
    centre_q = np.asarray(centre_q, dtype=np.float64)
    lo = np.clip(np.floor((centre_q - half_mm) / spacing).astype(int), 0, np.asarray(shape))
    hi = np.clip(np.ceil((centre_q + half_mm) / spacing).astype(int) + 1, 0, np.asarray(shape))
    slices = tuple(slice(int(a), int(b)) for a, b in zip(lo, hi))
    offsets = []
    for axis in range(3):
        d = (np.arange(lo[axis], hi[axis]) * spacing[axis] - centre_q[axis]).astype(np.float32)
        view = [1, 1, 1]
        view[axis] = len(d)
        offsets.append(d.reshape(view))
    return slices, offsets


def _local_shape(offsets) -> tuple[int, int, int]:
    return tuple(int(o.size) for o in offsets)


def _local_noise(offsets, spacing, ctrl_mm: float, rng: np.random.Generator, clip: float = 2.5) -> np.ndarray:
    shape = _local_shape(offsets)
    extent = np.asarray(shape) * spacing
    return smooth_field(shape, control_points(extent, max(ctrl_mm, 1.5)), rng, clip=clip)


_BLOB_NOISE_CLIP = 2.0


def _blob_reach(radius: float, irregularity: float, elongation: float = 0.25) -> float:
    """An upper bound of how far from its centre a `_blob_depth` blob reaches (mm)."""
    return radius * (1.0 + _BLOB_NOISE_CLIP * min(irregularity, 0.45)) * float(np.exp(2.0 * elongation)) + 1.0


def _blob_depth(offsets, spacing, radius: float, irregularity: float, rng: np.random.Generator, elongation=0.25):
    """Signed depth (mm, > 0 inside) of an irregular, slightly elongated, randomly turned
    ball of `radius`. The centre is always inside (irregularity <= 0.45)."""
    rot = random_rotation(rng, 180.0)
    axes = np.exp(rng.uniform(-elongation, elongation, 3))
    axes /= np.prod(axes) ** (1.0 / 3.0)
    dx, dy, dz = offsets
    rho2 = 0.0
    for a in range(3):
        u = (rot[0, a] * dx + rot[1, a] * dy + rot[2, a] * dz) / axes[a]
        rho2 = rho2 + u * u
    noise = _local_noise(offsets, spacing, 0.7 * radius, rng, clip=_BLOB_NOISE_CLIP)
    return (radius * (1.0 + min(irregularity, 0.45) * noise) - np.sqrt(rho2)).astype(np.float32)


def _ramp(depth: np.ndarray, floor: float = _EDGE_FLOOR, edge_mm: float = _EDGE_MM) -> np.ndarray:
    """Strength of the intensity change: 0 outside, from `floor` at the border to 1 at
    `edge_mm` inside."""
    return np.where(depth > 0, np.clip(floor + depth / edge_mm, 0.0, 1.0), 0.0).astype(np.float32)


# ----------------------------------------------------------------------------------------
# tumour: irregular core (dark, or ring-enhancing) inside hyper-intense oedema, mass effect


def _plan_tumour(probe: Probe, size_u: float, rng: np.random.Generator) -> dict:
    volume = log_uniform(*SIZE_RANGES["tumour"], size_u)
    r_total = _radius_for_volume(volume)
    r_core = r_total * rng.uniform(0.35, 0.65)
    d, wm, gm = probe.depth, probe.wm, probe.gm
    centre = _choose(
        probe,
        [(wm > 0.5) & (d >= r_core + 4), (gm + wm > 0.5) & (d >= 0.6 * r_core + 2), d >= 0.6 * d.max()],
        rng,
    )
    core_type = "ring" if rng.random() < 0.5 else "dark"
    push_radius = r_total * rng.uniform(1.0, 1.4)
    push_strength = rng.uniform(0.25, 0.55) * min(1.0, r_core / 12.0)
    return {
        "family": "tumour",
        "size_u": float(size_u),
        "target_ml": round(volume, 3),
        "centre_q": _as_list(centre),
        "r_total_mm": round(r_total, 3),
        "r_core_mm": round(r_core, 3),
        "irregularity_core": round(rng.uniform(0.12, 0.3), 3),
        "irregularity_oedema": round(rng.uniform(0.25, 0.45), 3),
        "core_type": core_type,
        "oedema_margin_mm": round(rng.uniform(1.5, 5.0), 3),
        "oedema_strength": round(rng.uniform(0.7, 0.9), 3),
        "rim_mm": round(float(np.clip(r_core * rng.uniform(0.2, 0.35), 1.5, 6.0)), 3),
        "relaxation": draw_tissues(rng, ("oedema", "tumour_core", "necrosis", "enhancing_rim")),
        "pushes": [
            {"centre_q": _as_list(centre), "radius": round(push_radius, 3), "strength": round(push_strength, 4)}
        ],
    }


def _render_tumour(plan: dict, canvas: Canvas, rng: np.random.Generator):
    sp, shape = canvas.spacing, canvas.shape
    r_total, r_core = plan["r_total_mm"], plan["r_core_mm"]
    reach = max(
        _blob_reach(r_core, plan["irregularity_core"]) + plan["oedema_margin_mm"],
        _blob_reach(r_total, plan["irregularity_oedema"]),
    )
    sl, off = bbox(np.asarray(plan["centre_q"]), reach + 2.0, sp, shape)
    depth_core = _blob_depth(off, sp, r_core, plan["irregularity_core"], rng)
    depth_oed = _blob_depth(off, sp, r_total, plan["irregularity_oedema"], rng)
    depth_oed = np.maximum(depth_oed, depth_core + plan["oedema_margin_mm"])  # oedema surrounds the core
    hetero = (
        1.0
        + 0.07 * _local_noise(off, sp, max(r_total / 3.0, 3.0), rng)
        + 0.04 * _local_noise(off, sp, max(r_total / 8.0, 2.0), rng)
    )
    # oedema spreads through white matter (and some grey), not into CSF
    tissue = (canvas.wm[sl] + 0.5 * canvas.gm[sl]) > 0.45
    core = depth_core > 0
    oedema = ((depth_oed > 0) & tissue) | core
    w = _ramp(depth_oed) * tissue
    w[core] = 1.0
    canvas.blend(sl, w * plan["oedema_strength"], {"oedema": 1.0}, hetero)
    if plan["core_type"] == "ring":  # enhancing rim around a necrotic centre
        s = np.clip((depth_core - plan["rim_mm"]) / 1.5 + 0.5, 0.0, 1.0).astype(np.float32)
        mix = {"enhancing_rim": 1.0 - s, "necrosis": s}
    else:  # non-enhancing solid core
        mix = {"tumour_core": 1.0}
    canvas.blend(sl, _ramp(depth_core), mix, hetero)
    lesion = np.zeros(shape, dtype=bool)
    lesion[sl] = oedema
    core_full = np.zeros(shape, dtype=bool)
    core_full[sl] = core
    return lesion, {"oedema": lesion & ~core_full, "core": core_full}


# ----------------------------------------------------------------------------------------
# stroke: a cortical wedge (vascular territory) or a subcortical blob; acute (oedematous infarct:
# dark on T1w, bright on T2w and FLAIR) or chronic (a CSF-like cavity, dark on FLAIR, inside a
# bright gliotic rim)


def _plan_stroke(probe: Probe, size_u: float, rng: np.random.Generator) -> dict:
    volume = log_uniform(*SIZE_RANGES["stroke"], size_u)
    p_cortical = 0.75 if volume > 4.0 else 0.25
    mode = "cortical" if rng.random() < p_cortical else "subcortical"
    d, wm, gm = probe.depth, probe.wm, probe.gm
    plan = {
        "family": "stroke",
        "size_u": float(size_u),
        "target_ml": round(volume, 3),
        "mode": mode,
        "irregularity": round(rng.uniform(0.2, 0.35), 3),
        "stage": "chronic" if rng.random() < 0.5 else "acute",
        "gliosis_mm": round(rng.uniform(1.0, 2.5), 3),
        "strength": round(rng.uniform(0.75, 0.95), 3),
        "relaxation": draw_tissues(rng, ("acute_infarct", "chronic_cavity", "gliosis")),
    }
    if mode == "cortical":
        point, index = _choose(
            probe,
            [(gm > 0.45) & (gm + wm > 0.6) & (d < 8.0), (gm + wm > 0.6) & (d < 15.0), gm + wm > 0.5],
            rng,
            with_index=True,
        )
        centroid = probe.centroid_q
        axis = point - centroid
        dist = float(np.linalg.norm(axis))
        axis = axis / max(dist, 1e-6) + 0.25 * rng.standard_normal(3)
        axis /= np.linalg.norm(axis)
        theta = rng.uniform(18.0, 35.0)
        length = (3.0 * volume * 1000.0 / (2.0 * np.pi * (1.0 - np.cos(np.deg2rad(theta))))) ** (1.0 / 3.0)
        length = float(np.clip(length, 6.0, max(6.0, 0.85 * dist)))
        plan.update(
            point_q=_as_list(point),
            apex_q=_as_list(point - length * axis),
            axis=_as_list(axis),
            theta_deg=round(theta, 3),
            length_mm=round(length, 3),
            hemisphere="right" if probe.right[index] else "left",  # a territory stays on its side
        )
    else:
        radius = _radius_for_volume(volume)
        centre = _choose(
            probe,
            [((wm > 0.5) | (gm > 0.5)) & (d >= radius + 4), (gm + wm > 0.6) & (d >= 0.5 * radius + 2), gm + wm > 0.5],
            rng,
        )
        plan.update(centre_q=_as_list(centre), radius_mm=round(radius, 3))
    return plan


def _render_stroke(plan: dict, canvas: Canvas, rng: np.random.Generator):
    sp, shape = canvas.spacing, canvas.shape
    if plan["mode"] == "cortical":
        length, theta = plan["length_mm"], np.deg2rad(plan["theta_deg"])
        axis = np.asarray(plan["axis"], dtype=np.float32)
        sl, off = bbox(np.asarray(plan["apex_q"]), length + 16.0, sp, shape)
        dx, dy, dz = off
        r = np.sqrt(dx * dx + dy * dy + dz * dz) + 1e-6
        cos_angle = (dx * axis[0] + dy * axis[1] + dz * axis[2]) / r
        angle = np.arccos(np.clip(cos_angle, -1.0, 1.0))
        wobble = _local_noise(off, sp, length / 4.0, rng) + 0.6 * _local_noise(off, sp, length / 9.0, rng)
        theta_eff = theta * np.clip(1.0 + plan["irregularity"] * wobble, 0.2, None)
        r_out = length + 8.0 + 4.0 * _local_noise(off, sp, length / 2.0, rng, clip=1.5)
        depth = np.minimum(np.minimum((theta_eff - angle) * r, r_out - r), r - 0.3 * length).astype(np.float32)
        hetero_ctrl = length / 2.5
        side = canvas.right[sl] if plan["hemisphere"] == "right" else ~canvas.right[sl]
    else:
        radius = plan["radius_mm"]
        sl, off = bbox(np.asarray(plan["centre_q"]), _blob_reach(radius, plan["irregularity"]) + 2.0, sp, shape)
        depth = _blob_depth(off, sp, radius, plan["irregularity"], rng)
        hetero_ctrl = radius / 2.0
        side = True
    hetero = (
        1.0
        + 0.12 * _local_noise(off, sp, max(hetero_ctrl, 3.0), rng)
        + 0.06 * _local_noise(off, sp, max(hetero_ctrl / 3.0, 2.0), rng)
    )
    tissue = ((canvas.gm[sl] + canvas.wm[sl]) > 0.5) & side
    region = (depth > 0) & tissue
    if plan.get("stage") == "chronic":
        s = np.clip((depth - plan["gliosis_mm"]) / 1.0 + 0.5, 0.0, 1.0).astype(np.float32)
        mix = {"gliosis": 1.0 - s, "chronic_cavity": s}
    else:
        s, mix = None, {"acute_infarct": 1.0}
    canvas.blend(sl, _ramp(depth) * tissue * plan["strength"], mix, hetero)
    lesion = np.zeros(shape, dtype=bool)
    lesion[sl] = region
    parts = {"infarct": lesion.copy()}
    if s is not None:
        cavity = np.zeros(shape, dtype=bool)
        cavity[sl] = region & (s >= 0.5)
        parts.update(cavity=cavity, gliosis=lesion & ~cavity)
    return lesion, parts


# ----------------------------------------------------------------------------------------
# wmh: 3-15 small hyper-intense foci in white matter, half of them periventricular


def _plan_wmh(probe: Probe, size_u: float, rng: np.random.Generator) -> dict:
    r_scale = log_uniform(*SIZE_RANGES["wmh"], size_u)
    n_foci = int(rng.integers(3, 16))
    d, wm, csf = probe.depth, probe.wm, probe.csf
    deep_csf = (csf > 0.5) & (d > 15.0)
    if deep_csf.any():
        to_ventricle = ndimage.distance_transform_edt(~deep_csf, sampling=probe.spacing * probe.stride)
    else:
        to_ventricle = np.full(d.shape, np.inf)
    periventricular = (wm > 0.8) & (to_ventricle < 10.0) & (d > 10.0)
    deep = (wm > 0.8) & (d > 12.0)
    foci = []
    for _ in range(n_foci):
        first = periventricular if rng.random() < 0.5 else deep
        centre = _choose(probe, [first, deep, wm > 0.5], rng)
        foci.append(
            {
                "centre_q": _as_list(centre),
                "radius_mm": round(max(0.9, r_scale * rng.uniform(0.6, 1.4)), 3),
                "irregularity": round(rng.uniform(0.1, 0.3), 3),
                "intensity_jitter": round(rng.uniform(0.95, 1.05), 3),
            }
        )
    return {
        "family": "wmh",
        "size_u": float(size_u),
        "focus_radius_mm": round(r_scale, 3),
        "strength": round(rng.uniform(0.85, 1.0), 3),
        "relaxation": draw_tissues(rng, ("wmh",)),
        "foci": foci,
    }


def _render_wmh(plan: dict, canvas: Canvas, rng: np.random.Generator):
    sp, shape = canvas.spacing, canvas.shape
    lesion = np.zeros(shape, dtype=bool)
    for focus in plan["foci"]:
        radius = focus["radius_mm"]
        sl, off = bbox(np.asarray(focus["centre_q"]), _blob_reach(radius, focus["irregularity"], 0.35) + 2.0, sp, shape)
        depth = _blob_depth(off, sp, radius, focus["irregularity"], rng, elongation=0.35)
        tissue = canvas.wm[sl] > 0.5
        alpha = _ramp(depth, floor=0.6, edge_mm=1.0) * tissue * plan["strength"]
        canvas.blend(sl, alpha, {"wmh": 1.0}, focus["intensity_jitter"])
        lesion[sl] |= (depth > 0) & tissue
    return lesion, {"foci": lesion.copy()}
