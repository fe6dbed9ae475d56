"""The offline perceptual backbone (`medanomaly.perceptual`): the distance it defines, how the
LPIPS / VGG-score classes switch to it, its training, and the property that makes it worth
shipping: on held-back healthy slices a lesion-like anomaly is farther from its clean twin than
Gaussian noise of equal MSE, clearly more often than with a random backbone."""

from __future__ import annotations

import logging

import pytest
import torch

from medanomaly import perceptual
from medanomaly.data.synth import contrast_datalist
from medanomaly.scoring import FeatureResidualMap, PerceptualDistance, PerceptualWeightsMissing


def _blobs(n=3, size=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, size), torch.linspace(-1, 1, size), indexing="ij")
    brain = ((yy**2 + xx**2) < 0.7).float().expand(n, 1, size, size)
    texture = torch.nn.functional.avg_pool2d(torch.rand(n, 1, size, size, generator=g), 5, 1, 2)
    return (0.3 + 0.5 * texture) * brain, brain


def test_feature_distance_is_zero_for_twins_positive_otherwise_and_differentiable():
    distance = perceptual.FeatureDistance(perceptual.random_backbone(seed=1))
    x, brain = _blobs()
    d_same = distance(x, x)
    assert d_same.shape == (3, 1, 64, 64) and float(d_same.abs().max()) < 1e-6
    y = x.clone().requires_grad_(True)
    d = distance(x, y + 0.1 * brain)
    assert float(d.mean()) > 0
    d.mean().backward()
    assert y.grad is not None and float(y.grad.abs().sum()) > 0
    assert not any(p.requires_grad for p in distance.parameters())


def test_backbone_switch_of_the_lpips_and_vgg_score_classes(monkeypatch, caplog):
    with pytest.raises(ValueError, match="imagenet, medanomaly, random"):
        PerceptualDistance("squeeze", backbone="nope")
    with caplog.at_level(logging.WARNING):
        control = PerceptualDistance("squeeze", backbone="random")
    assert control.backbone == "random" and control.random_backbone and "RANDOMLY INITIALISED" in caplog.text
    ours = PerceptualDistance("squeeze", backbone="medanomaly")
    assert ours.backbone == "medanomaly" and not ours.random_backbone
    x, brain = _blobs()
    assert ours(x, x + 0.1 * brain).shape == (3, 1, 64, 64)
    score = FeatureResidualMap(backbone="medanomaly")
    a_per = score(x, x + 0.1 * brain)
    assert a_per.shape == (3, 1, 64, 64) and float(score(x, x).abs().max()) < 1e-6 and float(a_per.mean()) > 0
    monkeypatch.setattr(perceptual, "WEIGHTS_FILE", perceptual.WEIGHTS_FILE.with_name("missing.pt"))
    with pytest.raises(PerceptualWeightsMissing, match="python -m medanomaly.perceptual"):
        PerceptualDistance("squeeze", backbone="medanomaly")


def test_committed_backbone_sees_lesions_more_than_noise_of_equal_mse(tiny):
    """On the tiny cohort's healthy validation volumes (another seed than the demo cohort the
    committed backbone was trained on), every contrast, at the demo geometry. Thresholds: the
    trained backbone ranks the anomaly farther in >= 80 % of the slices (a clear majority) and in
    >= 0.3 more of them than the random backbone, with a larger median distance ratio."""
    images, brains = perceptual.held_back_slices([contrast_datalist(tiny.parent, c) for c in ("T1w", "T2w", "FLAIR")])
    assert len(images) >= 30
    trained = perceptual.separation(perceptual.FeatureDistance(perceptual.load_backbone()), images, brains)
    control = perceptual.separation(perceptual.FeatureDistance(perceptual.random_backbone(0)), images, brains)
    assert trained["anomaly_farther"] >= 0.8, (trained, control)
    assert trained["anomaly_farther"] >= control["anomaly_farther"] + 0.3, (trained, control)
    assert trained["median_ratio"] > control["median_ratio"], (trained, control)


def test_lesion_like_anomaly_stays_in_the_brain_and_noise_twin_has_equal_mse():
    x, brain = _blobs(4)
    rng = torch.Generator().manual_seed(0)
    changed = perceptual.lesion_like(x[0], brain[0], rng) != x[0]
    assert changed.any() and not (changed & (brain[0] == 0)).any()
    seen = []

    class Recorder(torch.nn.Module):
        def forward(self, a, b):
            seen.append((b - a).pow(2).flatten(1).mean(1))
            return (b - a).abs()

    perceptual.anomaly_vs_noise(Recorder(), x, brain, seed=3)
    torch.testing.assert_close(seen[0], seen[1], rtol=1e-4, atol=0)


@pytest.mark.slow
def test_training_lowers_the_restoration_loss(tiny, tmp_path):
    record = perceptual.train_backbone(str(contrast_datalist(tiny.parent, "T2w")), tmp_path / "backbone.pt",
                                       contrasts=["T2w"], max_seconds=600, max_iterations=60)
    assert record["iterations"] == 60
    assert record["loss_last_50"] < record["loss_first_50"]
    assert isinstance(perceptual.load_backbone(tmp_path / "backbone.pt"), perceptual.AnomalyFeatures)
