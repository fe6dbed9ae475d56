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
    assert np.array_equal(poisson_blend(target, windowed, region, brain, True, solver=solver),
                          poisson_blend(target, full, region, brain, True, solver=solver))
    edge = np.zeros(target.shape, dtype=bool)
    edge[0:3, 5:9] = True  # at the image border the window stops at the image
    assert ring_window(edge) == (slice(0, 4), slice(4, 10)) and ring_window(edge & False) is None


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
    box[rows.min():rows.max() + 1, cols.min():cols.max() + 1] = True
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
    assert np.array_equal(poisson_blend(target, source, rectangle, brain, True, solver="box"),
                          poisson_blend(target, source, rectangle, brain, True, solver="dst"))
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
    there_and_back = source_deformation(sink_deformation(image, brain, region, rng, push=2.0), brain, region, rng,
                                        push=2.0)
    assert np.abs(there_and_back - image).mean() < 0.1 * np.abs(sink_deformation(image, brain, region, rng,
                                                                                 push=2.0) - image).mean()


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
        steps = np.concatenate([np.abs(np.diff(difference, axis=1))[pairs[0]],
                                np.abs(np.diff(difference, axis=0))[pairs[1]]])
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
            (image * brain)[:, ::-1]]
        square, alpha = item["anomaly_mask"][0].numpy() > 0, item["alpha"]
        matches = [np.allclose(item["corrupted"][0].numpy()[square],
                               ((1 - alpha) * image * brain + alpha * partner)[square], atol=1e-5)
                   for partner in candidates]
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
