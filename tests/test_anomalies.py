"""Synthetic training anomalies: the five restoration tasks, SyntheticAnomaly, folds, FPI, MONAI wrappers."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from monai.data import MetaTensor
from scipy import ndimage

from medanomaly.anomalies import (
    TASK_NAMES,
    TASKS,
    AnomalyRegion,
    RandFPId,
    RandSyntheticAnomalyd,
    SyntheticAnomaly,
    foreign_patch_interpolation,
    inside_fraction,
    poisson_blend,
    poisson_blending,
    sample_region,
    sink_deformation,
    source_deformation,
    task_folds,
    warp_source,
)
from medanomaly.anomalies.poisson import dirichlet_rectangle
from medanomaly.anomalies.sources import SourcePool
from medanomaly.anomalies.synthetic import CHANGED

SIZE = 128


def synthetic_brain(seed: int = 0, invert: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """An elliptic 'brain' with smooth texture and a stripe pattern, 0 outside."""
    rng = np.random.default_rng(seed)
    rows, cols = np.mgrid[:SIZE, :SIZE] / SIZE
    brain = ((rows - 0.5) / 0.4) ** 2 + ((cols - 0.5) / 0.32) ** 2 < 1
    texture = ndimage.gaussian_filter(rng.random((SIZE, SIZE)), 3)
    texture = (texture - texture.min()) / np.ptp(texture)
    image = 0.35 + 0.35 * texture + 0.15 * np.sin(10 * np.pi * cols) * np.cos(8 * np.pi * rows)
    image = 1.0 - image if invert else image
    return (image * brain).astype(np.float32), brain


@pytest.fixture(scope="module")
def brain_slice():
    return synthetic_brain(0)


@pytest.fixture(scope="module")
def other_cohort():
    """Slices of a 'differently contrasted cohort' (inverted contrast)."""
    return [synthetic_brain(seed, invert=True)[0] for seed in (1, 2)]


def laplacian(image: np.ndarray) -> np.ndarray:
    return ndimage.convolve(image, np.array([[0, 1, 0], [1, -4, 1], [0, 1, 0]], dtype=float), mode="nearest")


# --- the five tasks ----------------------------------------------------------------------------


@pytest.mark.parametrize("task", TASK_NAMES)
def test_task_stays_in_brain_and_mask_matches_change(task, brain_slice, other_cohort):
    image, brain = brain_slice
    anomaly = SyntheticAnomaly(tasks=[task], clean_fraction=0.0, seed=1, other_source=other_cohort)
    mean_change_inside = []
    for _ in range(8):
        result = anomaly.sample(image, brain)
        corrupted, mask = result.image, result.mask > 0
        assert corrupted.dtype == np.float32 and corrupted.shape == image.shape
        assert np.all(corrupted[~brain] == 0), "the corrupted slice must stay 0 outside the brain"
        assert corrupted.min() >= 0 and corrupted.max() <= 1
        assert np.all(mask <= brain), "the anomaly mask is restricted to the brain"
        assert 1 <= len(result.anomalies) <= 4 and mask.any()
        # the Poisson box solve moves pixels near its region a little; those moved by more than CHANGED join the mask
        changed = np.abs(corrupted - image) > (CHANGED if task.startswith("poisson") else 1e-5)
        allowed = ndimage.binary_dilation(mask, iterations=1) if task in ("sink", "source") else mask
        assert not np.any(changed & ~allowed), "pixels changed outside the anomaly mask"
        for _, region in result.anomalies:
            assert inside_fraction(region, brain) >= 0.5
        mean_change_inside.append(np.abs(corrupted - image)[mask].mean())
    assert np.mean(mean_change_inside) > 2e-3, "the masked pixels should differ from the input"


def test_region_masks_are_cached_read_only_and_recomputed_for_another_region_or_shape():
    region = AnomalyRegion(centre=(30.0, 40.0), semi_axes=(8.0, 5.0), angle=0.3)
    mask = region.mask((64, 80))
    assert region.mask((64, 80)) is mask and not mask.flags.writeable  # a caller cannot corrupt the cache
    with pytest.raises(ValueError):
        mask[0, 0] = True
    moved = region.mask((64, 81))
    assert moved.shape == (64, 81) and np.array_equal(moved[:, :80], mask)
    assert not np.array_equal(region.scaled(0.5).mask((64, 80)), mask)


def test_regions_sizes_and_placement(brain_slice):
    _, brain = brain_slice
    rng = np.random.default_rng(0)
    brain_box = np.array([np.ptp(axis) + 1 for axis in np.nonzero(brain)], dtype=float)
    for _ in range(200):
        region = sample_region(brain, rng)
        assert inside_fraction(region, brain) >= 0.5
        assert np.all(region.footprint() <= 0.8 * brain_box + 1e-6)
        assert region.mask(brain.shape).any()


def test_poisson_blend_matches_boundary_and_carries_source_gradients(brain_slice):
    target, brain = brain_slice[0].astype(float), brain_slice[1]
    rows, cols = np.mgrid[:SIZE, :SIZE]
    pattern = 0.85 + 0.1 * np.sin(0.7 * cols) * np.cos(0.5 * rows)  # finer and brighter than the target
    source = warp_source(pattern, np.array([60.0, 70.0]), np.array([64.0, 60.0]), target.shape, rotation=0.3)
    region = AnomalyRegion(centre=(64.0, 60.0), semi_axes=(18.0, 12.0), angle=0.5).mask(target.shape)
    blended = poisson_blend(target, source, region, brain, mixed_gradients=False)

    assert np.array_equal(blended[~region], target[~region])
    # Continuity: the jump across the region's border is far smaller than a plain paste's.
    blend_jumps, paste_jumps = [], []
    for shift in ((0, 1), (0, -1), (1, 0), (-1, 0)):
        outside = np.roll(~region & brain, shift, axis=(0, 1))  # pixels whose neighbour is outside
        border = region & outside
        neighbour = np.roll(target, shift, axis=(0, 1))
        blend_jumps.append(np.abs(blended - neighbour)[border])
        paste_jumps.append(np.abs(source - neighbour)[border])
    assert np.concatenate(blend_jumps).mean() < 0.3 * np.concatenate(paste_jumps).mean()
    # Interior: the discrete Laplacian is the source's.
    interior = ndimage.binary_erosion(region)
    assert np.allclose(laplacian(blended)[interior], laplacian(source)[interior], atol=1e-3)
    assert np.abs(laplacian(target) - laplacian(source))[interior].mean() > 0.02  # the test has teeth


def test_mixed_gradients_keep_stronger_target_detail(brain_slice):
    target, brain = brain_slice
    region = AnomalyRegion(centre=(64.0, 64.0), semi_axes=(15.0, 15.0)).mask(target.shape)
    flat_source = np.full(target.shape, 0.5)  # no gradient: the target's always wins
    blended = poisson_blend(target, flat_source, region, brain, mixed_gradients=True)
    assert np.allclose(blended, target, atol=1e-3)


def random_rectangle(rng: np.random.Generator, shape: tuple[int, int]) -> np.ndarray:
    """A random full rectangle whose one-pixel ring lies in the image (often touching its edge)."""
    mask = np.zeros(shape, dtype=bool)
    corners = []
    for size in shape:
        extent = int(rng.integers(1, size - 1))
        start = int(rng.choice([1, size - 1 - extent, rng.integers(1, size - extent)]))  # near a border, or anywhere
        corners.append(slice(start, start + extent))
    mask[tuple(corners)] = True
    return mask


@pytest.mark.parametrize("seed", range(6))
def test_dst_poisson_solver_equals_conjugate_gradients(seed):
    rng = np.random.default_rng(seed)
    shape = tuple(int(n) for n in rng.integers(8, 100, size=2))
    target, source = rng.random(shape), rng.random(shape)
    region = random_rectangle(rng, shape)
    brain = ndimage.binary_dilation(region, iterations=1) | (rng.random(shape) < 0.5)  # holds the ring
    for mixed in (False, True):
        direct = poisson_blend(target, source, region, brain, mixed, solver="dst")
        iterative = poisson_blend(target, source, region, brain, mixed, tolerance=1e-10, solver="cg")
        assert np.abs(direct - iterative).max() < 1e-4
        assert np.array_equal(poisson_blend(target, source, region, brain, mixed), direct)  # "auto" takes the DST


def test_dst_poisson_matches_todays_solver_on_a_brain_slice(brain_slice):
    target, brain = brain_slice[0].astype(float), brain_slice[1]
    source = warp_source(synthetic_brain(3)[0], np.array([60.0, 66.0]), np.array([64.0, 60.0]), target.shape, 0.3)
    region = np.zeros(target.shape, dtype=bool)
    region[40:90, 45:80] = True
    for mixed in (False, True):  # today's solver at its default tolerance
        todays = poisson_blend(target, source, region, brain, mixed, solver="cg")
        assert np.abs(poisson_blend(target, source, region, brain, mixed) - todays).max() < 1e-4


def test_dst_poisson_solution_solves_the_equation_with_the_boundary_values():
    rng = np.random.default_rng(11)
    target, source = rng.random((40, 50)), ndimage.gaussian_filter(rng.random((40, 50)), 1.0)
    region = np.zeros(target.shape, dtype=bool)
    region[1:30, 7:49] = True  # ring on the image's first row and last column
    blended = poisson_blend(target, source, region, solver="dst")
    assert np.array_equal(blended[~region], target[~region])
    # 4 f_p - sum_q f_q = sum_q (g_p - g_q) (+ the tiny pull towards the target) on every pixel of the region.
    neg_laplacian = -ndimage.convolve(blended, np.array([[0, 1, 0], [1, -4, 1], [0, 1, 0]], float), mode="constant")
    guidance = -ndimage.convolve(source, np.array([[0, 1, 0], [1, -4, 1], [0, 1, 0]], float), mode="constant")
    residual = neg_laplacian + 1e-4 * (blended - target) - guidance
    assert np.abs(residual[region]).max() < 1e-10


def star_region_cut_by_the_brain(brain_slice):
    target, brain = brain_slice[0].astype(float), brain_slice[1].copy()
    region = AnomalyRegion(centre=(64.0, 40.0), semi_axes=(16.0, 11.0), angle=0.4, exponent=1.4).mask(target.shape)
    brain[:, :36] = False  # a zero-flux edge through the region
    return target, brain, region


@pytest.mark.parametrize("mixed", [False, True])
def test_conjugate_gradients_solve_the_equation_on_any_region(brain_slice, mixed):
    """On a star-shaped region cut by the brain edge, every region pixel p satisfies, written out pixel by
    pixel: (pull + #linked) f_p - sum_linked f_q = pull t_p + sum_linked v_pq, with f_q = t_q outside."""
    target, brain, region = star_region_cut_by_the_brain(brain_slice)
    source = np.roll(target, 9, axis=1) * 1.3
    blended = poisson_blend(target, source, region, brain, mixed, tolerance=1e-12, solver="cg")
    inside = region & brain
    assert np.array_equal(blended[~inside], target[~inside])
    worst = 0.0
    for p in zip(*np.nonzero(inside)):
        lhs, rhs = 1e-4 * blended[p], 1e-4 * target[p]
        for dr, dc in ((0, 1), (0, -1), (1, 0), (-1, 0)):
            q = (p[0] + dr, p[1] + dc)
            if not (0 <= q[0] < SIZE and 0 <= q[1] < SIZE and brain[q]):
                continue  # zero flux
            g, t = source[p] - source[q], target[p] - target[q]
            lhs += blended[p] - blended[q]
            rhs += t if mixed and abs(t) > abs(g) else g
        worst = max(worst, abs(lhs - rhs))
    assert worst < 1e-6


def test_the_bounding_box_preconditioner_cuts_the_conjugate_gradient_iterations(brain_slice, monkeypatch):
    from medanomaly.anomalies import poisson

    target, brain, region = star_region_cut_by_the_brain(brain_slice)
    source = np.roll(target, 9, axis=1)
    iterations, real_cg = [], poisson.cg

    def counting_cg(*args, **kwargs):
        count = [0]
        result = real_cg(*args, callback=lambda _: count.__setitem__(0, count[0] + 1), **kwargs)
        iterations.append(count[0])
        return result

    monkeypatch.setattr(poisson, "cg", counting_cg)
    preconditioned = poisson_blend(target, source, region, brain, True, solver="cg")
    monkeypatch.setattr(poisson, "bounding_box_preconditioner", lambda rows, cols: None)
    plain = poisson_blend(target, source, region, brain, True, solver="cg")
    assert np.abs(preconditioned - plain).max() < 1e-4
    assert iterations[0] < 0.5 * iterations[1], iterations


@pytest.mark.parametrize("solver", ["auto", "cg"])
def test_blending_reads_the_patch_only_on_the_region_and_its_ring(brain_slice, solver):
    """The Poisson task warps its patch only inside `ring_window`: the blend is the one of the full patch."""
    from medanomaly.anomalies.poisson import ring_window

    target, brain, region = star_region_cut_by_the_brain(brain_slice)
    window = ring_window(region & brain)
    warp = (synthetic_brain(3)[0], np.array([60.0, 66.0]), np.array([64.0, 40.0]), target.shape, 0.3, 1.1)
    full, windowed = warp_source(*warp), warp_source(*warp, window=window)
    assert np.array_equal(windowed[window], full[window]) and windowed.sum() < full.sum()
    assert np.array_equal(
        poisson_blend(target, windowed, region, brain, True, solver=solver),
        poisson_blend(target, full, region, brain, True, solver=solver),
    )
    edge = np.zeros(target.shape, dtype=bool)
    edge[0:3, 5:9] = True  # at the image border the window stops at the image
    assert ring_window(edge) == (slice(0, 4), slice(4, 10)) and ring_window(edge & False) is None
    far_edge = np.zeros(target.shape, dtype=bool)
    far_edge[-3:, -4:] = True  # at the last row and column too (a FLAIR cddpm training crashed there)
    height, width = target.shape
    far_window = ring_window(far_edge)
    assert far_window == (slice(height - 4, height), slice(width - 5, width))
    assert np.array_equal(warp_source(*warp, window=far_window)[far_window], full[far_window])


def test_regions_that_are_no_dirichlet_rectangle_keep_conjugate_gradients(brain_slice):
    target = brain_slice[0].astype(float)
    source = np.roll(target, 7, axis=1)
    brain = np.ones(target.shape, dtype=bool)
    brain[60, 40] = False  # on the top ring of `box`: that edge has no Dirichlet value
    ellipse = AnomalyRegion(centre=(64.0, 64.0), semi_axes=(12.0, 9.0)).mask(target.shape)
    on_border, box = np.zeros((2, *target.shape), dtype=bool)
    on_border[0:20, 30:60] = True  # a zero-flux edge on the image border
    box[61:80, 30:60] = True
    assert dirichlet_rectangle(np.roll(box, 2, axis=0), brain) is not None  # the same box elsewhere is one
    for region in (ellipse, on_border, box):
        assert dirichlet_rectangle(region & brain, brain) is None
        auto = poisson_blend(target, source, region, brain)
        assert np.array_equal(auto, poisson_blend(target, source, region, brain, solver="cg"))
        with pytest.raises(ValueError, match="rectangle"):
            poisson_blend(target, source, region, brain, solver="dst")


@pytest.mark.parametrize("mixed", [False, True])
def test_box_solve_solves_the_guided_equation_on_the_bounding_box(brain_slice, mixed):
    """Written out pixel by pixel over the region's bounding box, the brain edge cutting it: (pull + 4) f_p -
    sum_q f_q = pull t_p + sum_q v_pq, f = t on the box's ring, v_pq the source's (or mixed) step on edges that
    touch the region with both ends in the brain, the target's step on every other edge."""
    target, brain, region = star_region_cut_by_the_brain(brain_slice)
    source = np.roll(target, 9, axis=1) * 1.3
    blended = poisson_blend(target, source, region, brain, mixed, solver="box")
    inside = region & brain
    rows, cols = np.nonzero(inside)
    box = np.zeros(target.shape, dtype=bool)
    box[rows.min() : rows.max() + 1, cols.min() : cols.max() + 1] = True
    assert np.array_equal(blended[~box], target[~box])
    worst = 0.0
    for p in zip(*np.nonzero(box)):
        lhs, rhs = 1e-4 * blended[p], 1e-4 * target[p]
        for dr, dc in ((0, 1), (0, -1), (1, 0), (-1, 0)):
            q = (p[0] + dr, p[1] + dc)
            g, t = source[p] - source[q], target[p] - target[q]
            guided = (inside[p] or inside[q]) and brain[p] and brain[q]
            lhs += blended[p] - blended[q]
            rhs += (t if mixed and abs(t) > abs(g) else g) if guided else t
        worst = max(worst, abs(lhs - rhs))
    assert worst < 1e-9


def test_box_solve_is_the_exact_blend_on_a_rectangle_and_close_to_it_on_a_star(brain_slice):
    target, brain = brain_slice[0].astype(float), brain_slice[1]
    source = warp_source(synthetic_brain(3)[0], np.array([60.0, 66.0]), np.array([64.0, 60.0]), target.shape, 0.3)
    rectangle = np.zeros(target.shape, dtype=bool)
    rectangle[40:90, 45:80] = True
    assert np.array_equal(
        poisson_blend(target, source, rectangle, brain, True, solver="box"),
        poisson_blend(target, source, rectangle, brain, True, solver="dst"),
    )
    star = AnomalyRegion(centre=(64.0, 60.0), semi_axes=(16.0, 11.0), angle=0.4, exponent=1.4).mask(target.shape)
    box = poisson_blend(target, source, star, brain, True, solver="box")
    exact = poisson_blend(target, source, star, brain, True, solver="cg")
    change = np.abs(exact - target)[star].mean()
    assert np.abs(box - exact)[star].mean() < 0.25 * change, "the box solve blends the same patch in"
    # without a fixed seam at the region's edge the patch bleeds a little beyond it (the reference's masks grow there)
    beyond = ~ndimage.binary_dilation(star, iterations=2)
    assert np.abs(box - target)[beyond].max() < 0.5 * change, "the box around the region stays nearly alone"


def test_box_solve_of_a_region_on_the_image_border_only_changes_nothing():
    target, source = np.random.default_rng(0).random((2, 20, 20))
    region = np.zeros((20, 20), dtype=bool)
    region[0, 3:9] = True  # no ring row above it: nothing to pin the solve to
    assert np.array_equal(poisson_blend(target, source, region, solver="box"), target)
    region[1, 3:9] = True  # row 1 has a ring in the image: it is blended, row 0 is left as it is
    blended = poisson_blend(target, source, region, solver="box")
    assert np.array_equal(blended[0], target[0]) and not np.allclose(blended[1, 3:9], target[1, 3:9])


def test_poisson_task_output_is_unchanged_by_the_direct_solver(brain_slice):
    image, brain = brain_slice[0].astype(float), brain_slice[1]
    # A steep axis-aligned super-ellipse at a pixel centre is exactly a 15 x 19 rectangle.
    region = AnomalyRegion(centre=(60.0, 70.0), semi_axes=(9.5, 7.5), exponent=40.0)
    assert dirichlet_rectangle(region.mask(image.shape) & brain, brain) == (slice(53, 68), slice(61, 80))
    for source in (None, (synthetic_brain(2, invert=True)[0].astype(float), brain)):
        direct = poisson_blending(image, brain, region, np.random.default_rng(3), source=source)
        todays = poisson_blending(image, brain, region, np.random.default_rng(3), source=source, solver="cg")
        assert np.abs(direct - todays).max() < 1e-4 and np.abs(direct - image).max() > 0.01


def ring_slice(radius: float = 12.0):
    rows, cols = np.mgrid[:SIZE, :SIZE]
    distance = np.hypot(rows - 64.0, cols - 64.0)
    brain = distance < 50
    image = (0.3 + 0.5 * np.exp(-(((distance - radius) / 2.0) ** 2))) * brain
    return image, brain, distance


def ring_radius(image: np.ndarray, distance: np.ndarray) -> float:
    weight = np.clip(image - 0.3, 0, None) * (distance < 30)
    return float((weight * distance).sum() / weight.sum())


@pytest.mark.parametrize("deform, shrinks", [(sink_deformation, True), (source_deformation, False)])
def test_sink_contracts_and_source_expands(deform, shrinks):
    image, brain, distance = ring_slice()
    region = AnomalyRegion(centre=(64.0, 64.0), semi_axes=(25.0, 25.0))
    deformed = deform(image, brain, region, np.random.default_rng(0), push=4.0)
    before, after = ring_radius(image, distance), ring_radius(deformed, distance)
    assert (after < before - 1.5) if shrinks else (after > before + 1.5)
    assert np.array_equal(deformed[distance > 25], image[distance > 25])


def test_source_undoes_sink():
    image, brain, distance = ring_slice()
    region = AnomalyRegion(centre=(64.0, 64.0), semi_axes=(25.0, 25.0))
    rng = np.random.default_rng(0)
    there_and_back = source_deformation(
        sink_deformation(image, brain, region, rng, push=2.0), brain, region, rng, push=2.0
    )
    assert (
        np.abs(there_and_back - image).mean()
        < 0.1 * np.abs(sink_deformation(image, brain, region, rng, push=2.0) - image).mean()
    )


def test_intensity_change_is_smooth_and_noisy(brain_slice):
    image, brain = brain_slice
    rng = np.random.default_rng(3)
    step_ratios = []
    while len(step_ratios) < 12:
        region = sample_region(brain, rng)
        difference = TASKS["intensity"](image, brain, region, rng) - image
        inside = region.mask(image.shape) & brain
        if np.abs(difference).max() < 1e-3 or not ndimage.binary_erosion(inside, iterations=4).any():
            continue  # clipped away, or too thin to fade in over more than a pixel or two
        pairs = brain[:, 1:] & brain[:, :-1], brain[1:] & brain[:-1]
        steps = np.concatenate(
            [np.abs(np.diff(difference, axis=1))[pairs[0]], np.abs(np.diff(difference, axis=0))[pairs[1]]]
        )
        step_ratios.append(steps.max() / np.abs(difference).max())
        # Modulated by noise: not one constant plateau.
        core = ndimage.binary_erosion(inside, iterations=3)
        if core.sum() > 20:
            assert np.std(difference[core]) > 0.05 * np.abs(difference[core]).mean()
    # Smooth: no neighbour step, the rim included, comes near the change itself (a hard-edged
    # change would average ~0.95 here; the faded, noise-modulated one ~0.25).
    assert max(step_ratios) < 0.8 and np.mean(step_ratios) < 0.35


# --- SyntheticAnomaly ----------------------------------------------------------------------------


def test_clean_fraction_and_anomaly_count(brain_slice):
    image, brain = brain_slice
    anomaly = SyntheticAnomaly(tasks=["sink", "intensity"], seed=0)
    counts = [len(anomaly.sample(image, brain).anomalies) for _ in range(500)]
    counts = np.array(counts)
    assert 0.15 < np.mean(counts == 0) < 0.25
    assert set(counts[counts > 0]) == {1, 2, 3, 4}
    assert 0.4 < np.mean(counts[counts > 0] == 1) < 0.6  # 1 more with probability 1/2 each time


def test_clean_sample_is_unchanged_with_empty_mask(brain_slice):
    image, brain = brain_slice
    corrupted, mask = SyntheticAnomaly(tasks=["sink"], clean_fraction=1.0, seed=0)(image[None], brain[None])
    assert corrupted.shape == mask.shape == (1, SIZE, SIZE)
    assert np.array_equal(corrupted[0], image) and not mask.any()


def test_same_seed_same_output(brain_slice, other_cohort):
    image, brain = brain_slice

    def run(seed):
        anomaly = SyntheticAnomaly(seed=seed, other_source=other_cohort, clean_fraction=0.0)
        return [anomaly(synthetic_brain(k)[0], synthetic_brain(k)[1]) for k in range(6)]

    first, second, other = run(7), run(7), run(8)
    for (a_image, a_mask), (b_image, b_mask) in zip(first, second):
        assert np.array_equal(a_image, b_image) and np.array_equal(a_mask, b_mask)
    assert any(not np.array_equal(a[0], b[0]) for a, b in zip(first, other))


def test_bad_configuration_is_reported():
    with pytest.raises(ValueError, match="other_source"):
        SyntheticAnomaly(tasks=["poisson_other"])
    with pytest.raises(ValueError, match="choose from"):
        SyntheticAnomaly(tasks=["cutpaste"])
    with pytest.raises(ValueError, match="2D"):
        SyntheticAnomaly(tasks=["sink"])(np.zeros((2, 8, 8)))


def test_task_folds():
    folds = task_folds()
    assert len(folds) == 10 and len({train for train, _ in folds}) == 10
    for train, validation in folds:
        assert len(train) == 3 and len(validation) == 2
        assert sorted(train + validation) == sorted(TASK_NAMES)
    for task in TASK_NAMES:
        assert sum(task in validation for _, validation in folds) == 4
    assert task_folds() == folds
    with pytest.raises(ValueError):
        task_folds(n_folds=11)


# --- FPI -------------------------------------------------------------------------------------


def test_fpi_square_and_blend(brain_slice, other_cohort):
    image, brain = brain_slice
    other = other_cohort[0]
    for seed in range(30):
        blended, mask, alpha = foreign_patch_interpolation(image, other, rng=seed)
        assert 0.0 <= alpha <= 1.0
        rows, cols = np.nonzero(mask)
        height, width = np.ptp(rows) + 1, np.ptp(cols) + 1
        assert height == width and mask.sum() == height * width, "the mask is one full square"
        assert 0.05 * SIZE - 1 <= height / 2 <= 0.2 * SIZE + 1
        centre = (rows.min() + rows.max() + 1) / 2, (cols.min() + cols.max() + 1) / 2
        assert all(0.2 * SIZE - 1 <= c <= 0.8 * SIZE + 1 for c in centre)
        square = mask > 0
        expected = (1 - alpha) * image + alpha * other
        assert np.allclose(blended[square], expected[square], atol=1e-6)
        assert np.array_equal(blended[~square], image[~square])


def test_fpi_with_brain_mask_stays_in_brain(brain_slice, other_cohort):
    image, brain = brain_slice
    other = np.roll(other_cohort[0], 20, axis=1)  # its brain reaches beyond this one's
    blended, mask, _ = foreign_patch_interpolation(image[None], other[None], brain[None], rng=4)
    assert blended.shape == mask.shape == (1, SIZE, SIZE)
    assert np.all(blended[0][~brain] == 0) and np.all(mask[0][~brain] == 0)


# --- MONAI wrappers ----------------------------------------------------------------------------


def pipeline_item(seed: int) -> dict:
    image, brain = synthetic_brain(seed)
    return {"image": MetaTensor(torch.from_numpy(image[None])), "mask": MetaTensor(torch.from_numpy(brain[None] * 1.0))}


def test_rand_synthetic_anomalyd_is_seeded_and_typed(other_cohort):
    def run(seed):
        transform = RandSyntheticAnomalyd(other_source=other_cohort, clean_fraction=0.0)
        transform.set_random_state(seed)
        return [transform(pipeline_item(k)) for k in range(4)]

    first, second = run(3), run(3)
    for a, b in zip(first, second):
        assert isinstance(a["corrupted"], torch.Tensor) and a["corrupted"].shape == (1, SIZE, SIZE)
        assert a["anomaly_mask"].shape == (1, SIZE, SIZE) and a["anomaly_mask"].any()
        assert torch.equal(a["corrupted"], b["corrupted"]) and torch.equal(a["anomaly_mask"], b["anomaly_mask"])
        assert torch.all(a["corrupted"][a["mask"] == 0] == 0)
        assert torch.equal(a["image"], b["image"])  # the input is kept
    assert not torch.equal(run(4)[0]["corrupted"], first[0]["corrupted"])


def test_rand_fpid_uses_previous_slices():
    transform = RandFPId()
    transform.set_random_state(0)
    inputs = [pipeline_item(k) for k in range(3)]
    items = [transform(item) for item in inputs]
    for k, item in enumerate(items):
        assert item["corrupted"].shape == item["anomaly_mask"].shape == (1, SIZE, SIZE)
        assert 0.0 < item["alpha"] <= 1.0
        outside = item["anomaly_mask"] == 0
        assert torch.equal(item["corrupted"][outside], item["image"][outside])
        # inside the square: (1 - alpha) x + alpha partner, the partner being an earlier slice of the
        # stream (the first slice, with nothing earlier, blends its own left-right mirror)
        image, brain = (inputs[k][key][0].numpy() for key in ("image", "mask"))
        candidates = [(inputs[j]["image"][0] * inputs[j]["mask"][0]).numpy() for j in range(k)] or [
            (image * brain)[:, ::-1]
        ]
        square, alpha = item["anomaly_mask"][0].numpy() > 0, item["alpha"]
        matches = [
            np.allclose(
                item["corrupted"][0].numpy()[square], ((1 - alpha) * image * brain + alpha * partner)[square], atol=1e-5
            )
            for partner in candidates
        ]
        assert any(matches), f"slice {k}: the square is no blend with an earlier slice"


def test_rand_fpid_blends_with_the_provided_partner(other_cohort):
    partner = other_cohort[0] * synthetic_brain(0)[1]
    transform = RandFPId(source=[partner])
    transform.set_random_state(1)
    item = transform(pipeline_item(0))
    image, square, alpha = item["image"][0].numpy(), item["anomaly_mask"][0].numpy() > 0, item["alpha"]
    expected = (1 - alpha) * image + alpha * partner
    assert np.allclose(item["corrupted"][0].numpy()[square], expected[square], atol=1e-6)


def test_ring_buffer_remembers_recent_slices():
    pool, rng = SourcePool(memory=2), np.random.default_rng(0)
    assert pool.draw(rng) is None
    slices = [synthetic_brain(k) for k in range(3)]
    for image, brain in slices:
        pool.remember(image.astype(float), brain)
    drawn = {pool.draw(rng)[0].tobytes() for _ in range(20)}
    assert drawn == {image.astype(float).tobytes() for image, _ in slices[1:]}  # the oldest is forgotten


# --- draws, defaults and edge cases, checked against the documented recipes ----------------------


class RecordingRng:
    """A numpy Generator that logs every draw as (method, args, kwargs, value); `script` gives the
    values some methods return instead of drawing, in order."""

    def __init__(self, seed: int = 0, **script):
        self._rng, self.calls = np.random.default_rng(seed), []
        self._script = {name: list(values) for name, values in script.items()}

    def __getattr__(self, name):
        def draw(*args, **kwargs):
            scripted = self._script.get(name)
            value = scripted.pop(0) if scripted else getattr(self._rng, name)(*args, **kwargs)
            self.calls.append((name, args, kwargs, value))
            return value

        return draw


def small_slice(size: int = 48, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """A textured disc 'brain' on a size x size grid, 0 outside, float32."""
    rows, cols = np.mgrid[:size, :size]
    brain = np.hypot(rows - size / 2, cols - size / 2) < 0.4 * size
    texture = ndimage.gaussian_filter(np.random.default_rng(seed).random((size, size)), 2)
    image = 0.3 + 0.4 * (texture - texture.min()) / np.ptp(texture)
    return (image * brain).astype(np.float32), brain


def bilinear(image: np.ndarray, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
    """Linear interpolation of `image` at (rows, cols), written out; coordinates are clamped to the image."""
    rows, cols = np.clip(rows, 0, image.shape[0] - 1), np.clip(cols, 0, image.shape[1] - 1)
    r0 = np.minimum(np.floor(rows).astype(int), image.shape[0] - 2)
    c0 = np.minimum(np.floor(cols).astype(int), image.shape[1] - 2)
    fr, fc = rows - r0, cols - c0
    return (
        image[r0, c0] * (1 - fr) * (1 - fc)
        + image[r0 + 1, c0] * fr * (1 - fc)
        + image[r0, c0 + 1] * (1 - fr) * fc
        + image[r0 + 1, c0 + 1] * fr * fc
    )


def test_smooth_noise_octaves_double_the_frequency_and_halve_the_amplitude():
    # cells = 1 + Exp((max_cells - 1) / 4.5) = 3, octaves = 1 + min(Poisson(1), 2) = 3 (finest <= max_cells),
    # each octave's grid jittered per axis by N(1, 0.1) clipped at 0.5, with a 4-node margin
    from medanomaly.anomalies.tasks import smooth_noise

    shape = (48, 40)
    jitters = [np.array([1.2, 0.9]), np.array([0.3, 1.0]), np.array([1.0, 1.0])]
    rng = RecordingRng(0, exponential=[2.0], poisson=[5], normal=list(jitters))
    noise = smooth_noise(shape, rng)
    max_cells = 44 / 3
    assert [(name, args, kwargs) for name, args, kwargs, _ in rng.calls] == [
        ("exponential", (pytest.approx((max_cells - 1) / 4.5),), {}),
        ("poisson", (1.0,), {}),
        ("normal", (1.0, 0.1), {"size": 2}),
        ("standard_normal", ((8, 7),), {}),
        ("normal", (1.0, 0.1), {"size": 2}),
        ("standard_normal", ((7, 10),), {}),
        ("normal", (1.0, 0.1), {"size": 2}),
        ("standard_normal", ((16, 16),), {}),
    ]
    grids = [value for name, _, _, value in rng.calls if name == "standard_normal"]
    total = np.zeros(shape)
    for octave, (cells, grid) in enumerate(zip([(3.6, 2.7), (3.0, 6.0), (12.0, 12.0)], grids)):
        # the slice spans `cells` grid cells from 1.5 nodes in: cubic spline, amplitude halved per octave
        at = np.meshgrid(*(1.5 + np.arange(s) * c / s for s, c in zip(shape, cells)), indexing="ij")
        total += 0.5**octave * ndimage.map_coordinates(grid, at, order=3, mode="nearest")
    assert np.allclose(noise, (total - total.min()) / np.ptp(total), rtol=0, atol=1e-12)


def test_smooth_noise_on_tiny_shapes_and_faint_grids_still_spans_zero_to_one():
    from medanomaly.anomalies.tasks import smooth_noise

    # 4 x 5: max_cells 1.5, the cell count is still drawn (capped at 1.5); one octave
    rng = RecordingRng(1)
    smooth_noise((4, 5), rng)
    assert [name for name, *_ in rng.calls] == ["exponential", "poisson", "normal", "standard_normal"]
    assert rng.calls[0][1] == (pytest.approx(0.5 / 4.5),)
    # 3 x 3: one cell, nothing to draw for it; a faint grid is still normalised to [0, 1]
    faint = 1e-3 * np.random.default_rng(0).random((5, 5))
    rng = RecordingRng(1, poisson=[3], normal=[np.array([1.0, 1.0])], standard_normal=[faint])
    noise = smooth_noise((3, 3), rng)
    assert [name for name, *_ in rng.calls] == ["poisson", "normal", "standard_normal"]
    assert noise.min() == 0.0 and noise.max() == 1.0


def test_intensity_change_adds_the_faded_change_pixel_by_pixel(monkeypatch):
    """image + magnitude * noise * fade * brain, clipped to [0, 1]: fade = depth / width capped at 1 (depth:
    distance to the nearest pixel outside the region), width = size * (0.02 + Gamma(3, 0.01)), magnitude =
    (scale / 2 + Gamma(3, scale)) * a random sign. Checked with a brute-force depth and a constant noise."""
    from medanomaly.anomalies import tasks

    monkeypatch.setattr(tasks, "smooth_noise", lambda shape, rng: np.full(shape, 0.8))
    rows, cols = np.mgrid[:48, :48]
    image = (cols / 47.0).astype(np.float32)  # dark to bright, so both clips are reached
    brain = np.hypot(rows - 22, cols - 27) < 19
    region = AnomalyRegion(centre=(20.0, 24.0), semi_axes=(14.0, 10.0))
    inside = ((cols - 24.0) / 14.0) ** 2 + ((rows - 20.0) / 10.0) ** 2 < 1
    outside = np.argwhere(~inside)
    depth = np.zeros((48, 48))
    for p in np.argwhere(inside):
        depth[tuple(p)] = np.hypot(*(outside - p).T).min()
    signs = set()
    # seeds 3 and 5 darken and brighten; scale 0.5 reaches both clips, scale 0.02 shows the fade's cap at 1
    for seed, scale in ((3, 0.5), (5, 0.5), (3, 0.02), (5, 0.02)):
        draws = np.random.default_rng(seed)
        width = min(48 * (0.02 + draws.gamma(3.0, 0.01)), depth.max())
        magnitude = (scale / 2 + draws.gamma(3.0, scale)) * draws.choice([-1.0, 1.0])
        signs.add(np.sign(magnitude))
        expected = np.clip(image + magnitude * 0.8 * np.clip(depth / width, 0, 1) * brain, 0, 1)
        changed = tasks.intensity_change(image, brain, region, np.random.default_rng(seed), scale=scale)
        assert changed.dtype == np.float64
        assert np.allclose(changed, expected, atol=1e-6)
    assert signs == {-1.0, 1.0}


@pytest.mark.parametrize("with_source", [False, True])
def test_poisson_task_draws_the_reference_patch_and_blends_it_in(monkeypatch, with_source):
    """The patch is centred on a random (jittered) pixel of the source brain, rotated by U(-pi/4, pi/4) and
    scaled by 1 + Exp(0.1) or its inverse (even odds), warped on the region's ring window only and blended
    (mixed gradients, box solve by default); the blend is clipped to [0, 1]."""
    from medanomaly.anomalies import tasks
    from medanomaly.anomalies.poisson import ring_window

    warps, blends = [], []

    def spy_warp(source, source_centre, target_centre, target_shape, **options):
        warps.append((source, source_centre, target_centre, target_shape, options))
        return np.full(target_shape, 0.5)

    def spy_blend(target, patch, region, brain=None, **options):
        blends.append((region, brain, options))
        overshoot = target.copy()
        overshoot[region] = np.where(np.arange(region.sum()) % 2, -0.5, 1.5)
        return overshoot

    monkeypatch.setattr(tasks, "warp_source", spy_warp)
    monkeypatch.setattr(tasks, "poisson_blend", spy_blend)
    image, brain = small_slice(48)
    other, other_brain = small_slice(48, seed=1)
    other_brain = other_brain & (np.arange(48) < 20)[:, None]  # only its top part
    source = (other, other_brain) if with_source else None
    source_image, source_brain = (other, other_brain) if with_source else (image, brain)
    region = AnomalyRegion(centre=(30.0, 20.0), semi_axes=(9.0, 6.0), angle=0.3)
    mask = region.mask(image.shape)
    scales = []
    for seed in range(6):
        blended = poisson_blending(image, brain, region, np.random.default_rng(seed), source=source)
        draws = np.random.default_rng(seed)
        centre = np.argwhere(source_brain)[draws.integers(source_brain.sum())] + draws.uniform(-0.5, 0.5, size=2)
        change = 1.0 + draws.exponential(0.1)
        rotation = draws.uniform(-np.pi / 4, np.pi / 4)
        scales.append(change if draws.random() < 0.5 else 1.0 / change)
        warped_from, source_centre, target_centre, target_shape, options = warps[-1]
        assert warped_from is source_image and np.allclose(source_centre, centre, rtol=0, atol=1e-12)
        assert tuple(target_centre) == region.centre and target_shape == image.shape
        assert options == {
            "rotation": pytest.approx(rotation),
            "scale": pytest.approx(scales[-1]),
            "window": ring_window(mask & brain),
        }
        blend_region, blend_brain, blend_options = blends[-1]
        assert np.array_equal(blend_region, mask) and blend_brain is brain
        assert blend_options == {"mixed_gradients": True, "solver": "box"}
        assert set(np.unique(blended[mask])) == {0.0, 1.0}  # the overshoot is clipped
    assert min(scales) < 1 < max(scales)
    poisson_blending(image, brain, region, np.random.default_rng(0), mixed_gradients=False, solver="cg")
    assert blends[-1][2] == {"mixed_gradients": False, "solver": "cg"}


@pytest.mark.parametrize("pixels", [0, 1])
def test_poisson_task_source_without_brain_or_with_one_pixel(monkeypatch, pixels):
    """A source with an empty brain lends a patch from anywhere in it; one with a single brain pixel from there."""
    from medanomaly.anomalies import tasks

    centres = []
    monkeypatch.setattr(tasks, "warp_source", lambda source, centre, *args, **kw: centres.append(centre) or source)
    image, brain = small_slice(32)
    source_brain = np.zeros((32, 32), dtype=bool)
    source_brain[5, 7] = pixels == 1
    region = AnomalyRegion(centre=(16.0, 16.0), semi_axes=(5.0, 5.0))
    for seed in range(20):
        poisson_blending(image, brain, region, np.random.default_rng(seed), source=(image, source_brain))
    centres = np.array(centres)
    if pixels:
        assert np.all(np.abs(centres - [5, 7]) <= 0.5)
    else:
        assert np.all((centres >= -0.5) & (centres <= 31.5)) and np.ptp(centres, axis=0).min() > 10


def test_radial_deformation_reads_each_pixel_along_its_ray_pixel_by_pixel():
    """A sink reads the pixel at relative radius x from x + a x (1 - x)^2, a = 27 push / (4 radius) (largest
    displacement `push`), a source from the inverse; linear interpolation, only inside region and brain."""
    from medanomaly.anomalies.tasks import radial_deformation, sink_profile, source_profile

    rows, cols = np.mgrid[:48, :48]
    image = (0.5 + 0.3 * np.sin(0.4 * rows) * np.cos(0.3 * cols) + 0.1 * np.sin(0.05 * rows * cols)).astype(np.float32)
    brain = cols < 40
    # the last region hangs over the image's top edge: pixels there read beyond it, i.e. the edge's values
    for inwards, push, centre in ((True, 3.0, 22.0), (False, 2.0, 22.0), (True, 20.0, 22.0), (True, 4.0, 4.0)):
        region = AnomalyRegion(centre=(centre, 27.0), semi_axes=(14.0, 14.0))
        drow, dcol = rows - centre, cols - 27.0
        x = np.hypot(drow, dcol) / 14.0
        inside = (x < 1) & brain
        bend = min(27 * push / (4 * 14.0), 2.5)  # a large push is capped: the profile folds at a = 3
        read_at = sink_profile(x, bend) if inwards else source_profile(x, bend)
        stretch = np.divide(read_at, x, out=np.ones_like(x), where=x > 0)
        at = centre + drow * stretch, 27.0 + dcol * stretch
        expected = np.where(inside, bilinear(image.astype(float), *at), image)
        deformed = radial_deformation(image, brain, region, push, inwards=inwards)
        assert deformed.dtype == np.float64 and np.allclose(deformed, expected, rtol=0, atol=1e-12)
        if push < 5:
            shift = np.abs(read_at - x)[x < 1] * 14.0
            assert push * 0.95 < shift.max() <= push + 1e-9  # the largest displacement is the push


def test_radial_profiles():
    from medanomaly.anomalies.tasks import sink_profile, source_profile

    x = np.array([0.0, 1 / 3, 0.5, 0.8, 1.0])
    assert np.allclose(sink_profile(x, 2.0), [0.0, 1 / 3 + 8 / 27, 0.75, 0.8 + 2.0 * 0.8 * 0.04, 1.0])
    grid = np.linspace(0.0, 1.0, 2001)
    assert np.abs(sink_profile(source_profile(grid, 2.5), 2.5) - grid).max() < 2e-6  # a fine inverse


def test_random_push_scales_the_reference_range_with_the_slice(monkeypatch):
    from medanomaly.anomalies import tasks

    pushes = []
    monkeypatch.setattr(tasks, "radial_deformation", lambda image, brain, region, push, inwards: pushes.append(push))
    image, brain = np.zeros((64, 80)), np.ones((64, 80), dtype=bool)
    region = AnomalyRegion(centre=(30.0, 30.0), semi_axes=(5.0, 5.0))
    for seed in range(3):
        tasks.source_deformation(image, brain, region, np.random.default_rng(seed), push_range=(1.0, 3.0))
        assert pushes[-1] == pytest.approx(np.random.default_rng(seed).uniform(1.0, 3.0) * 64 / 128)


def test_random_outlines_cover_the_three_kinds_and_their_parameter_ranges():
    """Ellipses, rounded rectangles (exponent U(3, 8)) and irregular blobs (3 distinct harmonics of order
    2-5, amplitude U(0, 0.13), phase U(0, 2 pi)), width x height as given, rotated by U(-pi/2, pi/2)."""
    from medanomaly.anomalies.shapes import random_outline

    rng = np.random.default_rng(0)
    outlines = [random_outline(np.array([12.0, 20.0]), rng) for _ in range(300)]
    assert all(o.centre == (0.0, 0.0) and o.semi_axes == (10.0, 6.0) for o in outlines)
    rounded = [o for o in outlines if o.exponent != 2.0]
    irregular = [o for o in outlines if o.harmonics]
    assert not any(o.harmonics for o in rounded) and all(o.exponent == 2.0 for o in irregular)
    assert 80 < len(rounded) < 120 and 80 < len(irregular) < 120
    exponents = [o.exponent for o in rounded]
    assert 3.0 <= min(exponents) < 3.2 and 7.8 < max(exponents) <= 8.0
    orders = [sorted(order for *_, order in o.harmonics) for o in irregular]
    assert all(len(set(o)) == 3 for o in orders) and set(sum(orders, [])) == {2, 3, 4, 5}
    amplitudes = [amp for o in irregular for amp, *_ in o.harmonics]
    phases = [phase for o in irregular for _, phase, _ in o.harmonics]
    assert 0 <= min(amplitudes) < 0.01 and 0.12 < max(amplitudes) <= 0.13
    assert 0 <= min(phases) < 0.2 and 2 * np.pi - 0.2 < max(phases) <= 2 * np.pi
    angles = [o.angle for o in outlines]
    assert -np.pi / 2 <= min(angles) < -1.5 and 1.5 < max(angles) <= np.pi / 2


def test_side_lengths_follow_the_gamma_recipe_within_the_brain_bounds():
    """Each side is (0.03 + Gamma(2, 0.1)) x the image size, clipped to [6 %, 80 %] of the brain's extent
    (at least 3 pixels)."""
    from medanomaly.anomalies.shapes import sample_side_lengths

    brain = np.zeros((64, 64), dtype=bool)
    brain[10:30, 2:62] = True  # extent 20 x 60: bounds (3, 16) rows, (3.6, 48) columns
    rng = np.random.default_rng(0)
    draws = [sample_side_lengths(brain, rng) for _ in range(1500)]
    sides = np.array([s for s, _ in draws])
    assert all(np.array_equal(high, [16.0, 48.0]) for _, high in draws)
    assert np.allclose(sides.min(axis=0), [3.0, 3.6]) and np.allclose(sides.max(axis=0), [16.0, 48.0])
    assert np.mean(sides[:, 0] != sides[:, 1]) > 0.99  # two independent draws
    free = sample_side_lengths(np.ones((100, 100), bool), np.random.default_rng(1), (0.0, 1.0))[0]
    ratios = np.array([sample_side_lengths(np.ones((100, 100), bool), rng, (0.0, 1.0))[0] for _ in range(2000)])
    assert free.shape == (2,) and 0.225 < ratios.mean() / 100 < 0.235  # 0.03 + the mean 0.2 of Gamma(2, 0.1)


def test_brain_extent():
    from medanomaly.anomalies.shapes import brain_extent

    brain = np.zeros((20, 30), dtype=bool)
    assert np.array_equal(brain_extent(brain), [20.0, 30.0]) and brain_extent(brain).dtype == float
    brain[4, 7] = True
    assert np.array_equal(brain_extent(brain), [1.0, 1.0])
    brain[9, 17] = True
    assert np.array_equal(brain_extent(brain), [6.0, 11.0]) and brain_extent(brain).dtype == float


def test_sample_region_places_the_drawn_outline_on_a_jittered_brain_pixel():
    from dataclasses import replace

    from medanomaly.anomalies.shapes import random_outline, sample_side_lengths

    brain = np.zeros((48, 48), dtype=bool)
    brain[8:40, 10:36] = True
    for seed in range(8):
        region = sample_region(brain, np.random.default_rng(seed), min_inside=0.0, side_bounds=(0.2, 0.5))
        draws = np.random.default_rng(seed)
        sides, largest = sample_side_lengths(brain, draws, (0.2, 0.5))
        outline = random_outline(sides, draws)
        factor = min(1.0, float(np.min(largest / outline.footprint())))  # rotation may widen it: shrink back
        centre = np.argwhere(brain)[draws.integers(brain.sum())] + draws.uniform(-0.5, 0.5, size=2)
        assert region == replace(outline.scaled(factor), centre=(float(centre[0]), float(centre[1])))


def test_sample_region_halves_a_region_until_enough_of_it_lies_in_a_thin_brain():
    brain = np.zeros((48, 48), dtype=bool)
    brain[20:23, 4:44] = True
    for seed in range(4):
        region = sample_region(brain, np.random.default_rng(seed), min_inside=0.95)
        assert region is not None and inside_fraction(region, brain) >= 0.95
    single = np.zeros((20, 20), dtype=bool)
    single[10, 10] = True  # even one brain pixel gets a (tiny) region on it
    region = sample_region(single, np.random.default_rng(0))
    assert region is not None and region.mask(single.shape)[10, 10]
    assert sample_region(np.zeros((20, 20), dtype=bool), np.random.default_rng(0)) is None


def test_region_boundary_of_a_rotated_ellipse_with_a_harmonic():
    a, b, angle = 10.0, 6.0, 0.3
    plain = AnomalyRegion(centre=(0.0, 0.0), semi_axes=(a, b), angle=angle)
    wavy = AnomalyRegion(centre=(0.0, 0.0), semi_axes=(a, b), angle=angle, harmonics=((0.1, 0.5, 3),))
    theta = np.array([angle, angle + np.pi / 2, angle + 0.4, -1.0, 2.5])
    phi = theta - angle  # the direction in the ellipse's own frame
    ellipse = 1.0 / np.sqrt((np.cos(phi) / a) ** 2 + (np.sin(phi) / b) ** 2)
    assert np.allclose(plain.boundary(theta), ellipse) and np.allclose(ellipse[:2], [a, b])
    assert np.allclose(wavy.boundary(theta), ellipse * (1 + 0.1 * np.cos(3 * phi + 0.5)))


def test_inside_fraction_and_masks_at_the_image_corner():
    brain = np.zeros((40, 40), dtype=bool)
    brain[:, :20] = True
    region = AnomalyRegion(centre=(20.0, 19.5), semi_axes=(8.0, 8.0))
    assert 0.45 < inside_fraction(region, brain) < 0.55
    assert 0.97 < inside_fraction(region, np.ones((40, 40), dtype=bool)) < 1.03
    corner = AnomalyRegion(centre=(0.5, 0.5), semi_axes=(3.0, 3.0)).mask((40, 40))
    rows, cols = np.mgrid[:40, :40]
    assert np.array_equal(corner, np.hypot(rows - 0.5, cols - 0.5) < 3.0)


# --- Poisson blending: solvers, options and edge cases -------------------------------------------


def test_poisson_blend_errors_name_the_choices(brain_slice):
    target = np.zeros((20, 20))
    region = np.zeros((20, 20), dtype=bool)
    region[0:5, 3:9] = True
    with pytest.raises(
        ValueError,
        match=r"^Unknown Poisson solver 'fast': choose one of \('auto', 'dst', 'cg', "
        r"'box'\)\.$",
    ):
        poisson_blend(target, target, region, solver="fast")
    with pytest.raises(
        ValueError,
        match=r"^The DST Poisson solver needs a full axis-aligned rectangle whose "
        r"one-pixel ring lies in the image and the brain; use solver='auto', "
        r"'cg' or 'box' for this region\.$",
    ):
        poisson_blend(target, target, region, solver="dst")


@pytest.mark.parametrize("solver", ["auto", "cg", "box"])
def test_poisson_blend_is_the_same_for_float32_images_and_numeric_masks(solver):
    rng = np.random.default_rng(2)
    target, source = rng.random((2, 24, 30)).astype(np.float32)
    region = np.zeros((24, 30), dtype=bool)
    region[5:15, 8:20] = True  # a Dirichlet rectangle: "auto" takes the DST
    region[15, 10] = solver != "auto"
    brain = np.ones((24, 30), dtype=bool)
    brain[20:, :] = False
    reference = poisson_blend(target.astype(float), source.astype(float), region, brain, True, solver=solver)
    blended = poisson_blend(target, source, region.astype(np.float32), brain.astype(float), True, solver=solver)
    assert blended.dtype == np.float64 and np.array_equal(blended, reference)


def test_solver_cg_never_takes_the_direct_solve(monkeypatch):
    from medanomaly.anomalies import poisson

    def no_box(*args):
        raise AssertionError("solver='cg' took the DST box solve")

    rng = np.random.default_rng(0)
    target, source = rng.random((2, 20, 20))
    region = np.zeros((20, 20), dtype=bool)
    region[5:12, 6:14] = True
    assert dirichlet_rectangle(region, np.ones((20, 20), dtype=bool)) is not None
    monkeypatch.setattr(poisson, "_blend_box", no_box)
    poisson_blend(target, source, region, solver="cg")


def poisson_residual(blended, target, source, inside, brain, mixed) -> float:
    """The largest residual of (pull + #linked) f_p - sum_linked f_q = pull t_p + sum_linked v_pq over the
    region, written out pixel by pixel (links: 4-neighbours in the image and the brain)."""
    worst = 0.0
    for p in zip(*np.nonzero(inside)):
        lhs, rhs = 1e-4 * blended[p], 1e-4 * target[p]
        for dr, dc in ((0, 1), (0, -1), (1, 0), (-1, 0)):
            q = (p[0] + dr, p[1] + dc)
            if not (0 <= q[0] < target.shape[0] and 0 <= q[1] < target.shape[1] and brain[q]):
                continue
            g, t = source[p] - source[q], target[p] - target[q]
            lhs += blended[p] - blended[q]
            rhs += t if mixed and abs(t) > abs(g) else g
        worst = max(worst, abs(lhs - rhs))
    return worst


def test_conjugate_gradients_on_a_region_at_the_bottom_right_image_border():
    rng = np.random.default_rng(4)
    target, source = rng.random((2, 16, 21))
    region = AnomalyRegion(centre=(14.0, 18.0), semi_axes=(6.0, 5.0)).mask(target.shape)
    brain = np.ones(target.shape, dtype=bool)
    blended = poisson_blend(target, source, region, brain, True, tolerance=1e-12, solver="cg")
    assert region[-1, -1] and poisson_residual(blended, target, source, region, brain, True) < 1e-8


def test_conjugate_gradients_start_from_the_target(brain_slice):
    """Guided by the target's own gradients the blend is the target: CG starts there and stops at once."""
    target, brain, region = star_region_cut_by_the_brain(brain_slice)
    for mixed in (False, True):
        assert np.abs(poisson_blend(target, target, region, brain, mixed, solver="cg") - target).max() < 1e-12


def test_conjugate_gradients_warn_only_when_they_stop_early(monkeypatch, caplog):
    import logging

    from medanomaly.anomalies import poisson

    rng = np.random.default_rng(0)
    target, source = rng.random((2, 20, 20))
    region = AnomalyRegion(centre=(10.0, 10.0), semi_axes=(3.0, 3.0)).mask(target.shape)
    with caplog.at_level(logging.WARNING, logger=poisson.__name__):
        poisson_blend(target, source, region, solver="cg")
        assert not caplog.records
        real_cg = poisson.cg
        monkeypatch.setattr(poisson, "cg", lambda *args, **kwargs: (real_cg(*args, **kwargs)[0], 7))
        poisson_blend(target, source, region, solver="cg")
    assert [r.getMessage() for r in caplog.records] == [
        f"Poisson blending of {region.sum()} pixels stopped before converging (cg info 7)."
    ]


def test_the_preconditioner_inverts_the_laplacian_of_a_full_rectangle():
    from medanomaly.anomalies.poisson import bounding_box_preconditioner

    rows, cols = np.mgrid[5:12, 7:16]
    f = np.random.default_rng(0).random((7, 9))
    padded = np.pad(f, 1)  # f = 0 beyond the rectangle
    operator = (4 + 1e-4) * f - padded[:-2, 1:-1] - padded[2:, 1:-1] - padded[1:-1, :-2] - padded[1:-1, 2:]
    preconditioner = bounding_box_preconditioner(rows.ravel(), cols.ravel())
    assert np.allclose(preconditioner.matvec(operator.ravel()), f.ravel(), rtol=0, atol=1e-12)


def test_dirichlet_eigenvalues_are_those_of_the_laplacian():
    from medanomaly.anomalies.poisson import dirichlet_eigenvalues

    h, w = 3, 4
    laplacian_matrix = 4 * np.eye(h * w)
    for i in range(h * w):
        for j in range(h * w):
            (ri, ci), (rj, cj) = divmod(i, w), divmod(j, w)
            laplacian_matrix[i, j] -= abs(ri - rj) + abs(ci - cj) == 1
    assert np.allclose(np.sort(dirichlet_eigenvalues((h, w)).ravel()), np.linalg.eigvalsh(laplacian_matrix))


def test_dirichlet_rectangles_need_the_whole_ring_inside_image_and_brain():
    brain = np.ones((20, 30), dtype=bool)
    box = np.zeros((20, 30), dtype=bool)
    box[5:12, 8:19] = True
    assert dirichlet_rectangle(box, brain) == (slice(5, 12), slice(8, 19))
    for rows, cols in (
        (slice(0, 6), slice(8, 19)),
        (slice(14, 20), slice(8, 19)),
        (slice(5, 12), slice(0, 6)),
        (slice(5, 12), slice(22, 30)),
    ):
        touching = np.zeros((20, 30), dtype=bool)
        touching[rows, cols] = True  # one side on the image border
        assert dirichlet_rectangle(touching, brain) is None
    for hole in ((4, 18), (12, 18), (11, 7), (11, 19)):  # the far end of each side of the ring
        holed = brain.copy()
        holed[hole] = False
        assert dirichlet_rectangle(box, holed) is None, hole
    corner = brain.copy()
    corner[4, 7] = corner[12, 19] = False  # corners are no edges of the system
    assert dirichlet_rectangle(box, corner) is not None


def test_box_solve_at_the_bottom_border_of_a_wide_image():
    target, source = np.random.default_rng(0).random((2, 20, 30))
    region = np.zeros((20, 30), dtype=bool)
    region[19, 3:9] = True  # no ring row below it
    assert np.array_equal(poisson_blend(target, source, region, solver="box"), target)
    region[18, 3:9] = True  # row 18 has its ring in the image: blended, row 19 left
    blended = poisson_blend(target, source, region, solver="box")
    assert np.array_equal(blended[19], target[19]) and not np.allclose(blended[18, 3:9], target[18, 3:9])


def test_ring_window_is_the_bounding_box_grown_by_one_pixel():
    from medanomaly.anomalies.poisson import ring_window

    region = np.zeros((30, 40), dtype=bool)
    region[10:15, 0:6] = True
    assert ring_window(region) == (slice(9, 16), slice(0, 7))


def test_mixed_guidance_keeps_the_source_on_a_tie():
    from medanomaly.anomalies.poisson import _guidance

    source, target = np.array([0.2, -0.1, 0.3]), np.array([-0.2, 0.4, 0.1])
    assert np.array_equal(_guidance(source, target, True), [0.2, 0.4, 0.3])
    assert _guidance(source, target, False) is source


def test_warp_source_by_default_only_translates():
    source = np.random.default_rng(0).random((30, 40))
    warped = warp_source(source, np.array([10.0, 12.0]), np.array([14.0, 9.0]), (30, 40))
    expected = np.zeros((30, 40))
    expected[4:, :37] = source[:26, 3:]  # target (r, c) reads source (r - 4, c + 3); 0 beyond it
    assert np.allclose(warped, expected, rtol=0, atol=1e-12)


def test_warp_source_rotates_and_scales_pixel_by_pixel():
    source = np.random.default_rng(1).random((30, 40)).astype(np.float32)
    centre, target_centre, rotation, scale = np.array([14.0, 21.5]), np.array([20.0, 11.0]), 0.4, 1.3
    warped = warp_source(source, centre, target_centre, (36, 24), rotation=rotation, scale=scale)
    drow, dcol = np.mgrid[:36, :24] - target_centre[:, None, None]
    rows = centre[0] + scale * (np.cos(rotation) * drow - np.sin(rotation) * dcol)
    cols = centre[1] + scale * (np.sin(rotation) * drow + np.cos(rotation) * dcol)
    inside = (rows >= 0) & (rows <= 29) & (cols >= 0) & (cols <= 39)
    expected = np.where(inside, bilinear(source.astype(float), rows, cols), 0.0)
    assert (~inside).sum() > 50 and np.allclose(warped, expected, rtol=0, atol=1e-12)


# --- SyntheticAnomaly and the MONAI wrappers: configuration, sources, masks -------------------------


def test_synthetic_anomaly_configuration_errors_are_spelled_out():
    with pytest.raises(
        ValueError,
        match=r"^The task 'poisson_other' blends patches from another source: pass "
        r"other_source \(images or a callable rng -> image\), or drop the task\.$",
    ):
        SyntheticAnomaly(tasks=["poisson_other"])
    for clean_fraction, max_anomalies in ((1.5, 4), (-0.1, 4), (0.2, 0)):
        with pytest.raises(
            ValueError,
            match=rf"^clean_fraction must lie in \[0, 1\] \(got {clean_fraction}\) and "
            rf"max_anomalies be at least 1 \(got {max_anomalies}\)\.$",
        ):
            SyntheticAnomaly(tasks=["sink"], clean_fraction=clean_fraction, max_anomalies=max_anomalies)
    assert SyntheticAnomaly(tasks=["sink"], clean_fraction=1.0, max_anomalies=1).max_anomalies == 1
    with pytest.raises(ValueError, match=r"^The list of source images is empty: give at least one image, or None\.$"):
        SyntheticAnomaly(tasks=["sink"], same_source=[])


def test_defaults_of_the_wrappers_are_those_of_synthetic_anomaly():
    anomaly = SyntheticAnomaly(other_source=[np.zeros((8, 8))])
    transform = RandSyntheticAnomalyd(other_source=[np.zeros((8, 8))])
    for configured in (anomaly, transform.anomaly):
        assert configured.tasks == TASK_NAMES and configured.clean_fraction == 0.2
        assert configured.max_anomalies == 4 and configured.same_source.seen.maxlen == 16
    assert RandFPId().partners.seen.maxlen == 16
    assert (transform.image_key, transform.mask_key, transform.corrupted_key, transform.anomaly_mask_key) == (
        "image",
        "mask",
        "corrupted",
        "anomaly_mask",
    )
    fpi_transform = RandFPId()
    assert (fpi_transform.image_key, fpi_transform.mask_key, fpi_transform.alpha_key) == ("image", "mask", "alpha")


def test_rand_synthetic_anomalyd_passes_its_configuration_on():
    same = [np.ones((8, 8))]
    transform = RandSyntheticAnomalyd(
        tasks=["sink", "poisson_same"],
        clean_fraction=0.5,
        max_anomalies=2,
        same_source=same,
        memory=3,
        task_options={"sink": {"push": 1.0}},
    )
    anomaly = transform.anomaly
    assert anomaly.tasks == ("sink", "poisson_same") and anomaly.clean_fraction == 0.5 and anomaly.max_anomalies == 2
    assert anomaly.same_source.provider(np.random.default_rng(0)) is same[0]
    assert anomaly.task_options == {"sink": {"push": 1.0}}
    assert RandSyntheticAnomalyd(tasks=["sink"], memory=3).anomaly.same_source.seen.maxlen == 3
    assert RandFPId(memory=3).partners.seen.maxlen == 3


def test_tasks_get_their_sources_and_options(monkeypatch):
    """poisson_other blends from other_source, poisson_same from same_source or (without one) from the slices
    seen before, the very first slice from itself; the other tasks get no source but their options."""
    seen = []

    def spy(name):
        def task(image, brain, region, rng, *, source=None, **options):
            seen.append((name, source, options))
            return image

        return task

    for name in TASK_NAMES:
        monkeypatch.setitem(TASKS, name, spy(name))
    slices = [small_slice(32, seed) for seed in range(3)]
    other = np.full((32, 32), 0.7)
    anomaly = SyntheticAnomaly(
        tasks=["poisson_other"],
        clean_fraction=0.0,
        seed=0,
        other_source=[other],
        task_options={"poisson_other": {"solver": "cg"}},
    )
    anomaly(*slices[0])
    assert seen[-1][0] == "poisson_other" and np.array_equal(seen[-1][1][0], other)
    assert np.array_equal(seen[-1][1][1], other > 0) and seen[-1][2] == {"solver": "cg"}

    anomaly = SyntheticAnomaly(tasks=["poisson_same"], clean_fraction=0.0, seed=0, memory=1)
    for k, (image, brain) in enumerate(slices):
        seen.clear()
        anomaly(image, brain)
        source_image, source_brain = slices[max(k - 1, 0)]  # memory 1: the slice just before, else itself
        assert seen and all(
            np.array_equal(s[0], source_image) and np.array_equal(s[1], source_brain) for _, s, _ in seen
        )
    same = [(np.full((32, 32), 0.4), slices[2][1])]
    seen.clear()
    SyntheticAnomaly(tasks=["poisson_same"], clean_fraction=0.0, seed=0, same_source=same)(*slices[0])
    assert np.array_equal(seen[-1][1][0], same[0][0]) and np.array_equal(seen[-1][1][1], same[0][1])

    seen.clear()
    SyntheticAnomaly(
        tasks=["sink", "intensity"], clean_fraction=0.0, seed=0, task_options={"sink": {"push": 1.5}}, same_source=same
    )(*slices[0])
    assert seen and all(
        source is None and options == ({"push": 1.5} if name == "sink" else {}) for name, source, options in seen
    )


def test_synthetic_anomaly_clips_a_task_overshoot_into_the_unit_range(monkeypatch):
    image, brain = small_slice(32)
    for overshoot, expected in ((5.0, 1.0), (-5.0, 0.0)):
        monkeypatch.setitem(TASKS, "sink", lambda image, *args, value=overshoot, **kw: image + value)
        result = SyntheticAnomaly(tasks=["sink"], clean_fraction=0.0, seed=0).sample(image, brain)
        assert np.array_equal(result.image, np.where(brain, expected, 0.0).astype(np.float32))


def test_a_region_that_cannot_be_placed_is_skipped_not_the_rest(monkeypatch):
    from medanomaly.anomalies import synthetic

    image, brain = small_slice(32)
    calls = []

    def first_fails(brain, rng):
        calls.append(1)
        return None if len(calls) == 1 else sample_region(brain, rng)

    monkeypatch.setattr(synthetic, "sample_region", first_fails)
    anomaly = SyntheticAnomaly(tasks=["sink"], clean_fraction=0.0, max_anomalies=4, seed=3)
    result = anomaly.sample(image, brain)
    assert len(calls) >= 2 and len(result.anomalies) == len(calls) - 1


def test_the_given_brain_mask_is_used_not_the_non_zero_pixels():
    """Slices whose background is not 0: the brain mask alone says where anomalies may go."""
    image, brain = small_slice(48)
    image = image + np.float32(0.2)  # non-zero everywhere
    anomaly = SyntheticAnomaly(tasks=["intensity"], clean_fraction=0.0, seed=0)
    for corrupted, mask in (anomaly(image, brain), anomaly(image[None], brain[None] * 1.0)):
        assert np.all(corrupted.reshape(48, 48)[~brain] == 0) and mask.any() and not mask.reshape(48, 48)[~brain].any()
    item = {"image": torch.from_numpy(image[None]), "mask": torch.from_numpy(brain[None] * 1.0)}
    for transform in (RandSyntheticAnomalyd(tasks=["intensity"], clean_fraction=0.0), RandFPId()):
        transform.set_random_state(0)
        out = transform(item)
        assert torch.all(out["corrupted"][0][~brain] == 0) and not out["anomaly_mask"][0][~brain].any()
    blended, mask, _ = foreign_patch_interpolation(
        image, np.ones_like(image), brain, rng=1, half_width_range=(0.4, 0.4)
    )
    assert np.all(blended[~brain] == 0) and not mask[~brain].any() and mask.any()


def test_slices_with_at_least_sixteen_brain_pixels_get_anomalies():
    image = np.zeros((32, 32), dtype=np.float32)
    image[10:14, 10:14] = 0.5  # 16 pixels
    anomaly = SyntheticAnomaly(tasks=["intensity"], clean_fraction=0.0, seed=0)
    assert anomaly.sample(image).anomalies
    image[13, 13] = 0.0  # 15 pixels
    assert not anomaly.sample(image).anomalies


def test_transforms_draw_one_generator_seed_per_call_from_their_random_state():
    image, brain = small_slice(48)
    item = {"image": torch.from_numpy(image[None]), "mask": torch.from_numpy(brain[None] * 1.0)}
    seed = np.random.RandomState(5).randint(0, 2**31 - 1, size=2).tolist()

    transform = RandSyntheticAnomalyd(tasks=["sink", "intensity"], clean_fraction=0.0)
    transform.set_random_state(5)
    expected, _ = SyntheticAnomaly(tasks=["sink", "intensity"], clean_fraction=0.0)(
        image[None], brain[None] * 1.0, rng=np.random.default_rng(seed)
    )
    assert np.array_equal(transform(item)["corrupted"].numpy(), expected)

    transform = RandFPId()
    transform.set_random_state(5)
    mirrored = (image * brain)[:, ::-1]  # the first slice's partner
    expected, _, alpha = foreign_patch_interpolation(image * brain, mirrored, brain, rng=np.random.default_rng(seed))
    out = transform(item)
    assert np.array_equal(out["corrupted"][0].numpy(), expected) and out["alpha"] == alpha


def test_rand_fpid_first_partner_is_the_mirrored_brain_only():
    image, brain = small_slice(48)
    brain = brain & (np.arange(48) > 14)[None, :]  # not left-right symmetric
    image = image + np.float32(0.2)
    item = {"image": torch.from_numpy(image[None]), "mask": torch.from_numpy(brain[None] * 1.0)}
    for seed in range(3):
        transform = RandFPId()
        transform.set_random_state(seed)
        out = transform(item)
        corrupted, square, alpha = out["corrupted"][0].numpy(), out["anomaly_mask"][0].numpy() > 0, out["alpha"]
        partner = (image * brain)[:, ::-1]
        assert np.all(np.isfinite(corrupted)) and np.all(corrupted[~brain] == 0)
        expected = (1 - alpha) * image * brain + alpha * partner
        assert np.allclose(corrupted[square], expected[square], atol=1e-6)


def test_rand_fpid_with_a_partner_beyond_the_brain_stays_in_the_brain():
    image, brain = small_slice(48)
    transform = RandFPId(source=[np.ones((48, 48))])
    transform.set_random_state(0)
    item = {"image": torch.from_numpy(image[None]), "mask": torch.from_numpy(brain[None] * 1.0)}
    first = transform(item)
    assert torch.all(first["corrupted"][0][~brain] == 0) and not first["anomaly_mask"][0][~brain].any()
    again = RandFPId(source=[np.ones((48, 48))])
    again.set_random_state(0)
    assert torch.equal(again(item)["corrupted"], first["corrupted"])  # seeded: the same output


# --- FPI and the slice helpers ------------------------------------------------------------------


def test_fpi_options_alpha_and_seeds():
    image, other = small_slice(48)[0], small_slice(48, seed=1)[0]
    first, again = (foreign_patch_interpolation(image, other, rng=11) for _ in range(2))
    assert np.array_equal(first[0], again[0]) and first[2] == again[2]
    blended, mask, alpha = foreign_patch_interpolation(image, other, rng=0, alpha=0.3, half_width_range=(0.1, 0.1))
    assert alpha == 0.3 and np.count_nonzero(mask) == (2 * round(0.1 * 48)) ** 2
    assert np.allclose(blended[mask > 0], (0.7 * image + 0.3 * other)[mask > 0], atol=1e-6)
    alphas = [foreign_patch_interpolation(image, other, rng=seed)[2] for seed in range(60)]
    assert min(alphas) < 0.05 and max(alphas) > 0.95 and 0.4 < np.mean(alphas) < 0.6  # U(0, 1)


def test_fpi_square_edges():
    from medanomaly.anomalies.fpi import fpi_square

    rng = np.random.default_rng(0)
    assert fpi_square((40, 40), rng, centre_range=(0.0, 0.0), half_width_range=(0.0, 0.0)) == (
        slice(0, 1),
        slice(0, 1),
    )  # at least one pixel either side of the centre, clipped at the image's edge
    centres = np.array(
        [
            [(s.start + s.stop) / 2 for s in fpi_square((100, 100), rng, half_width_range=(0.05, 0.05))]
            for _ in range(200)
        ]
    )
    assert 20 <= centres.min() < 23 and 77 < centres.max() <= 80  # centres in the central 60 %


def test_slice_helpers_name_the_offending_input():
    from medanomaly.anomalies.sources import as_slice, brain_of

    layout = (
        r"has shape \(2, 8, 8\): synthetic anomalies work on one 2D slice, \(H, W\) or \(1, H, W\); split "
        r"volumes and batches into slices first\.$"
    )
    with pytest.raises(ValueError, match="^The image " + layout):
        as_slice(np.zeros((2, 8, 8)))
    with pytest.raises(ValueError, match="^The other image " + layout):
        foreign_patch_interpolation(np.zeros((8, 8)), np.zeros((2, 8, 8)))
    with pytest.raises(ValueError, match="^The brain mask " + layout):
        brain_of(np.zeros((8, 8)), np.zeros((2, 8, 8)))
    with pytest.raises(ValueError, match="^The source image " + layout):
        SourcePool([np.zeros((2, 8, 8))]).draw(np.random.default_rng(0))
    with pytest.raises(
        ValueError,
        match=r"^FPI blends the same location of two slices: the other slice has shape "
        r"\(8, 9\), the image \(8, 8\)\. Resize them to one grid first\.$",
    ):
        foreign_patch_interpolation(np.zeros((8, 8)), np.zeros((8, 9)))
    with pytest.raises(
        ValueError,
        match=r"^The brain mask has shape \(8, 9\) but the image \(8, 8\): give the mask "
        r"of this very slice\.$",
    ):
        brain_of(np.zeros((8, 8)), np.zeros((8, 9)))


def test_slice_helpers_make_float64_slices_and_boolean_brains():
    from medanomaly.anomalies.sources import as_slice, brain_of

    image = np.array([[0.0, 0.5], [1.0, 2.0]], dtype=np.float32)
    assert as_slice(image).dtype == np.float64 and as_slice(image[None]).shape == (2, 2)
    assert np.array_equal(brain_of(image), [[False, True], [True, True]])
    assert np.array_equal(brain_of(image, np.array([[0.0, 0.4], [0.6, 1.0]])), [[False, False], [True, True]])


def test_source_pools_take_callables_and_brains_from_providers():
    image = np.zeros((8, 8))
    image[2:6, 2:6] = 0.5
    brain = np.zeros((8, 8), dtype=bool)
    brain[3:5, 3:5] = True
    drawn_image, drawn_brain = SourcePool(lambda rng: (image, brain)).draw(np.random.default_rng(0))
    assert np.array_equal(drawn_image, image) and np.array_equal(drawn_brain, brain)
    assert np.array_equal(SourcePool(lambda rng: image).draw(np.random.default_rng(0))[1], image > 0)
    assert SourcePool().seen.maxlen == 16 and SourcePool(memory=0).seen.maxlen == SourcePool(memory=1).seen.maxlen == 1


def test_transforms_load_on_first_use_and_unknown_names_are_errors():
    import medanomaly.anomalies as anomalies
    from medanomaly.anomalies import transforms

    assert anomalies.RandFPId is transforms.RandFPId
    assert anomalies.RandSyntheticAnomalyd is transforms.RandSyntheticAnomalyd
    with pytest.raises(AttributeError, match=r"^module 'medanomaly\.anomalies' has no attribute 'Cutpaste'$"):
        anomalies.Cutpaste  # noqa: B018


def test_task_folds_range_is_spelled_out():
    assert task_folds(n_folds=1) == [(TASK_NAMES[:3], TASK_NAMES[3:])]
    with pytest.raises(
        ValueError,
        match=r"^n_folds=0 is not possible with 3 training tasks out of 5: choose 1 to "
        r"10 folds\.$",
    ):
        task_folds(n_folds=0)
