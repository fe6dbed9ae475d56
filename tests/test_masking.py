"""medanomaly.masking (PHANES masks) against hand cases."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import ndimage

from medanomaly import masking


def test_threshold_flags_at_most_the_target_fraction_of_healthy_pixels():
    values = torch.from_numpy(np.random.default_rng(0).permutation(100).astype(np.float32))  # 0..99
    # lowest threshold with at most 5 / 2 / 1 values strictly above it
    assert masking.threshold_at_fpr(values, 0.05) == 94
    assert masking.threshold_at_fpr(values, 0.02) == 97
    assert masking.threshold_at_fpr(values, 0.01) == 98
    assert masking.threshold_at_fpr(values, 0.0) == 99
    for fpr in (0.05, 0.02, 0.01):
        t = masking.threshold_at_fpr(values, fpr)
        assert int((values > t).sum()) == round(fpr * 100)
        assert int((values > t - 1).sum()) > fpr * 100  # one lower would flag too many
    assert masking.thresholds_at_fprs(values) == {"0.05": 94.0, "0.02": 97.0, "0.01": 98.0}
    # ties: never more than the target, even if that means fewer
    tied = torch.tensor([0.0] * 90 + [1.0] * 10)
    t = masking.threshold_at_fpr(tied, 0.05)
    assert t == 1.0 and int((tied > t).sum()) == 0
    with pytest.raises(ValueError, match="No healthy values"):
        masking.threshold_at_fpr(torch.zeros(0), 0.05)


def test_residual_is_normalised_by_its_own_95th_percentile_and_clipped():
    residual = torch.arange(100, dtype=torch.float32).view(1, 1, 10, 10)
    residual = torch.cat([residual, 2 * residual])  # a second image, scaled: same normalised result
    out = masking.normalise_per_image(residual, 95)
    p95 = np.percentile(np.arange(100), 95)  # 94.05
    np.testing.assert_allclose(out[0, 0].flatten().numpy(), np.minimum(np.arange(100) / p95, 1), rtol=1e-5)
    torch.testing.assert_close(out[0], out[1])
    assert int((out[0] == 1).sum()) == 5  # 95..99 clipped


def test_clahe_residual_of_identical_images_is_zero_and_in_unit_range():
    rng = np.random.default_rng(0)
    x = torch.from_numpy(rng.random((2, 1, 32, 32)).astype(np.float32))
    assert torch.all(masking.clahe_residual(x, x) == 0)
    y = (x + 0.2 * torch.from_numpy(rng.standard_normal((2, 1, 32, 32)).astype(np.float32))).clamp(0, 1)
    r = masking.clahe_residual(x, y)
    assert r.shape == x.shape and float(r.min()) >= 0 and float(r.max()) == 1
    assert 0.03 < float((r == 1).float().mean()) <= 0.06  # what lies above the 95th percentile


def test_mask_map_is_the_residual_times_the_smoothed_perceptual_map():
    x = torch.rand(2, 1, 24, 24)
    y = torch.rand(2, 1, 24, 24)

    calls = []

    def perceptual(a, b):  # a spatial distance with structure: 2a - b, recorded to check the argument order
        calls.append((a, b))
        return 2 * a - b

    expected = masking.clahe_residual(x, y) * torch.from_numpy(
        ndimage.gaussian_filter((2 * y - x).numpy(), (0, 0, 3.0, 3.0), mode="mirror", truncate=4.0))
    torch.testing.assert_close(masking.mask_map(x, y, perceptual, saliency_sigma=3.0), expected, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(calls[0][0], y)  # (reconstruction, scan)
    torch.testing.assert_close(calls[0][1], x)
    torch.testing.assert_close(masking.mask_map(x, y, None), masking.clahe_residual(x, y))


def test_gaussian_smoothing_matches_scipy():
    image = np.random.default_rng(1).random((20, 24)).astype(np.float32)
    ours = masking.gaussian_smooth(torch.from_numpy(image)[None, None], 2.0)[0, 0].numpy()
    np.testing.assert_allclose(ours, ndimage.gaussian_filter(image, 2.0, mode="mirror", truncate=4.0), atol=1e-5)


def test_dilation_grows_an_edge_by_one_pixel_and_keeps_isolated_pixels():
    mask = torch.zeros(1, 1, 20, 20)
    mask[..., 10:] = 1  # half plane
    dilated = masking.dilate_mask(mask, sigma=1.2, level=0.1)
    # blurred edge: column 9 gets (1 - k0) / 2 = 0.334 > 0.1, column 8 gets 0.099 < 0.1
    assert torch.all(dilated[..., 9:] == 1) and torch.all(dilated[..., :9] == 0)
    point = torch.zeros(1, 1, 9, 9)
    point[..., 4, 4] = 1  # k0^2 = 0.11 > 0.1 at the centre, 0.078 next to it
    torch.testing.assert_close(masking.dilate_mask(point), point)


def test_binary_mask_thresholds_dilates_and_stays_in_the_brain():
    anomaly = torch.zeros(2, 1, 16, 16)
    anomaly[0, 0, 6:10, 6:10] = 0.8
    anomaly[1, 0, 0:4, 0:4] = 0.8
    brain = torch.zeros_like(anomaly)
    brain[..., 2:14, 2:14] = 1
    m = masking.binary_anomaly_mask(anomaly, 0.5, brain)
    assert set(m.unique().tolist()) <= {0.0, 1.0}
    assert torch.all(m[0, 0, 5:11, 5:11] == 1) and float(m[0].sum()) == 36  # 4x4 grown by one pixel
    assert torch.all(m[brain == 0] == 0)
    assert torch.all(masking.binary_anomaly_mask(anomaly, 0.9) == 0)


def test_random_ellipses_are_seeded_unions_of_ellipses():
    a = masking.random_ellipse_masks(4, (64, 64), n_ellipses=10, rng=0)
    b = masking.random_ellipse_masks(4, (64, 64), n_ellipses=10, rng=0)
    assert a.shape == (4, 1, 64, 64) and set(a.unique().tolist()) == {0.0, 1.0}
    torch.testing.assert_close(a, b)
    assert not torch.equal(a[0], a[1])
    # one disc of radius 6.4: area at most pi r^2 (+ pixelisation), diameter at most 2r + 1
    for seed in range(5):
        one = masking.random_ellipse_masks(1, (64, 64), n_ellipses=1, radius_range=(0.1, 0.1), rng=seed)[0, 0]
        assert 0 < float(one.sum()) <= np.pi * 6.4 ** 2 + 10
        ys, xs = torch.nonzero(one, as_tuple=True)
        assert int(ys.max() - ys.min()) <= 13 and int(xs.max() - xs.min()) <= 13
    many = masking.random_ellipse_masks(1, (64, 64), n_ellipses=10, radius_range=(0.1, 0.1), rng=0)
    assert float(many.sum()) > float(masking.random_ellipse_masks(1, (64, 64), 1, (0.1, 0.1), rng=0).sum())


def test_composition_leaves_unmasked_pixels_untouched():
    x = torch.rand(3, 1, 16, 16)
    fill = torch.rand(3, 1, 16, 16)
    m = (torch.rand(3, 1, 16, 16) > 0.7).float()
    out = masking.compose(x, fill, m)
    assert torch.equal(out[m == 0], x[m == 0])
    assert torch.equal(out[m == 1], fill[m == 1])


def test_bad_shapes_and_settings_raise_errors_that_name_them():
    flat = torch.zeros(2, 8, 8)
    for call, name in ((lambda: masking.gaussian_smooth(flat, 1.0), "x"), (lambda: masking.clahe(flat), "x"),
                       (lambda: masking.normalise_per_image(flat), "residual"),
                       (lambda: masking.binary_anomaly_mask(flat, 0.5), "anomaly_map")):
        with pytest.raises(ValueError, match=rf"^{name} must be a \(B, C, H, W\) batch of slices, got shape "
                                             r"\(2, 8, 8\)\.$"):
            call()
    with pytest.raises(ValueError,
                       match=r"^x and the reconstruction differ in shape: \(1, 1, 8, 8\) vs \(1, 1, 8, 9\)\.$"):
        masking.clahe_residual(torch.zeros(1, 1, 8, 8), torch.zeros(1, 1, 8, 9))
    with pytest.raises(ValueError, match=r"^No healthy values to calibrate a threshold on \(empty brain masks\?\)\.$"):
        masking.threshold_at_fpr(torch.zeros(0), 0.01)
    for fpr in (1.0, -0.1):
        with pytest.raises(ValueError, match=rf"^The target false-positive fraction must be in \[0, 1\), got {fpr}\.$"):
            masking.threshold_at_fpr(torch.arange(10.0), fpr)


def test_random_ellipses_equal_a_pixel_by_pixel_drawing_of_the_same_random_ellipses():
    """The same random numbers drawn in the documented order (centres, semi-axes, angles), then every
    pixel centre (i + 0.5, j + 0.5) tested against every ellipse; a non-square image and unequal axes."""
    h, w, batch, count, radii = 24, 40, 2, 3, (0.05, 0.4)
    masks = masking.random_ellipse_masks(batch, (h, w), count, radii, rng=7)
    rng = np.random.default_rng(7)
    centres = rng.uniform([0, 0], [h, w], size=(batch, count, 2))
    axes = rng.uniform(radii[0] * h, radii[1] * h, size=(batch, count, 2))
    angles = rng.uniform(0, np.pi, size=(batch, count))
    expected = np.zeros((batch, 1, h, w))
    for b in range(batch):
        for k in range(count):
            c, s = np.cos(angles[b, k]), np.sin(angles[b, k])
            for i in range(h):
                for j in range(w):
                    dy, dx = i + 0.5 - centres[b, k, 0], j + 0.5 - centres[b, k, 1]
                    u, v = c * dy + s * dx, -s * dy + c * dx  # along the first and the second semi-axis
                    if (u / axes[b, k, 0]) ** 2 + (v / axes[b, k, 1]) ** 2 <= 1:
                        expected[b, 0, i, j] = 1.0
    assert masks.dtype == torch.float32 and masks.shape == (batch, 1, h, w)
    assert 0.05 < expected.mean() < 0.95
    assert (masks.numpy() != expected).sum() <= 2  # float32 against float64 on an ellipse's edge
    generator = np.random.default_rng(7)
    assert torch.equal(masking.random_ellipse_masks(batch, (h, w), count, radii, rng=generator), masks)


def test_thresholded_masks_flag_values_above_the_threshold_only_and_grow_by_the_soft_dilation():
    anomaly_map = torch.zeros(1, 1, 9, 9)
    anomaly_map[0, 0, 4, 4] = 0.5
    assert not masking.binary_anomaly_mask(anomaly_map, 0.5, sigma=1.2, level=0.1).any()  # > the threshold, not >=
    mask = masking.binary_anomaly_mask(anomaly_map, 0.4, sigma=1.2, level=0.05)
    impulse = (anomaly_map[0, 0].numpy() > 0.4).astype(np.float64)
    blurred = torch.as_tensor(ndimage.gaussian_filter(impulse, 1.2, mode="reflect", truncate=4.0).astype(np.float32))
    # a blurred single pixel exceeds 0.05 exactly on its 3 x 3 neighbourhood at sigma 1.2
    assert torch.equal(mask[0, 0], (blurred > 0.05).float()) and int(mask.sum()) == 9
    corner = float(blurred[3, 3])  # a value the blur takes: "> level" leaves the four corners out
    assert int(masking.dilate_mask((anomaly_map > 0.4).float(), 1.2, corner).sum()) == 5


def test_clahe_clips_its_input_and_passes_its_settings_to_skimage():
    from skimage import exposure

    rng = np.random.default_rng(0)
    x = torch.as_tensor(rng.uniform(-0.5, 1.5, (1, 1, 32, 32)), dtype=torch.float32)
    clipped = x.clamp(0, 1)[0, 0].double().numpy()
    expected = exposure.equalize_adapthist(clipped, kernel_size=8, clip_limit=0.05, nbins=64)
    out = masking.clahe(x, clip_limit=0.05, kernel_size=8, nbins=64)
    assert out.dtype == torch.float32
    np.testing.assert_allclose(out[0, 0].numpy(), expected, atol=1e-6)
    reconstruction = torch.as_tensor(rng.uniform(0, 1, (1, 1, 32, 32)), dtype=torch.float32)
    residual = (masking.clahe(x, 0.05) - masking.clahe(reconstruction, 0.05)).abs()
    torch.testing.assert_close(masking.clahe_residual(x, reconstruction, 90, clip_limit=0.05, eps=0.5),
                               masking.normalise_per_image(residual, 90, eps=0.5))
    torch.testing.assert_close(masking.mask_map(x, reconstruction, percentile=90, clip_limit=0.05),
                               masking.clahe_residual(x, reconstruction, 90, clip_limit=0.05))


def test_per_image_normalisation_handles_a_zero_percentile_and_negative_values():
    residual = torch.zeros(1, 1, 10, 10)
    residual[0, 0, 0, 0], residual[0, 0, 0, 1] = 0.3, -0.2  # the 95th percentile is 0
    out = masking.normalise_per_image(residual, 95, eps=1e-8)
    assert out[0, 0, 0, 0] == 1.0 and out[0, 0, 0, 1] == 0.0 and out.sum() == 1.0


def test_saliency_reads_clipped_images():
    seen = []

    def perceptual(a, b):
        seen.extend([a, b])
        return (a - b).abs()

    x = torch.linspace(-1, 2, 64).view(1, 1, 8, 8)
    masking.smoothed_saliency(perceptual, x.flip(-1), x, sigma=0.0)
    assert all(float(t.min()) == 0.0 and float(t.max()) == 1.0 for t in seen)


def test_gaussian_smoothing_edges_and_dtypes():
    x = torch.rand(1, 1, 16, 16, dtype=torch.float64)
    assert masking.gaussian_smooth(x, 0.0) is x  # sigma 0: unchanged
    expected = ndimage.gaussian_filter(x[0, 0].numpy(), 1.0, mode="reflect", truncate=4.0)
    smoothed = masking.gaussian_smooth(x, 1.0)
    assert smoothed.dtype == torch.float64
    inner = (slice(4, -4), slice(4, -4))  # away from the border, where the padding conventions differ
    np.testing.assert_allclose(smoothed[0, 0].numpy()[inner], expected[inner], atol=1e-12)
    counts = torch.randint(0, 3, (1, 1, 16, 16))
    np.testing.assert_allclose(masking.gaussian_smooth(counts, 1.0)[0, 0].numpy()[inner],
                               ndimage.gaussian_filter(counts[0, 0].double().numpy(), 1.0)[inner], atol=1e-5)


def test_soft_dilation_keeps_only_values_above_the_level():
    impulse = torch.zeros(1, 1, 9, 9)
    impulse[0, 0, 4, 4] = 1.0
    corner = float(masking.gaussian_smooth(impulse, 1.2)[0, 0, 3, 3])  # the blur's value on the 3 x 3 corners
    assert int(masking.dilate_mask(impulse, 1.2, corner).sum()) == 5


def test_compose_takes_boolean_masks():
    x, inpainted = torch.zeros(1, 1, 2, 2), torch.ones(1, 1, 2, 2)
    mask = torch.tensor([[[[True, False], [False, True]]]])
    torch.testing.assert_close(masking.compose(x, inpainted, mask), mask.float())


def test_clip_limit_reaches_both_clahe_calls_and_the_defaults_are_the_papers():
    g = torch.Generator().manual_seed(0)
    # low-contrast 32 x 32 slices: 4 x 4 windows, so clip limits 0.01 and 0.5 clip differently
    x, y = 0.5 + 0.1 * torch.rand(2, 1, 1, 32, 32, generator=g)
    assert not torch.allclose(masking.clahe(x, 0.5), masking.clahe(x, 0.01))
    torch.testing.assert_close(masking.clahe(x), masking.clahe(x, clip_limit=0.01))
    expected = masking.normalise_per_image((masking.clahe(x, 0.5) - masking.clahe(y, 0.5)).abs(), 95)
    torch.testing.assert_close(masking.clahe_residual(x, y, clip_limit=0.5), expected)
    torch.testing.assert_close(masking.mask_map(x, y, clip_limit=0.5), expected)
    residual = torch.arange(100, dtype=torch.float32).view(1, 1, 10, 10)
    torch.testing.assert_close(masking.normalise_per_image(residual), masking.normalise_per_image(residual, 95))


def test_saliency_is_smoothed_with_sigma_2_by_default():
    x, y = torch.rand(2, 1, 1, 16, 16).unbind(0)

    def perceptual(a, b):
        return (a - b).abs()

    expected = masking.smoothed_saliency(perceptual, y, x, sigma=2.0)
    assert not torch.allclose(expected, masking.smoothed_saliency(perceptual, y, x, sigma=3.0))
    torch.testing.assert_close(masking.smoothed_saliency(perceptual, y, x), expected)
    torch.testing.assert_close(masking.mask_map(x, y, perceptual), masking.clahe_residual(x, y) * expected)


def test_random_ellipse_masks_draw_ten_ellipses_by_default():
    default = masking.random_ellipse_masks(2, (32, 32), rng=3)
    torch.testing.assert_close(default, masking.random_ellipse_masks(2, (32, 32), n_ellipses=10, rng=3))
    assert not torch.equal(default, masking.random_ellipse_masks(2, (32, 32), n_ellipses=11, rng=3))
