"""Tests for medanomaly.scoring (maps, post-processing, LPIPS without downloads)."""

import logging
import re

import numpy as np
import pytest
import torch
from skimage.metrics import structural_similarity

from medanomaly import scoring


def smooth_texture(shape, seed=0):
    """Images in [0, 1] with some structure (blurred noise)."""
    g = torch.Generator().manual_seed(seed)
    noise = torch.rand(shape, generator=g)
    return scoring.smooth_map(noise, kind="gaussian", size=7, sigma=2.0).clamp(0, 1)


# --------------------------------------------------------------------------- simple maps
def test_residual_map_is_exact_absolute_difference():
    x = torch.tensor([[[[0.0, 0.25], [1.0, 0.5]]]])
    y = torch.tensor([[[[0.5, 0.25], [0.0, 0.75]]]])
    assert torch.equal(scoring.residual_map(x, y), torch.tensor([[[[0.5, 0.0], [1.0, 0.25]]]]))
    with pytest.raises(ValueError, match="same shape"):
        scoring.residual_map(x, y[..., :1])


def test_zero_background_zeroes_exactly_the_outside():
    m = torch.rand(2, 1, 8, 9) + 0.1
    mask = torch.rand(2, 1, 8, 9) > 0.5
    out = scoring.zero_background(m, mask)
    assert torch.equal(out[mask], m[mask])
    assert torch.all(out[~mask] == 0)


def test_combine_maps_is_the_product():
    a, b, c = torch.rand(3, 2, 1, 5, 6).unbind(0)
    assert torch.equal(scoring.combine_maps(a, b, c), a * b * c)
    assert torch.equal(scoring.combine_maps(a), a)


@pytest.mark.parametrize("shape", [(2, 1, 16, 16), (1, 1, 9, 9, 9)])
def test_median_removes_single_voxel_spike(shape):
    m = torch.zeros(shape)
    m[(0, 0) + tuple(s // 2 for s in shape[2:])] = 5.0
    out = scoring.smooth_map(m, kind="median", size=3)
    assert out.shape == m.shape and torch.all(out == 0)


@pytest.mark.parametrize("shape", [(2, 1, 16, 12), (1, 1, 8, 9, 10)])
def test_gaussian_preserves_a_constant_and_its_mean(shape):
    m = torch.full(shape, 0.37)
    out = scoring.smooth_map(m, kind="gaussian", size=5, sigma=1.0)
    assert out.shape == m.shape
    torch.testing.assert_close(out, m)  # everywhere, borders included
    x = torch.rand(shape)
    blurred = scoring.smooth_map(x, kind="gaussian", size=5, sigma=1.0)
    assert blurred.std() < x.std()


def test_normalise_by_percentile_and_volume_score_match_numpy():
    m = torch.rand(3, 1, 20, 20, dtype=torch.float64)
    mask = torch.zeros_like(m, dtype=torch.bool)
    mask[:, :, 5:15, 3:18] = True
    inside = m[mask].numpy()

    out = scoring.normalise_by_percentile(m, mask, q=95)
    torch.testing.assert_close(out[mask], m[mask] / np.percentile(inside, 95))
    assert torch.all(out[~mask] == 0)
    assert torch.all(scoring.normalise_by_percentile(torch.zeros_like(m), mask) == 0)

    assert scoring.volume_score(m, mask).item() == pytest.approx(inside.mean())
    top = inside[inside >= np.percentile(inside, 99)]
    assert len(top) >= 3
    assert scoring.volume_score(m, mask, "top_percentile", 99).item() == pytest.approx(top.mean())
    with pytest.raises(ValueError, match="mask is empty"):
        scoring.volume_score(m, torch.zeros_like(mask))
    assert scoring.volume_score(m).item() == pytest.approx(m.mean().item())


# --------------------------------------------------------------------------- SSIM
def test_ssim_map_identical_is_zero():
    x = smooth_texture((2, 1, 32, 32))
    assert torch.all(scoring.ssim_map(x, x) == 0)
    v = smooth_texture((1, 1, 16, 16, 16))
    assert torch.all(scoring.ssim_map(v, v) == 0)


def test_ssim_map_matches_skimage_in_the_interior():
    x = smooth_texture((2, 1, 48, 40), seed=1)
    y = (x + 0.15 * torch.rand(x.shape, generator=torch.Generator().manual_seed(2))).clamp(0, 1)
    ours = scoring.ssim_map(x, y)
    assert ours.shape == x.shape
    for b in range(2):
        _, full = structural_similarity(
            x[b, 0].double().numpy(), y[b, 0].double().numpy(), gaussian_weights=True, sigma=1.5,
            use_sample_covariance=False, data_range=1, full=True)
        np.testing.assert_allclose(ours[b, 0, 5:-5, 5:-5].numpy(), 1 - full[5:-5, 5:-5], atol=1e-4)


# --------------------------------------------------------------------------- LPIPS
@pytest.fixture
def hub_dir(tmp_path, monkeypatch):
    """An empty torch hub cache, and no downloads possible."""
    monkeypatch.setattr(torch.hub, "_hub_dir", None)  # restored after the test
    torch.hub.set_dir(str(tmp_path / "hub"))
    monkeypatch.delenv(scoring.RANDOM_BACKBONE_ENV, raising=False)

    def no_download(url, *args, **kwargs):
        raise AssertionError(f"tried to download {url}")

    monkeypatch.setattr(torch.hub, "download_url_to_file", no_download)
    return tmp_path / "hub"


@pytest.mark.parametrize("net, file_name", [
    ("vgg", "vgg16-397923af.pth"),
    ("alex", "alexnet-owt-7be5be79.pth"),
    ("squeeze", "squeezenet1_1-b8a52dc0.pth"),
])
def test_lpips_missing_weights_raise_a_clear_error(hub_dir, net, file_name):
    expected = hub_dir / "checkpoints" / file_name
    assert scoring.backbone_weights_path(net) == expected
    with pytest.raises(scoring.PerceptualWeightsMissing) as err:
        scoring.PerceptualDistance(net)
    assert str(expected) in str(err.value) and scoring.RANDOM_BACKBONE_ENV in str(err.value)


def test_lpips_random_backbone_warns_and_gives_a_local_map(hub_dir, caplog):
    with caplog.at_level(logging.WARNING, logger="medanomaly.scoring"):
        model = scoring.PerceptualDistance("alex", allow_random_backbone=True)
        scoring.PerceptualDistance("alex", allow_random_backbone=True)
    assert caplog.text.count("RANDOMLY INITIALISED") == 2  # every construction
    assert model.random_backbone

    assert not model.training and not any(p.requires_grad for p in model.parameters())
    model.train()
    assert not model.training and not model.lpips.lin0.training

    x = smooth_texture((2, 1, 64, 64), seed=3)
    y = x.clone()
    y[:, :, 8:24, 8:24] = 1 - y[:, :, 8:24, 8:24]
    d = model(x, y)
    assert d.shape == (2, 1, 64, 64) and torch.all(d >= 0)
    assert torch.allclose(model(x, x), torch.zeros_like(d), atol=1e-7)
    inside, far = d[:, :, 8:24, 8:24].mean(), d[:, :, 44:, 44:].mean()
    assert inside > 3 * far

    # Seeded: the same backbone every time, without touching the global random state.
    state = torch.random.get_rng_state()
    again = scoring.PerceptualDistance("alex", allow_random_backbone=True)
    assert torch.equal(torch.random.get_rng_state(), state)
    torch.testing.assert_close(again(x, y), d)


def test_lpips_env_variable_allows_random_backbone_and_linear_weights_ship_with_lpips(hub_dir, monkeypatch):
    from pathlib import Path

    import lpips

    monkeypatch.setenv(scoring.RANDOM_BACKBONE_ENV, "1")
    model = scoring.PerceptualDistance("squeeze")
    shipped = torch.load(Path(lpips.__file__).parent / "weights" / "v0.1" / "squeeze.pth", map_location="cpu",
                         weights_only=True)
    state = model.lpips.state_dict()
    assert shipped and all(torch.equal(state[k], v) for k, v in shipped.items())
    x = smooth_texture((1, 1, 48, 48))
    assert model(x, 1 - x).shape == (1, 1, 48, 48)


def test_lpips_uses_cached_backbone_weights_without_download(hub_dir, caplog):
    import torchvision

    reference = torchvision.models.squeezenet1_1()  # stands in for the ImageNet weights
    path = scoring.backbone_weights_path("squeeze")
    path.parent.mkdir(parents=True)
    torch.save(reference.state_dict(), path)
    with caplog.at_level(logging.WARNING, logger="medanomaly.scoring"):
        model = scoring.PerceptualDistance("squeeze")
    assert not model.random_backbone and "RANDOM" not in caplog.text
    torch.testing.assert_close(model.lpips.net.slice1[0].weight, reference.features[0].weight)


def test_bad_inputs_raise_errors_that_name_them():
    x = torch.rand(1, 1, 12, 12)
    cases = [
        (lambda: scoring.residual_map(x[0], x[0]),
         r"^Expected \(B, C, H, W\) or \(B, C, H, W, D\), got shape \(1, 12, 12\)\.$"),
        (lambda: scoring.residual_map(x, x[..., :11]),
         r"^The two batches must have the same shape, got \(1, 1, 12, 12\) and \(1, 1, 12, 11\)\.$"),
        (lambda: scoring.ssim_map(x, x, win_size=4), r"^The window size must be odd and positive, got 4\.$"),
        (lambda: scoring.ssim_map(x, x, win_size=0), r"^The window size must be odd and positive, got 0\.$"),
        (lambda: scoring.backbone_weights_path("resnet"),
         r"^net must be one of \['alex', 'squeeze', 'vgg'\], got 'resnet'\.$"),
        (lambda: scoring.combine_maps(), r"^combine_maps needs at least one map\.$"),
        (lambda: scoring.combine_maps(x, x[..., :11]), r"^All maps must have the same shape, got \(1, 1, 12, 12\) and "
                                                       r"\(1, 1, 12, 11\)\.$"),
        (lambda: scoring.smooth_map(x, size=4), r"^size must be odd and positive, got 4\.$"),
        (lambda: scoring.smooth_map(x, size=-1), r"^size must be odd and positive, got -1\.$"),
        (lambda: scoring.volume_score(x, torch.zeros_like(x)),
         r"^volume_score: the mask is empty; check the brain mask of this volume\.$"),
    ]
    for call, message in cases:
        with pytest.raises(ValueError, match=message):
            call()


def test_one_pixel_windows_and_integer_inputs():
    x = torch.rand(1, 1, 12, 12)
    # a 1-pixel window: SSIM of single pixels, (2 x y + c1)(c2) / ((x^2 + y^2 + c1)(c2)) exactly
    y = torch.rand(1, 1, 12, 12)
    c1 = 0.01 ** 2
    expected = 1 - (2 * x * y + c1) / (x * x + y * y + c1)
    torch.testing.assert_close(scoring.ssim_map(x, y, win_size=1), expected.clamp_min(0))
    assert torch.equal(scoring.smooth_map(x, size=1), x) and torch.equal(scoring.smooth_map(x, "gaussian", size=1), x)
    counts = torch.randint(0, 5, (1, 1, 12, 12))
    assert scoring.smooth_map(counts, "gaussian", size=3).dtype == torch.float32  # integer maps are filtered as floats


@pytest.mark.parametrize("data_range", [1.0, 255.0])
def test_ssim_constants_scale_with_the_data_range(data_range):
    """c1 = (k1 L)^2, c2 = (k2 L)^2: the same images scaled by L give the same map as at L = 1."""
    x, y = torch.rand(1, 1, 24, 24, dtype=torch.float64), torch.rand(1, 1, 24, 24, dtype=torch.float64)
    torch.testing.assert_close(scoring.ssim_map(x * data_range, y * data_range, data_range=data_range),
                               scoring.ssim_map(x, y))
    assert not torch.allclose(scoring.ssim_map(x * 255, y * 255, data_range=1.0), scoring.ssim_map(x, y))


@pytest.mark.parametrize("value", ["1", "TRUE", " yes ", "True"])
def test_the_random_backbone_switch_accepts_the_usual_spellings(value, monkeypatch, tmp_path, caplog):
    monkeypatch.setenv(scoring.RANDOM_BACKBONE_ENV, value)
    with caplog.at_level(logging.WARNING, logger="medanomaly.scoring"):
        assert scoring.use_random_backbone(tmp_path / "missing.pth", "VGG16_Weights", "a test", seed=3)
    assert caplog.messages == [f"a test: '{tmp_path / 'missing.pth'}' not found; using a RANDOMLY INITIALISED backbone "
                               "(seed 3). Its outputs are NOT perceptual; do not use them for real results."]
    monkeypatch.setenv(scoring.RANDOM_BACKBONE_ENV, "no")
    with pytest.raises(scoring.PerceptualWeightsMissing, match="missing.pth"):
        scoring.use_random_backbone(tmp_path / "missing.pth", "VGG16_Weights", "a test")


def test_percentile_scores_at_the_edges():
    values = torch.arange(10.0).view(1, 1, 2, 5)
    assert float(scoring.volume_score(values, reduction="top_percentile", percentile=100)) == 9.0
    assert float(scoring.volume_score(values, reduction="top_percentile", percentile=0)) == 4.5
    # at the 95th percentile of 0..9 (8.55) only 9 is at or above it
    assert float(scoring.volume_score(values, reduction="top_percentile", percentile=95)) == 9.0
    normalised = scoring.normalise_by_percentile(values, q=100)
    torch.testing.assert_close(normalised, values / 9.0)
    mask = torch.zeros_like(values)
    mask[..., :2] = 1  # values 0, 1, 5, 6 inside
    torch.testing.assert_close(scoring.normalise_by_percentile(values, mask, q=100), values / 6.0 * mask)


def test_median_smoothing_is_over_the_two_axes_of_a_slice_and_the_three_of_a_volume():
    from scipy import ndimage

    slices, volume = torch.rand(1, 1, 12, 12), torch.rand(1, 1, 9, 9, 9)
    inner2, inner3 = (slice(2, -2),) * 2, (slice(2, -2),) * 3
    np.testing.assert_allclose(scoring.smooth_map(slices, size=5)[0, 0].numpy()[inner2],
                               ndimage.median_filter(slices[0, 0].numpy(), size=5)[inner2])
    np.testing.assert_allclose(scoring.smooth_map(volume, size=3)[0, 0].numpy()[inner3],
                               ndimage.median_filter(volume[0, 0].numpy(), size=3)[inner3])


def test_a_zero_percentile_normalises_by_the_maximum_and_the_default_top_percentile_is_99():
    m = torch.zeros(1, 1, 10, 10)
    m[0, 0, 0, :3] = torch.tensor([0.5, 1.0, 2.0])  # the 95th percentile is 0
    torch.testing.assert_close(scoring.normalise_by_percentile(m), m / 2.0)
    values = torch.arange(1000.0).view(1, 1, 10, 100)
    assert float(scoring.volume_score(values, reduction="top_percentile")) == 994.5  # 990 .. 999


def test_the_random_backbone_warning_names_seed_0_by_default(tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="medanomaly.scoring"):
        scoring.use_random_backbone(tmp_path / "missing.pth", "VGG16_Weights", "a test", allow_random_backbone=True)
    assert "(seed 0)" in caplog.text


# --------------------------------------------------------------------------- backbones and options (mutants left alive)
def test_medanomaly_backbone_is_the_frozen_feature_distance_of_the_shipped_weights(hub_dir):
    from medanomaly.perceptual import FeatureDistance, load_backbone

    model = scoring.PerceptualDistance(backbone="medanomaly")  # no ImageNet file needed (hub_dir is empty)
    assert model.backbone == "medanomaly" and model.random_backbone is False
    assert isinstance(model.distance, FeatureDistance) and not any(p.requires_grad for p in model.parameters())
    x, y = smooth_texture((2, 1, 32, 32), seed=4), smooth_texture((2, 1, 32, 32), seed=5)
    torch.testing.assert_close(model(x, y), FeatureDistance(load_backbone())(x, y))


def test_perceptual_distance_takes_single_channel_slices_only(hub_dir):
    model = scoring.PerceptualDistance(backbone="medanomaly")
    for shape in [(1, 3, 16, 16), (1, 1, 4, 16, 16)]:  # three channels; a volume (one channel)
        x = torch.rand(shape)
        message = rf"^PerceptualDistance expects \(B, 1, H, W\) slices, got {re.escape(str(shape))}\.$"
        with pytest.raises(ValueError, match=message):
            model(x, x)


def test_random_lpips_backbone_is_chosen_explicitly_with_a_warning_naming_net_and_seed(hub_dir, caplog, capsys):
    with caplog.at_level(logging.WARNING, logger="medanomaly.scoring"):
        model = scoring.PerceptualDistance("alex", backbone="random")
        scoring.PerceptualDistance("alex", seed=5, backbone="random")
    assert model.backbone == "random" and model.random_backbone is True and model.net == "alex"
    assert caplog.messages == [
        f"The LPIPS 'alex' backbone: backbone 'random' chosen: a RANDOMLY INITIALISED network (seed {seed}). Its "
        "outputs are NOT perceptual; use it only as a control." for seed in (0, 5)]
    assert capsys.readouterr().out == ""  # lpips is built quietly (verbose=False)


def test_imagenet_lpips_fallback_names_net_seed_and_weights(hub_dir, caplog):
    with pytest.raises(scoring.PerceptualWeightsMissing, match=r"vgg16-397923af\.pth"):
        scoring.PerceptualDistance()  # default net: vgg
    with pytest.raises(scoring.PerceptualWeightsMissing) as err:
        scoring.PerceptualDistance("alex")
    assert str(err.value).startswith("The LPIPS 'alex' backbone needs torchvision's ImageNet weights file "
                                     "'alexnet-owt-7be5be79.pth'")
    assert "(torchvision.models.AlexNet_Weights.IMAGENET1K_V1.url)" in str(err.value)
    with caplog.at_level(logging.WARNING, logger="medanomaly.scoring"):
        model = scoring.PerceptualDistance("alex", allow_random_backbone=True, seed=7)
    assert model.backbone == "random" and model.random_backbone is True
    assert caplog.messages == [f"The LPIPS 'alex' backbone: '{scoring.backbone_weights_path('alex')}' not found; using "
                               "a RANDOMLY INITIALISED backbone (seed 7). Its outputs are NOT perceptual; do not use "
                               "them for real results."]


def test_cached_imagenet_lpips_backbone_is_reported_as_imagenet(hub_dir):
    import torchvision

    path = scoring.backbone_weights_path("squeeze")
    path.parent.mkdir(parents=True)
    torch.save(torchvision.models.squeezenet1_1().state_dict(), path)
    model = scoring.PerceptualDistance("squeeze")
    assert model.backbone == "imagenet" and model.random_backbone is False


def test_missing_or_unloaded_lpips_linear_layers_raise(hub_dir, tmp_path, monkeypatch):
    from pathlib import Path

    import lpips

    # lpips itself reads its files beside its code; only our check looks at lpips.__file__
    shipped = Path(lpips.__file__).parent / "weights" / "v0.1" / "alex.pth"
    monkeypatch.setattr(lpips, "__file__", str(tmp_path / "lpips" / "__init__.py"))
    linear_file = tmp_path / "lpips" / "weights" / "v0.1" / "alex.pth"
    with pytest.raises(scoring.PerceptualWeightsMissing,
                       match=rf"^The lpips package has no linear-layer weights at '{re.escape(str(linear_file))}'\. "
                             r"Reinstall lpips \(pip install lpips\)\.$"):
        scoring.PerceptualDistance("alex", backbone="random")
    linear_file.parent.mkdir(parents=True)
    other = {k: v + 1 for k, v in torch.load(shipped, map_location="cpu", weights_only=True).items()}
    torch.save(other, linear_file)  # not what lpips loaded
    with pytest.raises(RuntimeError,
                       match=rf"^The LPIPS linear layers were not loaded from '{re.escape(str(linear_file))}'\.$"):
        scoring.PerceptualDistance("alex", backbone="random")


def test_empty_masks_normalise_to_zero_and_the_default_percentile_is_95():
    m = torch.rand(1, 1, 6, 6) + 0.1
    out = scoring.normalise_by_percentile(m, torch.zeros_like(m))
    assert out.shape == m.shape and torch.all(out == 0)
    values = torch.arange(101.0).view(1, 1, 1, 101)  # the 95th percentile is 95
    torch.testing.assert_close(scoring.normalise_by_percentile(values), values / 95.0)


def test_smoothing_defaults_and_channels_are_filtered_separately():
    m = torch.rand(1, 2, 12, 12, dtype=torch.float64)
    torch.testing.assert_close(scoring.smooth_map(m), scoring.smooth_map(m, "median", 5))
    torch.testing.assert_close(scoring.smooth_map(m, "gaussian"), scoring.smooth_map(m, "gaussian", 5, 1.0))
    assert not torch.allclose(scoring.smooth_map(m, "gaussian"), scoring.smooth_map(m, "gaussian", 5, 2.0))
    for c in range(2):  # the median runs over H and W, never across channels
        torch.testing.assert_close(scoring.smooth_map(m)[:, c:c + 1], scoring.smooth_map(m[:, c:c + 1]))


def test_float64_maps_stay_float64_and_integer_maps_keep_their_dtype_when_masked():
    x, y = torch.rand(1, 1, 12, 12, dtype=torch.float64), torch.rand(1, 1, 12, 12, dtype=torch.float64)
    assert scoring.ssim_map(x, y).dtype == torch.float64
    assert scoring.smooth_map(x, "gaussian", size=3).dtype == torch.float64
    counts = torch.randint(1, 5, (1, 1, 4, 4))
    mask = torch.rand(1, 1, 4, 4) > 0.5
    out = scoring.zero_background(counts, mask)
    assert out.dtype == counts.dtype and torch.equal(out, counts * mask)


def test_unknown_kinds_and_reductions_raise_errors_that_name_them():
    x = torch.rand(1, 1, 8, 8)
    with pytest.raises(ValueError, match=r"^kind must be 'median' or 'gaussian', got 'box'\.$"):
        scoring.smooth_map(x, kind="box")
    with pytest.raises(ValueError, match=r"^reduction must be 'mean' or 'top_percentile', got 'max'\.$"):
        scoring.volume_score(x, reduction="max")
