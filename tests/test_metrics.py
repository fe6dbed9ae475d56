"""Tests of medanomaly.metrics: histogram metrics against sklearn and brute force."""

import json
import logging
import math
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from sklearn.metrics import (
    average_precision_score,
    precision_recall_curve,
    roc_auc_score,
    roc_curve,
)

from medanomaly.metrics import (
    CohortEvaluator,
    DiceResult,
    ScoreHistogram,
    bootstrap_ci,
    bootstrap_histogram_metric,
    detection_metrics,
    plot_curves,
    rank_auroc,
    slice_scores_and_labels,
    top_percentile_mean,
    volume_score,
)


# ---------------------------------------------------------------------- helpers
def noisy_scores(rng, n, pos_fraction=0.2, separation=1.0):
    """Labels and scores in [0, 1] where lesions score higher on average."""
    labels = rng.random(n) < pos_fraction
    logits = rng.normal(size=n) + separation * labels
    return 1.0 / (1.0 + np.exp(-logits)), labels


def exact_dice(scores, labels, threshold):
    predicted = scores >= threshold
    return 2.0 * np.sum(predicted & labels) / (labels.sum() + predicted.sum())


def exact_fpr(negative_scores, threshold):
    return np.mean(negative_scores >= threshold)


# ---------------------------------------------------------------------- binning
def test_bin_index_agrees_with_edges_exactly():
    hist = ScoreHistogram(n_bins=1000, value_range=(-0.5, 2.0))
    rng = np.random.default_rng(0)
    scores = np.concatenate([rng.uniform(-1, 3, 50_000), hist.edges, np.nextafter(hist.edges, -9)])
    expected = np.clip(np.searchsorted(hist.edges, scores, side="right") - 1, 0, 999)
    np.testing.assert_array_equal(hist.bin_index(scores), expected)


def test_quantised_scores_match_sklearn_exactly():
    rng = np.random.default_rng(1)
    hist = ScoreHistogram(n_bins=40)
    centres = (hist.edges[:-1] + hist.edges[1:]) / 2
    raw, labels = noisy_scores(rng, 5000)
    scores = centres[hist.bin_index(raw)]  # many ties inside each bin
    mask = rng.random(5000) < 0.9
    hist.update(scores, labels, mask)
    s, y = scores[mask], labels[mask]

    assert hist.auroc() == pytest.approx(roc_auc_score(y, s), abs=1e-9)
    assert hist.average_precision() == pytest.approx(average_precision_score(y, s), abs=1e-9)
    fpr, tpr, _ = hist.roc_curve()
    sk_fpr, sk_tpr, _ = roc_curve(y, s, drop_intermediate=False)
    np.testing.assert_allclose(fpr, sk_fpr, atol=1e-12)
    np.testing.assert_allclose(tpr, sk_tpr, atol=1e-12)
    precision, recall, thresholds = hist.precision_recall_curve()
    sk_precision, sk_recall, sk_thresholds = precision_recall_curve(y, s)
    np.testing.assert_allclose(precision, sk_precision, atol=1e-12)
    np.testing.assert_allclose(recall, sk_recall, atol=1e-12)
    # Our thresholds are the lower edges of the bins sklearn's tied scores sit in.
    np.testing.assert_allclose(thresholds, sk_thresholds - hist.edges[1] / 2, atol=1e-12)


def test_continuous_scores_with_fine_bins_are_close_to_sklearn():
    rng = np.random.default_rng(2)
    scores, labels = noisy_scores(rng, 20_000)
    hist = ScoreHistogram(n_bins=100_000).update(scores, labels)
    assert hist.auroc() == pytest.approx(roc_auc_score(labels, scores), abs=1e-4)
    assert hist.average_precision() == pytest.approx(average_precision_score(labels, scores), abs=1e-3)


def test_torch_and_numpy_inputs_give_the_same_counts():
    rng = np.random.default_rng(3)
    scores, labels = noisy_scores(rng, 1000)
    mask = rng.random(1000) < 0.5
    from_numpy = ScoreHistogram(100).update(scores, labels, mask)
    from_torch = ScoreHistogram(100).update(
        torch.from_numpy(scores).float().reshape(10, 100),
        torch.from_numpy(labels).reshape(10, 100),
        torch.from_numpy(mask).reshape(10, 100),
    )
    np.testing.assert_array_equal(from_numpy.pos_counts, from_torch.pos_counts)
    np.testing.assert_array_equal(from_numpy.neg_counts, from_torch.neg_counts)


# ---------------------------------------------------------------------- Dice
def test_perfect_separation_gives_dice_one_at_the_first_clean_edge():
    negatives = np.linspace(0.1, 0.25, 50)
    positives = np.linspace(0.8, 0.85, 10)
    scores = np.concatenate([negatives, positives])
    labels = np.concatenate([np.zeros(50), np.ones(10)])
    hist = ScoreHistogram(n_bins=10).update(scores, labels)
    best = hist.max_dice()
    assert best.dice == 1.0
    assert best.threshold == pytest.approx(0.3)
    assert exact_dice(scores, labels > 0, best.threshold) == 1.0
    assert hist.dice_at(0.5)["dice"] == 1.0
    assert hist.auroc() == 1.0 and hist.average_precision() == 1.0


def test_hand_computed_example():
    # Bins of width 0.25: 0.1 -> bin 0, 0.3 -> 1, 0.6 -> 2, 0.9 -> 3.
    scores = np.array([0.1, 0.3, 0.6, 0.6, 0.9, 0.9])
    labels = np.array([0, 1, 0, 1, 1, 0])
    hist = ScoreHistogram(n_bins=4).update(scores, labels)
    np.testing.assert_array_equal(hist.pos_counts, [0, 1, 1, 1])
    np.testing.assert_array_equal(hist.neg_counts, [1, 0, 1, 1])
    # Dice per edge k (P = 3): 6/9, 6/8, 4/7, 2/5 -> best 3/4 at threshold 0.25.
    _, dice = hist.dice_curve()
    np.testing.assert_allclose(dice, [6 / 9, 6 / 8, 4 / 7, 2 / 5])
    best = hist.max_dice()
    assert best.dice == pytest.approx(3 / 4)
    assert best.threshold == 0.25
    # Bound 2 TP_k / (P + PP_{k+1}): 6/8, 6/7, 4/5, 2/3 -> 6/7.
    assert best.upper_bound == pytest.approx(6 / 7)
    at = hist.dice_at(0.5)
    assert at == pytest.approx(dict(dice=4 / 7, precision=1 / 2, recall=2 / 3, fpr=2 / 3, threshold_used=0.5))
    # Pairs (pos, neg): 0.3 beats 1, 0.6 beats 1 and ties 1, 0.9 beats 2 and ties 1.
    assert hist.auroc() == pytest.approx(5 / 9)
    # Precision at each recall step from the top: 1/2, 2/4, 3/5.
    assert hist.average_precision() == pytest.approx((0.5 + 0.5 + 0.6) / 3)


@pytest.mark.parametrize("seed", range(12))
def test_upper_bound_bounds_the_exact_best_dice(seed):
    rng = np.random.default_rng(seed)
    n_bins = int(rng.choice([2, 5, 17, 100]))
    scores, labels = noisy_scores(rng, 400, pos_fraction=rng.uniform(0.05, 0.5))
    if seed % 3 == 0:  # some scores outside the range, clipped into edge bins
        scores = scores * 1.4 - 0.2
    hist = ScoreHistogram(n_bins=n_bins).update(scores, labels)
    exact_best = max(exact_dice(scores, labels, t) for t in np.unique(scores))
    best = hist.max_dice()
    assert best.dice <= exact_best + 1e-12
    assert exact_best <= best.upper_bound + 1e-12
    if best.threshold > hist.edges[0]:  # edge 0 also holds scores clipped from below
        assert exact_dice(scores, labels, best.threshold) == pytest.approx(best.dice, abs=1e-12)


def test_bound_tightens_with_finer_bins():
    scores, labels = noisy_scores(np.random.default_rng(5), 20_000)
    coarse = ScoreHistogram(20).update(scores, labels).max_dice()
    fine = ScoreHistogram(20_000).update(scores, labels).max_dice()
    assert fine.binning_error < coarse.binning_error
    assert fine.binning_error < 1e-3


# ---------------------------------------------------------------------- merging / memory
def test_merging_parts_equals_histogram_of_the_whole():
    rng = np.random.default_rng(6)
    scores, labels = noisy_scores(rng, 3000)
    scores = scores * 1.2  # a few clipped scores
    whole = ScoreHistogram(64).update(scores, labels)
    parts = [
        ScoreHistogram(64).update(part_scores, part_labels)
        for part_scores, part_labels in zip(np.split(scores, 3), np.split(labels, 3))
    ]
    merged_in_place = parts[0].copy().merge(parts[1]).merge(parts[2])
    for combined in (sum(parts), parts[0] + parts[1] + parts[2], merged_in_place):
        np.testing.assert_array_equal(combined.pos_counts, whole.pos_counts)
        np.testing.assert_array_equal(combined.neg_counts, whole.neg_counts)
        assert combined.n_clipped == whole.n_clipped > 0
    assert parts[0].n_pos + parts[0].n_neg == 1000  # the parts were not modified
    with pytest.raises(ValueError, match="different bins"):
        parts[0].merge(ScoreHistogram(65))


def test_histogram_memory_does_not_grow_with_voxels():
    rng = np.random.default_rng(7)
    small = ScoreHistogram(500).update(rng.random(10), rng.random(10) < 0.5)
    large = ScoreHistogram(500).update(rng.random(1_000_000), rng.random(1_000_000) < 0.5)
    assert small.pos_counts.nbytes == large.pos_counts.nbytes == 500 * 8
    assert small.neg_counts.shape == large.neg_counts.shape == (500,)


def test_clipped_scores_are_counted_and_warned_once(caplog):
    hist = ScoreHistogram(10)
    with caplog.at_level(logging.WARNING, logger="medanomaly.metrics"):
        hist.update(np.array([-1.0, 0.5, 1.0, 2.0]), np.zeros(4))
        hist.update(np.array([3.0, 0.5]), np.zeros(2))
    assert hist.n_clipped == 3  # 1.0 is the closed upper end, not clipped
    assert hist.neg_counts[0] == 1 and hist.neg_counts[-1] == 3
    assert sum("outside value_range" in r.message for r in caplog.records) == 1


def test_bad_inputs_raise():
    with pytest.raises(ValueError, match="same number of voxels"):
        ScoreHistogram().update(np.zeros(3), np.zeros(4))
    with pytest.raises(ValueError, match="NaN"):
        ScoreHistogram().update(np.array([np.nan]), np.zeros(1))
    with pytest.raises(ValueError, match="low < high"):
        ScoreHistogram(value_range=(1.0, 1.0))


# ---------------------------------------------------------------------- FPR threshold
@pytest.mark.parametrize("target", [0.0, 0.001, 0.01, 0.05, 0.5, 1.0])
def test_threshold_at_fpr_is_the_smallest_edge_meeting_the_target(target):
    rng = np.random.default_rng(8)
    healthy = rng.beta(2, 5, 50_000)
    hist = ScoreHistogram(200).update(healthy, np.zeros_like(healthy))
    threshold = hist.threshold_at_fpr(target)
    assert exact_fpr(healthy, threshold) <= target
    k = int(np.searchsorted(hist.edges, threshold))
    assert hist.edges[k] == threshold
    if k > 0:
        assert exact_fpr(healthy, hist.edges[k - 1]) > target
    assert hist.dice_at(threshold)["fpr"] == pytest.approx(exact_fpr(healthy, threshold))


def test_threshold_at_fpr_out_of_range_returns_inf(caplog):
    hist = ScoreHistogram(10).update(np.ones(100), np.zeros(100))
    with caplog.at_level(logging.WARNING, logger="medanomaly.metrics"):
        assert hist.threshold_at_fpr(0.0) == math.inf
    assert "returning inf" in caplog.text
    assert hist.dice_at(math.inf)["fpr"] == 0.0
    with pytest.raises(ValueError, match="negative voxels"):
        ScoreHistogram(10).update(np.ones(3), np.ones(3)).threshold_at_fpr(0.1)


# ---------------------------------------------------------------------- conventions
def test_conventions_without_lesions():
    hist = ScoreHistogram(10).update(np.array([0.2, 0.7]), np.zeros(2))
    assert math.isnan(hist.average_precision())
    assert math.isnan(hist.auroc())
    best = hist.max_dice()
    assert isinstance(best, DiceResult) and math.isnan(best.dice) and math.isnan(best.upper_bound)
    at = hist.dice_at(0.5)
    assert at["dice"] == 0.0  # a false alarm without lesion scores 0
    assert math.isnan(at["recall"]) and at["precision"] == 0.0 and at["fpr"] == 0.5
    nothing = hist.dice_at(0.9)
    assert math.isnan(nothing["dice"]) and math.isnan(nothing["precision"])  # 0 / 0


def test_conventions_without_negatives():
    hist = ScoreHistogram(10).update(np.array([0.2, 0.7]), np.ones(2))
    assert math.isnan(hist.auroc())
    assert hist.average_precision() == 1.0
    assert hist.max_dice().dice == 1.0
    assert math.isnan(hist.dice_at(0.5)["fpr"])


def test_detection_metrics_with_and_without_both_classes():
    result = detection_metrics([0.1, 0.4, 0.35, 0.8], [0, 0, 1, 1])
    # Ranking 0.8+, 0.4-, 0.35+, 0.1-: precision 1 at recall 1/2, 2/3 at recall 1.
    assert result == pytest.approx(dict(auroc=0.75, ap=(1 + 2 / 3) / 2, n_pos=2, n_neg=2))
    missing = detection_metrics([0.1, 0.2], [0, 0])
    assert math.isnan(missing["auroc"]) and math.isnan(missing["ap"])
    assert "no positive" in missing["reason"]


# ---------------------------------------------------------------------- slices / volumes
def test_slice_scores_and_labels():
    heatmap = np.zeros((4, 4, 3))
    heatmap[..., 1] = np.arange(16).reshape(4, 4) / 16.0
    heatmap[..., 2] = 0.5
    mask = np.zeros((4, 4, 3), bool)
    mask[1:3, 1:3, 1:] = True  # slice 0 has no brain and is skipped
    label = np.zeros((4, 4, 3))
    label[2, 2, 2] = 1
    label[0, 0, 1] = 1  # outside the brain mask: ignored
    in_brain = heatmap[1:3, 1:3, 1]
    for reduction, expected in (
        ("top_percentile", in_brain.max()),  # the top 1 % of 4 voxels: the largest
        ("mean", in_brain.mean()),
        ("max", in_brain.max()),
        ("p99", np.percentile(in_brain, 99)),
    ):
        scores, labels = slice_scores_and_labels(heatmap[None], label[None], mask[None], -1, reduction)
        np.testing.assert_allclose(scores, [expected, 0.5])
        np.testing.assert_array_equal(labels, [0, 1])
    scores, labels = slice_scores_and_labels(heatmap, label, mask, axis=0)
    assert len(scores) == 2 and labels.tolist() == [0, 1]
    with pytest.raises(ValueError, match="reduction"):
        slice_scores_and_labels(heatmap, label, mask, reduction="median")


def edge_slices_and_a_lesion_slice():
    """Axial slices 0 and 5: small (9 voxels), uniformly high-ish scores with one at 0.35;
    slices 1-4: large (400 voxels), low scores (< 0.15), slice 2 with a 9-voxel lesion at 0.9."""
    heatmap, mask, label = np.zeros((24, 24, 6)), np.zeros((24, 24, 6), bool), np.zeros((24, 24, 6))
    mask[10:13, 10:13, [0, 5]] = True
    heatmap[10:13, 10:13, [0, 5]] = 0.3
    heatmap[11, 11, [0, 5]] = 0.35
    mask[2:22, 2:22, 1:5] = True
    heatmap[2:22, 2:22, 1:5] = 0.05 + 0.1 * np.random.default_rng(3).random((20, 20, 4))
    label[5:8, 5:8, 2] = 1
    heatmap[5:8, 5:8, 2] = 0.9
    return heatmap, label, mask


def test_slice_score_is_not_fooled_by_small_edge_slices():
    heatmap, label, mask = edge_slices_and_a_lesion_slice()
    mean, labels = slice_scores_and_labels(heatmap, label, mask, reduction="mean")
    top, _ = slice_scores_and_labels(heatmap, label, mask)  # default: top_percentile, 99
    np.testing.assert_array_equal(labels, [0, 0, 1, 0, 0, 0])
    assert mean[2] < mean[0] == mean[5]  # the mean ranks the edge slices above the lesion
    np.testing.assert_allclose(top[[0, 2, 5]], [0.35, 0.9, 0.35])  # the top 1 % of each slice
    assert top[2] > max(np.delete(top, 2))
    assert roc_auc_score(labels, mean) == pytest.approx(0.6)  # beats 3 of the 5 healthy slices
    evaluator = CohortEvaluator(n_bins=100)
    evaluator.add_volume("edge", heatmap, label, mask)
    summary = evaluator.summary(n_boot=0)["slice"]
    assert summary["auroc"] == roc_auc_score(labels, top) == 1.0
    assert summary["ap"] == average_precision_score(labels, top) == 1.0
    assert summary["reduction"] == "top_percentile" and summary["percentile"] == 99.0
    mean_cohort = CohortEvaluator(n_bins=100, slice_reduction="mean")
    mean_cohort.add_volume("edge", heatmap, label, mask)
    assert mean_cohort.summary(n_boot=0)["slice"]["auroc"] == pytest.approx(0.6)


def test_volume_score():
    heatmap = np.arange(1, 201, dtype=float).reshape(2, 10, 10)
    mask = np.ones_like(heatmap, bool)
    assert volume_score(heatmap, mask) == pytest.approx(100.5)
    # Top 1 % of 200 voxels: the two largest values.
    assert volume_score(heatmap, mask, "top_percentile", 99.0) == pytest.approx(199.5)
    with pytest.raises(ValueError, match="empty"):
        volume_score(heatmap, np.zeros_like(mask))


# ---------------------------------------------------------------------- bootstrap
def test_bootstrap_ci_contains_estimate_and_narrows_with_more_items():
    rng = np.random.default_rng(9)
    widths = []
    for n_items in (20, 500):
        values = rng.normal(size=n_items)
        low, high = bootstrap_ci(lambda idx, values=values: values[idx].mean(), n_items, n_boot=500, seed=1)
        assert low <= values.mean() <= high
        widths.append(high - low)
    assert widths[1] < widths[0] / 2
    assert bootstrap_ci(lambda idx: values[idx].mean(), 500, n_boot=50, seed=3) == bootstrap_ci(
        lambda idx: values[idx].mean(), 500, n_boot=50, seed=3
    )
    assert all(math.isnan(v) for v in bootstrap_ci(lambda idx: math.nan, 5, n_boot=10))


def test_rank_auroc_matches_sklearn_with_ties():
    rng = np.random.default_rng(14)
    for _ in range(5):
        labels = rng.random(30) < 0.4
        scores = np.round(rng.random(30) + 0.3 * labels, 1)  # many ties
        assert rank_auroc(scores, labels) == pytest.approx(roc_auc_score(labels, scores))
    assert math.isnan(rank_auroc(np.ones(3), np.zeros(3)))


def test_volume_auroc_has_a_seeded_bootstrap_ci_over_volumes():
    def noisy(rng, label, mask):
        return np.where(mask, np.clip(0.6 * rng.random(mask.shape) + 0.03 * (label > 0), 0, 1), 0.0)

    evaluator = build_cohort(noisy)  # a weak lesion signal: volume AUROC between chance and 1
    volume = evaluator.summary(n_boot=200, seed=4)["volume"]
    scores = np.array([r.volume_score for r in evaluator.records])
    labels = np.array([r.is_lesion for r in evaluator.records])
    assert volume["auroc"] == pytest.approx(roc_auc_score(labels, scores))

    def sklearn_auroc(idx):
        return roc_auc_score(labels[idx], scores[idx]) if 0 < labels[idx].sum() < idx.size else math.nan

    assert volume["auroc_ci"] == pytest.approx(list(bootstrap_ci(sklearn_auroc, scores.size, 200, seed=4)))
    assert volume["auroc_ci"][0] < volume["auroc"] < volume["auroc_ci"][1]
    assert "bootstrap over volumes" in volume["ci_method"] and volume["reduction"] == "top_percentile"
    assert evaluator.summary(n_boot=200, seed=4)["volume"] == volume  # seeded
    assert "auroc_ci" not in evaluator.summary(n_boot=0)["volume"]


def test_bootstrap_histogram_metric_contains_pooled_value():
    rng = np.random.default_rng(10)
    histograms = [ScoreHistogram(100).update(*noisy_scores(rng, 500)) for _ in range(15)]
    pooled = sum(histograms)
    for name in ("average_precision", "auroc", "max_dice"):
        low, high = bootstrap_histogram_metric(histograms, name, n_boot=200)
        assert low <= pooled.metric(name) <= high
        assert high - low < 0.3
    low, high = bootstrap_histogram_metric(histograms, lambda h: h.n_pos, n_boot=50)
    assert low <= pooled.n_pos <= high


# ---------------------------------------------------------------------- cohort
def synthetic_volume(rng, lesion=True, shape=(16, 16, 10)):
    mask = np.zeros(shape, bool)
    mask[2:-2, 2:-2, 1:-1] = True
    label = np.zeros(shape, np.uint8)
    if lesion:
        x, y, z = rng.integers(3, 10), rng.integers(3, 10), rng.integers(2, 6)
        label[x : x + 3, y : y + 3, z : z + 3] = 1
    return label, mask


def perfect_heatmap(label, mask):
    heatmap = np.where(mask, 0.1, 0.0).astype(np.float32)
    heatmap[label > 0] = 0.9
    return heatmap[None]  # channel-first like the pipeline


def build_cohort(heatmap_fn, seed=11, n_bins=1000):
    rng = np.random.default_rng(seed)
    evaluator = CohortEvaluator(n_bins=n_bins, volume_reduction="top_percentile")
    for i in range(6):
        label, mask = synthetic_volume(rng)
        family = "tumour" if i < 3 else "stroke"
        heatmap = heatmap_fn(rng, label, mask)
        evaluator.add_volume(f"les{i}", heatmap, label[None], mask[None], family=family)
    for i in range(4):
        label, mask = synthetic_volume(rng, lesion=False)
        evaluator.add_volume(f"hc{i}", heatmap_fn(rng, label, mask), None, mask, family="healthy")
    return evaluator


def test_cohort_with_perfect_heatmap():
    evaluator = build_cohort(lambda rng, label, mask: perfect_heatmap(label, mask))
    summary = evaluator.summary(n_boot=50, target_fpr=0.01, threshold=0.5)
    json.dumps(summary, allow_nan=False)  # strict JSON
    assert summary["n_lesion_volumes"] == 6 and summary["n_healthy_volumes"] == 4
    pixel = summary["pixel"]
    assert pixel["ap"] == 1.0 and pixel["auroc"] == 1.0
    assert pixel["max_dice"]["dice"] == 1.0 and pixel["max_dice"]["ci"] == [1.0, 1.0]
    per_volume_dice = summary["dice_per_volume"]
    assert per_volume_dice["mean"] == 1.0 and per_volume_dice["std"] == 0.0
    assert per_volume_dice["n"] == 6
    assert per_volume_dice["threshold"] == pixel["max_dice"]["threshold"]
    assert summary["volume"]["auroc"] == 1.0 and summary["volume"]["n_neg"] == 4
    assert summary["volume"]["auroc_ci"] == [1.0, 1.0]
    assert summary["slice"]["auroc"] == 1.0
    at = summary["at_threshold"]
    assert at["dice"] == 1.0 and at["precision"] == 1.0 and at["recall"] == 1.0
    assert at["fpr_healthy"] == 0.0
    at_fpr = summary["at_target_fpr"]
    assert 0.1 < at_fpr["threshold"] <= 0.9 and at_fpr["fpr_healthy"] <= 0.01
    assert at_fpr["dice"] == 1.0
    families = summary["families"]
    assert set(families) == {"tumour", "stroke", "healthy"}
    assert families["tumour"]["pixel_ap"] == 1.0 and families["stroke"]["max_dice"] == 1.0
    assert families["healthy"]["pixel_ap"] is None  # no lesion voxels -> nan -> None

    rows = evaluator.per_volume(threshold=0.5)
    assert [r["subject"] for r in rows][:2] == ["les0", "les1"]
    assert rows[0]["dice"] == 1.0 and rows[0]["n_lesion_voxels"] == 27
    assert rows[0]["family"] == "tumour"
    assert rows[-1]["dice"] is None and rows[-1]["ap"] is None and rows[-1]["fpr"] == 0.0


# ---------------------------------------------------------------------- per-volume Dice, FPR operating point
def _column(voxels):
    """A volume (n, 1, 1) from (score, lesion, in brain) triples: heatmap, label, mask."""
    scores, lesion, brain = (np.array(v, dtype=float).reshape(-1, 1, 1) for v in zip(*voxels))
    return scores, lesion, brain


def _voxels(n, score, lesion=0, brain=1):
    return [(score, lesion, brain)] * n


def test_per_volume_dice_mean_and_std_over_lesion_volumes_by_hand():
    """Four lesion volumes of 16 brain voxels, scores 0.75 ("flagged") or 0.25, and a healthy one:
    Dice 1 (4 of 4 flagged, no false positive), 2 x 2 / (4 + 4) = 0.5, 2 x 1 / (2 + 6) = 0.25 and 0 (3
    lesion voxels, none flagged). Mean 0.4375, population std sqrt(35 / 256); the healthy volume is
    not a Dice volume. The pooled best threshold (TP 7, flagged 14, P 13: Dice 14 / 27, against
    26 / 77 flagging everything) is the lowest bin edge above 0.25 (0.3 with 10 bins), where the
    per-volume Dice are the same. Each volume's own best Dice: 1, 0.5, 0.25 and 6 / 19 (flag all)."""
    volumes = {
        "a": _voxels(4, 0.75, 1) + _voxels(12, 0.25),
        "b": _voxels(2, 0.75, 1) + _voxels(2, 0.25, 1) + _voxels(2, 0.75) + _voxels(10, 0.25),
        "c": _voxels(1, 0.75, 1) + _voxels(1, 0.25, 1) + _voxels(5, 0.75) + _voxels(9, 0.25),
        "d": _voxels(3, 0.25, 1) + _voxels(13, 0.25),
        "healthy": _voxels(3, 0.75) + _voxels(13, 0.25),
    }
    evaluator = CohortEvaluator(n_bins=10)
    for subject, voxels in volumes.items():
        scores, lesion, brain = _column(voxels)
        evaluator.add_volume(subject, scores, lesion, brain)
    summary = evaluator.summary(n_boot=0, threshold=0.5)
    at = summary["at_threshold"]["dice_per_volume"]
    assert at["n"] == 4 and at["threshold"] == 0.5
    assert at["mean"] == pytest.approx(0.4375) and at["std"] == pytest.approx(math.sqrt(35 / 256))
    assert summary["pixel"]["max_dice"]["dice"] == pytest.approx(14 / 27)
    assert summary["pixel"]["max_dice"]["threshold"] == pytest.approx(0.3)
    best = summary["dice_per_volume"]
    assert best["threshold"] == pytest.approx(0.3) and best["mean"] == pytest.approx(0.4375)
    assert [r["dice"] for r in evaluator.per_volume(0.5)] == pytest.approx([1.0, 0.5, 0.25, 0.0, None])
    assert summary["max_dice_per_volume"]["mean"] == pytest.approx((1 + 0.5 + 0.25 + 6 / 19) / 4)


def test_at_target_fpr_threshold_and_lesion_metrics_by_hand_with_tied_scores():
    """Healthy brain voxels (two volumes, 20 voxels): 10 at 0.05, 6 at 0.35, 3 tied at 0.65, 1 at
    0.95; a voxel outside a brain mask at 0.9 does not count. With 10 bins, edges 0.7 ... 0.9 flag
    1 / 20 = 0.05 and edges 0.4 ... 0.6 flag 4 / 20 = 0.2 (the three ties together): FPR 0.1 needs
    0.7, the smallest edge reaching it; FPR 0.2 (at most the target) is reached from 0.4. At 0.7 the lesion
    volumes (lesions 0.95 0.75 0.65 0.35 | 0.72 0.05; other brain voxels 0.85 0.65 6 x 0.05 | 0.99
    4 x 0.05) have TP 3, FP 2, P 6: precision 0.6, recall 0.5, Dice 6 / 11, FPR 2 / 13 on their
    healthy tissue; per volume Dice 4 / 7 and 2 / 4 (mean 15 / 28, std 1 / 28)."""
    evaluator = CohortEvaluator(n_bins=10)
    lesion_volumes = {
        "l1": [(s, 1, 1) for s in (0.95, 0.75, 0.65, 0.35)] + [(s, 0, 1) for s in (0.85, 0.65)] + _voxels(6, 0.05),
        "l2": [(0.72, 1, 1), (0.05, 1, 1), (0.99, 0, 1)] + _voxels(4, 0.05),
    }
    healthy_volumes = {
        "h1": _voxels(5, 0.05) + _voxels(3, 0.35) + _voxels(2, 0.65) + _voxels(1, 0.9, brain=0),
        "h2": _voxels(5, 0.05) + _voxels(3, 0.35) + _voxels(1, 0.65) + _voxels(1, 0.95),
    }
    for subject, voxels in {**lesion_volumes, **healthy_volumes}.items():
        scores, lesion, brain = _column(voxels)
        evaluator.add_volume(subject, scores, lesion if lesion.any() else None, brain)
    at = evaluator.summary(n_boot=0, target_fpr=0.1)["at_target_fpr"]
    assert at["target_fpr"] == 0.1
    assert at["threshold"] == pytest.approx(0.7) and at["threshold_used"] == pytest.approx(0.7)
    assert at["fpr_healthy"] == pytest.approx(0.05)
    assert at["precision"] == pytest.approx(0.6) and at["recall"] == pytest.approx(0.5)
    assert at["dice"] == pytest.approx(6 / 11) and at["fpr_lesion_volumes"] == pytest.approx(2 / 13)
    per_volume = at["dice_per_volume"]
    assert per_volume["n"] == 2 and per_volume["mean"] == pytest.approx(15 / 28)
    assert per_volume["std"] == pytest.approx(1 / 28)
    at = evaluator.summary(n_boot=0, target_fpr=0.2)["at_target_fpr"]
    assert at["threshold"] == pytest.approx(0.4) and at["fpr_healthy"] == pytest.approx(0.2)
    # at 0.4: TP 4 (0.95 0.75 0.65 | 0.72), FP 3 (0.85 0.65 | 0.99): Dice 8 / 13, precision 4 / 7, recall 4 / 6
    assert at["dice"] == pytest.approx(8 / 13) and at["precision"] == pytest.approx(4 / 7)
    assert at["recall"] == pytest.approx(4 / 6)


def test_cohort_with_random_heatmap_is_at_chance():
    def random_heatmap(rng, label, mask):
        return np.where(mask, rng.random(mask.shape), 0.0)

    rng = np.random.default_rng(12)
    evaluator = CohortEvaluator(n_bins=1000)
    for i in range(8):
        label, mask = synthetic_volume(rng, shape=(40, 40, 20))
        evaluator.add_volume(f"s{i}", random_heatmap(rng, label, mask), label, mask)
    summary = evaluator.summary(n_boot=0, target_fpr=0.01)
    pixel = summary["pixel"]
    assert pixel["auroc"] == pytest.approx(0.5, abs=0.05)
    lesion_fraction = pixel["n_pos"] / (pixel["n_pos"] + pixel["n_neg"])
    assert pixel["ap"] == pytest.approx(lesion_fraction, abs=0.02)
    assert "ap_ci" not in pixel
    # Only lesion volumes: no healthy class for volume detection or FPR calibration.
    assert summary["volume"]["auroc"] is None and "no negative" in summary["volume"]["reason"]
    assert "auroc_ci" not in summary["volume"]
    assert "no healthy volumes" in summary["at_target_fpr"]["reason"]
    rows = evaluator.per_volume()  # default: the pooled best-Dice threshold
    assert all(r["threshold"] == pixel["max_dice"]["threshold"] for r in rows)


def test_cohort_input_checks():
    rng = np.random.default_rng(13)
    label, mask = synthetic_volume(rng)
    evaluator = CohortEvaluator(n_bins=100)
    evaluator.add_volume("a", perfect_heatmap(label, mask), label, mask)
    with pytest.raises(ValueError, match="already added"):
        evaluator.add_volume("a", perfect_heatmap(label, mask), label, mask)
    with pytest.raises(ValueError, match="does not match"):
        evaluator.add_volume("b", perfect_heatmap(label, mask), label, mask[:-1])
    with pytest.raises(ValueError, match="no volumes"):
        CohortEvaluator().summary()


def test_plot_curves_writes_pngs(tmp_path):
    evaluator = build_cohort(lambda rng, label, mask: perfect_heatmap(label, mask), n_bins=100)
    paths = plot_curves(evaluator, tmp_path / "cohort", "synthetic")
    assert set(paths) == {"roc", "pr", "dice"}
    for path in paths.values():
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    hist_paths = plot_curves(evaluator.pooled_histogram(), tmp_path / "hist", "pooled")
    assert all(p.exists() for p in hist_paths.values())


def test_size_groups_per_volume_ci_and_saved_cohort(tmp_path):
    def noisy(rng, label, mask):
        return np.where(mask, np.clip(0.3 * rng.random(mask.shape) + 0.5 * (label > 0), 0, 1), 0.0)

    evaluator = build_cohort(noisy)
    for record, ml in zip(evaluator.lesion_records, (0.5, 0.9, 3.0, 12.0, 40.0, 5.0)):
        record.meta["lesion_ml"] = ml
    summary = evaluator.summary(n_boot=100, threshold=0.5)
    per_volume = summary["max_dice_per_volume"]
    dice = [r.histogram.max_dice().dice for r in evaluator.lesion_records]
    assert per_volume["mean"] == pytest.approx(np.mean(dice))
    assert per_volume["ci"][0] <= per_volume["mean"] <= per_volume["ci"][1] and "bootstrap" in per_volume["ci_method"]
    sizes = summary["sizes"]
    assert {k: v["n_lesion_volumes"] for k, v in sizes.items()} == {
        "small (<1 ml)": 2,
        "medium (1-10 ml)": 2,
        "large (>=10 ml)": 2,
    }
    assert sizes["large (>=10 ml)"]["lesion_ml_range"] == [12.0, 40.0]
    tumour = summary["families"]["tumour"]
    assert tumour["max_dice_per_volume"] == pytest.approx(np.mean(dice[:3]))
    assert 0.0 <= tumour["volume_auroc"] <= 1.0
    rows = evaluator.per_volume()
    assert rows[0]["lesion_ml"] == 0.5 and rows[0]["size_group"] == "small (<1 ml)"
    assert rows[-1]["size_group"] is None and rows[0]["max_dice"] == pytest.approx(dice[0])

    loaded = CohortEvaluator.load(evaluator.save(tmp_path / "cohort.npz"))
    assert loaded.summary(n_boot=100, threshold=0.5) == summary
    paths = plot_curves(
        {"a": loaded.pooled_histogram(), "b": evaluator.pooled_histogram()},
        tmp_path,
        prefix="x_",
        relative_thresholds=True,
    )
    assert paths["dice"].name == "x_dice.png" and paths["dice"].is_file()


@pytest.mark.parametrize(
    "ml, group",
    [
        (0.0, None),
        (None, None),
        (-1.0, None),
        (float("nan"), None),
        (0.999, "small (<1 ml)"),
        (1.0, "medium (1-10 ml)"),
        (9.999, "medium (1-10 ml)"),
        (10.0, "large (>=10 ml)"),
    ],
)
def test_size_group_boundaries_belong_to_the_larger_group(ml, group):
    from medanomaly.metrics import size_group

    assert size_group(ml) == group


def test_bootstrapped_pixel_ap_equals_a_brute_force_bootstrap_over_volumes():
    """Resampling volumes and re-summing their histograms gives the same percentile interval as
    resampling the volumes' voxels themselves and asking scikit-learn, draw for draw (same seed)."""
    rng = np.random.default_rng(3)
    volumes = []
    for _ in range(6):  # scores on bin centres of a 100-bin histogram: binning loses nothing
        scores = (rng.integers(0, 100, 400) + 0.5) / 100
        labels = rng.random(400) < 0.1 + 0.5 * scores * rng.random()
        volumes.append((scores, labels))
    histograms = [ScoreHistogram(n_bins=100).update(s, y) for s, y in volumes]
    ours = bootstrap_histogram_metric(histograms, "average_precision", n_boot=60, seed=11)

    draws = np.random.default_rng(11)
    values = []
    for _ in range(60):
        chosen = draws.integers(0, len(volumes), size=len(volumes))
        scores = np.concatenate([volumes[i][0] for i in chosen])
        labels = np.concatenate([volumes[i][1] for i in chosen])
        values.append(average_precision_score(labels, scores) if labels.any() else np.nan)
    values = np.asarray(values)[~np.isnan(values)]
    expected = np.quantile(values, [0.025, 0.975])
    np.testing.assert_allclose(ours, expected, atol=1e-9)


# ---------------------------------------------------------------------- error messages
def _two_volumes():
    evaluator = CohortEvaluator(n_bins=10)
    evaluator.add_volume("a", *_column(_voxels(2, 0.8, 1) + _voxels(2, 0.2)))
    return evaluator


@pytest.mark.parametrize(
    "call, error, message",
    [
        (lambda: ScoreHistogram(0), ValueError, "n_bins must be a positive integer, got 0."),
        (
            lambda: ScoreHistogram(value_range=(1.0, 1.0)),
            ValueError,
            "value_range must be finite with low < high, got (1.0, 1.0); "
            "pass the range the anomaly scores are expected to lie in.",
        ),
        (  # the cohort checks its binning when it is made, not at the first volume
            lambda: CohortEvaluator(value_range=(1.0, 0.0)),
            ValueError,
            "value_range must be finite with low < high, got (1.0, 0.0); "
            "pass the range the anomaly scores are expected to lie in.",
        ),
        (
            lambda: ScoreHistogram().update(np.zeros(3), np.zeros(4)),
            ValueError,
            "scores (shape (3,)) and labels (shape (4,)) must have the same number of voxels; "
            "resample the label onto the heatmap grid.",
        ),
        (
            lambda: ScoreHistogram().update(np.zeros(4), np.zeros(4), np.ones(3)),
            ValueError,
            "mask (shape (3,)) must have as many voxels as scores (shape (4,)).",
        ),
        (
            lambda: ScoreHistogram().update(np.array([np.nan]), np.zeros(1)),
            ValueError,
            "scores contain NaN; fix the anomaly map before evaluating.",
        ),
        (lambda: ScoreHistogram().merge(3), TypeError, "can only merge a ScoreHistogram, got int."),
        (
            lambda: ScoreHistogram.from_counts([1, 2, 3], [1, 2]),
            ValueError,
            "pos_counts and neg_counts must be 1D arrays of equal length.",
        ),
        (
            lambda: ScoreHistogram.from_counts(np.ones((2, 2)), np.ones((2, 2))),
            ValueError,
            "pos_counts and neg_counts must be 1D arrays of equal length.",
        ),
        (
            lambda: ScoreHistogram(4).update([0.5], [1]).dice_at(math.nan),
            ValueError,
            "threshold is nan; pass a finite threshold or inf.",
        ),
        (
            lambda: ScoreHistogram(4).update([0.5], [0]).threshold_at_fpr(1.5),
            ValueError,
            "target_fpr must lie in [0, 1], got 1.5.",
        ),
        (
            lambda: ScoreHistogram(4).update([0.5], [1]).threshold_at_fpr(0.1),
            ValueError,
            "threshold_at_fpr needs negative voxels; the histogram has none.",
        ),
        (
            lambda: ScoreHistogram(4).metric("dice"),
            ValueError,
            "unknown metric 'dice'; choose one of ('average_precision', 'auroc', 'max_dice').",
        ),
        (lambda: detection_metrics([0.1, 0.2, 0.3], [0, 1]), ValueError, "got 3 scores but 2 labels."),
        (
            lambda: detection_metrics([0.1, np.nan], [0, 1]),
            ValueError,
            "scores contain NaN; every item needs a finite score.",
        ),
        (
            lambda: slice_scores_and_labels(np.zeros((2, 2)), None),
            ValueError,
            "heatmap must be a 3D volume (X, Y, Z) or (1, X, Y, Z), got shape (2, 2).",
        ),
        (
            lambda: slice_scores_and_labels(np.zeros((2, 2, 3)), np.zeros((2, 2))),
            ValueError,
            "label must be a 3D volume (X, Y, Z) or (1, X, Y, Z), got shape (2, 2).",
        ),
        (
            lambda: slice_scores_and_labels(np.zeros((2, 2, 3)), np.zeros((2, 2, 2))),
            ValueError,
            "label shape (2, 2, 2) does not match heatmap shape (2, 2, 3).",
        ),
        (
            lambda: slice_scores_and_labels(np.zeros((2, 2, 3)), None, np.zeros((2, 3))),
            ValueError,
            "mask must be a 3D volume (X, Y, Z) or (1, X, Y, Z), got shape (2, 3).",
        ),
        (
            lambda: slice_scores_and_labels(np.zeros((2, 2, 3)), None, axis=3),
            ValueError,
            "axis 3 is not an axis of a 3D volume; use -1 for axial.",
        ),
        (
            lambda: slice_scores_and_labels(np.zeros((2, 2, 3)), None, axis=-4),
            ValueError,
            "axis -4 is not an axis of a 3D volume; use -1 for axial.",
        ),
        (
            lambda: volume_score(np.zeros((2, 2))),
            ValueError,
            "heatmap must be a 3D volume (X, Y, Z) or (1, X, Y, Z), got shape (2, 2).",
        ),
        (
            lambda: volume_score(np.zeros((2, 2, 2)), np.zeros((2, 2, 2))),
            ValueError,
            "the brain mask is empty; check the mask of this volume.",
        ),
        (
            lambda: volume_score(np.zeros((2, 2, 2)), reduction="max"),
            ValueError,
            "unknown volume reduction 'max'; use 'mean' or 'top_percentile'.",
        ),
        (lambda: bootstrap_ci(np.mean, 0), ValueError, "bootstrap_ci needs at least one item."),
        (lambda: bootstrap_ci(np.mean, 3, alpha=0.0), ValueError, "alpha must lie in (0, 1), got 0.0."),
        (lambda: bootstrap_ci(np.mean, 3, alpha=1.0), ValueError, "alpha must lie in (0, 1), got 1.0."),
        (lambda: bootstrap_ci(np.mean, 3, alpha=1.5), ValueError, "alpha must lie in (0, 1), got 1.5."),
        (
            lambda: bootstrap_histogram_metric([], "auroc"),
            ValueError,
            "bootstrap_histogram_metric needs at least one volume histogram.",
        ),
        (  # every histogram is checked against the first, whose range the resamples use
            lambda: bootstrap_histogram_metric([ScoreHistogram(4, (0.0, 2.0)), ScoreHistogram(4)], "auroc"),
            ValueError,
            "cannot merge histograms with different bins: 4 bins over (0.0, 2.0) vs 4 over (0.0, 1.0).",
        ),
        (
            lambda: bootstrap_histogram_metric([ScoreHistogram(4)] * 2 + [ScoreHistogram(5)], "auroc"),
            ValueError,
            "cannot merge histograms with different bins: 4 bins over (0.0, 1.0) vs 5 over (0.0, 1.0).",
        ),
        (
            lambda: _two_volumes().add_volume("a", *_column(_voxels(4, 0.5))),
            ValueError,
            "subject 'a' was already added; give each volume a unique id (e.g. subject_session).",
        ),
        (
            lambda: _two_volumes().add_volume("b", np.zeros((4, 4)), None, None),
            ValueError,
            "heatmap must be a 3D volume (X, Y, Z) or (1, X, Y, Z), got shape (4, 4).",
        ),
        (
            lambda: _two_volumes().add_volume("b", np.zeros((4, 4, 1)), np.zeros((4, 4)), None),
            ValueError,
            "label must be a 3D volume (X, Y, Z) or (1, X, Y, Z), got shape (4, 4).",
        ),
        (lambda: CohortEvaluator().summary(), ValueError, "no volumes added; call add_volume before summary."),
    ],
)
def test_errors_say_exactly_what_is_wrong(call, error, message):
    with pytest.raises(error, match=f"^{re.escape(message)}$"):
        call()


# ---------------------------------------------------------------------- histogram details
def test_default_binning_reductions_and_percentiles():
    evaluator = CohortEvaluator()
    settings = ("n_bins", "value_range", "volume_reduction", "slice_reduction", "volume_percentile", "slice_percentile")
    assert [getattr(evaluator, name) for name in settings] == [10000, (0.0, 1.0), "mean", "top_percentile", 99.0, 99.0]
    assert ScoreHistogram().n_bins == 10000


def test_a_single_bin_histogram_ties_everything_and_counts_stay_integers():
    hist = ScoreHistogram(1).update([0.2, 0.7], [0, 1])
    assert hist.auroc() == 0.5 and hist.average_precision() == 0.5
    assert hist.pos_counts.dtype == hist.neg_counts.dtype == np.int64


def test_updates_accumulate_and_the_ends_of_the_range_are_not_clipped():
    hist = ScoreHistogram(4).update(np.array([0.0, 0.3]), np.array([1, 0]))
    hist.update(np.array([1.0, 0.6]), np.array([1, 1]))
    np.testing.assert_array_equal(hist.pos_counts, [1, 0, 1, 1])
    np.testing.assert_array_equal(hist.neg_counts, [0, 1, 0, 0])
    assert hist.n_clipped == 0


def test_bin_index_corrects_a_score_rounded_into_the_next_bin():
    # With 3 bins over (-1, 3) the arithmetic puts the float just below edge 1 into bin 1.
    hist = ScoreHistogram(3, (-1.0, 3.0))
    below = np.nextafter(hist.edges[1], -np.inf)
    assert hist.bin_index(np.array([below, hist.edges[1]])).tolist() == [0, 1]


def test_roc_thresholds_are_the_lower_edges_of_the_non_empty_bins_from_inf_down():
    hist = ScoreHistogram(8).update(np.array([0.1, 0.3, 0.6, 0.6, 0.9]), np.array([0, 1, 0, 1, 1]))
    np.testing.assert_array_equal(hist.roc_curve()[2], [np.inf, 0.875, 0.5, 0.25, 0.0])


def test_metrics_with_a_single_lesion_voxel_or_a_single_healthy_voxel():
    one_lesion = ScoreHistogram(10).update([0.2, 0.8, 0.5], [0, 1, 0])
    assert one_lesion.auroc() == one_lesion.average_precision() == one_lesion.max_dice().dice == 1.0
    assert ScoreHistogram(10).update([0.2, 0.8, 0.5], [0, 1, 1]).auroc() == 1.0


@pytest.mark.filterwarnings("error")  # 0 / 0 conventions, not numpy's "invalid value" warnings
def test_degenerate_histograms_give_nan_silently():
    no_lesion = ScoreHistogram(10).update([0.2, 0.7], [0, 0])
    best = no_lesion.max_dice()
    assert math.isnan(best.dice) and math.isnan(best.threshold) and math.isnan(best.upper_bound)
    nothing = no_lesion.dice_at(0.9)
    assert math.isnan(nothing["dice"]) and math.isnan(nothing["precision"]) and math.isnan(nothing["recall"])
    no_negative = ScoreHistogram(10).update([0.2, 0.7], [1, 1])
    assert math.isnan(no_negative.auroc()) and math.isnan(no_negative.dice_at(0.5)["fpr"])


def test_histograms_add_to_histograms_and_to_zero_only():
    hist = ScoreHistogram(4).update([0.1], [1])
    assert (0 + hist).n_pos == 1
    with pytest.raises(TypeError):
        5 + hist


def test_from_counts_keeps_integer_counts_and_the_range_and_never_warns(caplog):
    hist = ScoreHistogram.from_counts([1.0, 0.0, 2.0, 0.0], [3.0, 1.0, 0.0, 0.0], value_range=(-1.0, 1.0))
    assert hist.value_range == (-1.0, 1.0)
    np.testing.assert_array_equal(hist.edges, [-1.0, -0.5, 0.0, 0.5, 1.0])
    assert hist.pos_counts.dtype == hist.neg_counts.dtype == np.int64
    hist.n_clipped = 4  # as restored from a saved cohort: summing such histograms stays quiet
    with caplog.at_level(logging.WARNING, logger="medanomaly.metrics"):
        assert (hist + hist).n_clipped == 8
    assert not caplog.records


def test_histogram_clip_warning_says_how_many_and_fires_above_one_in_a_thousand(caplog):
    with caplog.at_level(logging.WARNING, logger="medanomaly.metrics"):
        ScoreHistogram(10).update(np.where(np.arange(1000) < 1, 1.5, 0.5), np.zeros(1000))
        assert not caplog.records  # exactly 0.1 %
        warned = ScoreHistogram(10).update(np.array([-1.0, 0.5, 2.0, 0.5]), np.array([1, 0, 0, 0]))
        assert caplog.messages == [
            "2 of 4 scores (50.00%) lie outside value_range (0.0, 1.0) and were clipped into the edge bins; "
            "widen value_range for exact curves."
        ]
        caplog.clear()
        clipped = ScoreHistogram(10, warn_clipped=False).update(np.array([2.0]), np.zeros(1))
        warned + clipped  # the sum was warned about already
        clipped + clipped  # and a quiet histogram stays quiet
    assert not caplog.records


def test_threshold_at_fpr_warning_names_the_range_and_the_target(caplog):
    hist = ScoreHistogram(10, (0.0, 2.0)).update(np.full(5, 2.0), np.zeros(5))
    with caplog.at_level(logging.WARNING, logger="medanomaly.metrics"):
        assert hist.threshold_at_fpr(0.0) == math.inf
    assert caplog.messages == ["No threshold inside value_range (0.0, 2.0) reaches FPR <= 0; returning inf."]


def test_tensors_requiring_grad_or_carrying_metadata_are_read_as_numpy():
    class MetaLike(torch.Tensor):  # like MONAI's MetaTensor, without importing MONAI
        def as_tensor(self):
            return self.as_subclass(torch.Tensor)

    scores = torch.tensor([0.2, 0.7], requires_grad=True)
    labels = torch.tensor([0, 1]).as_subclass(MetaLike)
    assert ScoreHistogram(10).update(scores, labels).auroc() == 1.0


# ---------------------------------------------------------------------- items, slices, volumes
def test_detection_metrics_flattens_2d_inputs():
    scores, labels = np.array([[0.1, 0.4], [0.35, 0.8]]), np.array([[0, 0], [1, 1]])
    assert detection_metrics(scores, labels) == detection_metrics(scores.ravel(), labels.ravel())


@pytest.mark.filterwarnings("error")  # a missing class is nan by convention, not by a 0 / 0
def test_rank_auroc_with_one_item_per_class_or_a_missing_class():
    assert rank_auroc(np.array([0.2, 0.8]), np.array([0, 1])) == 1.0
    assert rank_auroc(np.array([0.2, 0.8]), np.array([1, 0])) == 0.0
    assert math.isnan(rank_auroc(np.ones(3), np.ones(3)))


def test_slice_scores_axes_defaults_healthy_label_and_empty_mask():
    heatmap = np.arange(400.0).reshape(2, 10, 20)  # slice i along axis 0 holds 200 i ... 200 i + 199
    scores, labels = slice_scores_and_labels(heatmap, None, axis=-3)  # no label: a healthy volume
    np.testing.assert_array_equal(scores, [198.5, 398.5])  # default: mean of the top 1 %, the two largest
    assert labels.tolist() == [0, 0] and labels.dtype == np.int64
    half, _ = slice_scores_and_labels(heatmap, None, axis=0, percentile=50.0)
    np.testing.assert_array_equal(half, [149.5, 349.5])
    maxima, _ = slice_scores_and_labels(heatmap, None, axis=2, reduction="max")
    np.testing.assert_array_equal(maxima, 380.0 + np.arange(20))
    scores, labels = slice_scores_and_labels(heatmap, None, np.zeros(heatmap.shape))
    assert scores.shape == labels.shape == (0,) and scores.dtype == np.float64 and labels.dtype == np.int64


def test_volume_score_defaults_and_percentile():
    heatmap = np.arange(400.0).reshape(2, 10, 20)
    assert volume_score(heatmap) == 199.5  # no mask: every voxel, mean
    assert volume_score(heatmap, None, "top_percentile") == 397.5  # top 1 %: the four largest
    assert volume_score(heatmap, None, "top_percentile", 50.0) == 299.5
    assert top_percentile_mean(np.arange(200.0)) == 198.5
    assert volume_score(np.ones((1, 4, 5))) == 1.0  # one voxel thick along x, not a channel axis


# ---------------------------------------------------------------------- bootstrap defaults
def test_bootstrap_ci_defaults_draw_1000_resamples_from_seed_0():
    drawn = []

    def total(indices):
        drawn.append(indices)
        return float(indices.sum())

    low, high = bootstrap_ci(total, 7)
    rng = np.random.default_rng(0)
    expected = [rng.integers(0, 7, size=7) for _ in range(1000)]
    np.testing.assert_array_equal(drawn, expected)
    assert (low, high) == tuple(np.quantile([e.sum() for e in expected], [0.025, 0.975]))
    assert bootstrap_ci(lambda indices: 3.0, 1, n_boot=4) == (3.0, 3.0)  # one item is enough


def test_bootstrap_ci_logs_how_many_resamples_gave_nan(caplog):
    def mean_without_item_0(indices):
        return math.nan if 0 in indices else float(indices.mean())

    with caplog.at_level(logging.DEBUG, logger="medanomaly.metrics"):
        bootstrap_ci(lambda indices: float(indices.mean()), 4, n_boot=10, seed=2)
        assert not caplog.records
        bootstrap_ci(mean_without_item_0, 4, n_boot=10, seed=2)
    rng = np.random.default_rng(2)
    n_nan = sum(0 in rng.integers(0, 4, size=4) for _ in range(10))
    assert 0 < n_nan < 10
    assert caplog.messages == [f"bootstrap: {n_nan} of 10 resamples gave nan"]


def test_bootstrap_histogram_metric_defaults_and_resampled_histograms():
    """Each resample re-sums the drawn volumes' histograms (on their value range): with one lesion
    voxel count per volume, the metric n_pos sees exactly the brute-force sums of the draws."""
    sizes = np.array([1, 2, 4])
    histograms = [ScoreHistogram(4, (0.0, 2.0)).update(np.full(n, 1.5), np.ones(n)) for n in sizes]
    seen = []

    def n_pos(hist):
        seen.append((hist.value_range, hist.n_pos))
        return hist.n_pos

    def brute_force(n_boot, seed):
        rng = np.random.default_rng(seed)
        return [sizes[rng.integers(0, 3, size=3)].sum() for _ in range(n_boot)]

    expected = brute_force(1000, 0)  # defaults: 1000 resamples, seed 0, 95 %
    assert bootstrap_histogram_metric(histograms, n_pos) == tuple(np.quantile(expected, [0.025, 0.975]))
    assert seen == [((0.0, 2.0), n) for n in expected]
    low_high = bootstrap_histogram_metric(histograms, n_pos, n_boot=50, alpha=0.5, seed=3)
    assert low_high == tuple(np.quantile(brute_force(50, 3), [0.25, 0.75]))


# ---------------------------------------------------------------------- cohort details
def test_add_volume_keeps_the_cohort_settings_and_the_axis_family_and_meta():
    rng = np.random.default_rng(1)
    heatmap = 2.0 * rng.random((4, 3, 5))
    mask = np.ones(heatmap.shape, bool)
    mask[:, 0] = False
    heatmap[~mask] = 1.99  # outside the brain: must not move any score
    label = np.zeros(heatmap.shape)
    label[1, 1:, 2] = 1
    evaluator = CohortEvaluator(
        n_bins=8,
        value_range=(0.0, 2.0),
        volume_reduction="top_percentile",
        volume_percentile=50.0,
        slice_percentile=50.0,
    )
    record = evaluator.add_volume("s1", heatmap, label, mask, axis=0, family="f", meta={"lesion_ml": 1.5})
    assert (record.subject, record.family, record.meta) == ("s1", "f", {"lesion_ml": 1.5})
    assert record.volume_score == volume_score(heatmap, mask, "top_percentile", 50.0)
    scores, labels = slice_scores_and_labels(heatmap, label, mask, axis=0, percentile=50.0)
    np.testing.assert_array_equal(record.slice_scores, scores)
    np.testing.assert_array_equal(record.slice_labels, labels)
    expected = ScoreHistogram(8, (0.0, 2.0)).update(heatmap, label, mask)
    assert record.histogram.value_range == (0.0, 2.0)
    np.testing.assert_array_equal(record.histogram.pos_counts, expected.pos_counts)
    np.testing.assert_array_equal(record.histogram.neg_counts, expected.neg_counts)


def test_cohort_warns_once_when_more_than_one_in_a_thousand_scores_were_clipped(caplog):
    """Cumulative over the cohort: 1 of 1000 is not more than 0.1 %, 2 of 1999 is; the warning
    names the volume that tipped it, and neither per-volume histograms nor pooling warn again."""

    def column(n, n_clipped):
        return np.where(np.arange(n) < n_clipped, 2.5, 0.5).reshape(-1, 1, 1)

    evaluator = CohortEvaluator(n_bins=10, value_range=(0.0, 2.0))
    with caplog.at_level(logging.WARNING, logger="medanomaly.metrics"):
        for subject, n, n_clipped, n_warnings in (
            ("a", 100, 0, 0),
            ("b", 900, 1, 0),
            ("c", 999, 1, 1),
            ("d", 10, 5, 1),
        ):
            evaluator.add_volume(subject, column(n, n_clipped), None, None)
            assert len(caplog.records) == n_warnings, subject
        assert caplog.messages == [
            "2 of 1999 scores so far lie outside value_range (0.0, 2.0) and were clipped into the edge bins "
            "(first seen up to subject 'c'); widen value_range."
        ]
        caplog.clear()
        assert evaluator.pooled_histogram(evaluator.records).n_clipped == 7
    assert not caplog.records


def _per_volume_cohort():
    """A lesion volume (lesion voxels at 0.75 and 0.25, healthy ones too, one voxel outside the brain)
    and a healthy one; 10 bins."""
    evaluator = CohortEvaluator(n_bins=10)
    lesion = [(0.75, 1, 1), (0.75, 0, 1), (0.25, 1, 1), (0.25, 0, 1), (0.25, 0, 0)]
    meta = {"lesion_ml": 2, "spacing": np.array([1.0, 2.0]), "flag": np.bool_(True)}
    evaluator.add_volume("les", *_column(lesion), family="x", meta=meta)
    evaluator.add_volume("hc", *_column([(0.75, 0, 1)] + _voxels(3, 0.25)))
    return evaluator


def test_per_volume_rows_by_hand():
    """At 0.5 the lesion volume flags 1 of its 2 lesion voxels and 1 of its 2 healthy ones: Dice 2 / 4,
    FPR 1 / 2; AP 1 / 2 (the 0.75 pair is tied); its best Dice, 2 x 2 / 6, flags everything."""
    rows = _per_volume_cohort().per_volume(0.5)
    assert rows == [
        {
            "subject": "les",
            "family": "x",
            "n_brain_voxels": 4,
            "n_lesion_voxels": 2,
            "threshold": 0.5,
            "dice": 0.5,
            "fpr": 0.5,
            "ap": 0.5,
            "volume_score": 0.5,
            "max_dice": 2 / 3,
            "lesion_ml": 2.0,
            "size_group": "medium (1-10 ml)",
            "n_slices": 1,
            "n_lesion_slices": 1,
            "meta": {"lesion_ml": 2, "spacing": [1.0, 2.0], "flag": True},
        },
        {
            "subject": "hc",
            "family": None,
            "n_brain_voxels": 4,
            "n_lesion_voxels": 0,
            "threshold": 0.5,
            "dice": None,
            "fpr": 0.25,
            "ap": None,
            "volume_score": 0.375,
            "max_dice": None,
            "lesion_ml": None,
            "size_group": None,
            "n_slices": 1,
            "n_lesion_slices": 0,
            "meta": {},
        },
    ]


def test_per_volume_at_a_nan_threshold_has_no_dice_or_fpr():
    rows = _per_volume_cohort().per_volume(math.nan)
    assert [(r["threshold"], r["dice"], r["fpr"]) for r in rows] == [(None, None, None)] * 2
    healthy_only = CohortEvaluator(n_bins=10)
    healthy_only.add_volume("hc", *_column(_voxels(4, 0.25)))
    row = healthy_only.per_volume()[0]  # no lesion: the default (best-Dice) threshold is nan
    assert (row["threshold"], row["dice"], row["fpr"]) == (None, None, None)


def _small_cohort(**settings):
    """Two lesion volumes (4 and 2 brain slices) and a healthy one with a clipped voxel, on [0, 2]."""
    rng = np.random.default_rng(0)
    evaluator = CohortEvaluator(n_bins=8, value_range=(0.0, 2.0), **settings)
    for subject, family, brain_slices in (("l1", "tumour", slice(None)), ("l2", "stroke", slice(1, 3))):
        heatmap, label, mask = 2.0 * rng.random((3, 3, 4)), np.zeros((3, 3, 4)), np.zeros((3, 3, 4))
        mask[..., brain_slices] = 1
        label[1, 1, 1:3] = 1
        meta = {"lesion_ml": 0.5, "spacing": np.array([1.0, 2.0]), "flag": np.bool_(True)} if subject == "l1" else {}
        evaluator.add_volume(subject, heatmap, label, mask, family=family, meta=meta)
    healthy = rng.random((3, 3, 4))
    healthy[0, 0, 0] = 2.5
    evaluator.add_volume("h1", healthy, None, None)
    return evaluator


def test_saved_cohort_loads_back_every_setting_and_record(tmp_path):
    evaluator = _small_cohort(
        volume_reduction="top_percentile", slice_reduction="max", volume_percentile=90.0, slice_percentile=95.0
    )
    loaded = CohortEvaluator.load(evaluator.save(tmp_path / "new" / "dir" / "cohort.npz"))
    settings = ("n_bins", "value_range", "volume_reduction", "slice_reduction", "volume_percentile", "slice_percentile")
    assert [getattr(loaded, name) for name in settings] == [8, (0.0, 2.0), "top_percentile", "max", 90.0, 95.0]
    assert [(r.subject, r.family) for r in loaded.records] == [("l1", "tumour"), ("l2", "stroke"), ("h1", None)]
    assert loaded.records[0].meta == {"lesion_ml": 0.5, "spacing": [1.0, 2.0], "flag": True}
    for saved, back in zip(evaluator.records, loaded.records):
        assert back.volume_score == saved.volume_score
        for name in ("slice_scores", "slice_labels"):
            np.testing.assert_array_equal(getattr(back, name), getattr(saved, name))
            assert getattr(back, name).dtype == getattr(saved, name).dtype
        np.testing.assert_array_equal(back.histogram.pos_counts, saved.histogram.pos_counts)
        np.testing.assert_array_equal(back.histogram.neg_counts, saved.histogram.neg_counts)
        assert (back.histogram.n_clipped, back.histogram.value_range) == (saved.histogram.n_clipped, (0.0, 2.0))
    assert [r.slice_scores.size for r in loaded.records] == [4, 2, 4]
    assert loaded.records[2].histogram.n_clipped == 1
    assert loaded.summary(n_boot=0) == evaluator.summary(n_boot=0)


def test_cohort_files_without_a_slice_percentile_load_with_the_default_and_pickles_are_refused(tmp_path):
    path = _small_cohort(slice_percentile=95.0).save(tmp_path / "cohort.npz")
    with np.load(path) as data:
        fields = dict(data)
    np.savez_compressed(tmp_path / "old.npz", **{k: v for k, v in fields.items() if k != "slice_percentile"})
    assert CohortEvaluator.load(tmp_path / "old.npz").slice_percentile == 99.0
    np.savez(tmp_path / "pickled.npz", **{**fields, "meta": np.array([{"a": 1}] * 3, dtype=object)})
    with pytest.raises(ValueError, match="allow_pickle"):
        CohortEvaluator.load(tmp_path / "pickled.npz")


def weak_heatmap(rng, label, mask):
    return np.where(mask, np.clip(0.6 * rng.random(mask.shape) + 0.25 * (label > 0), 0, 1), 0.0)


def test_summary_fields_and_bootstrap_cis_follow_n_boot_alpha_and_seed():
    evaluator = build_cohort(weak_heatmap, n_bins=100)
    summary = evaluator.summary(n_boot=20, alpha=0.2, seed=4)
    lesion = evaluator.lesion_records
    pooled = evaluator.pooled_histogram()
    best = pooled.max_dice()

    def pixel_ci(metric):
        return list(bootstrap_histogram_metric([r.histogram for r in lesion], metric, 20, 0.2, 4))

    assert summary["pixel"] == {
        "n_volumes": 6,
        "n_pos": pooled.n_pos,
        "n_neg": pooled.n_neg,
        "n_clipped": 0,
        "ap": pooled.average_precision(),
        "auroc": pooled.auroc(),
        "max_dice": {
            "dice": best.dice,
            "threshold": best.threshold,
            "upper_bound": best.upper_bound,
            "binning_error": best.binning_error,
            "ci": pixel_ci("max_dice"),
        },
        "ap_ci": pixel_ci("average_precision"),
        "auroc_ci": pixel_ci("auroc"),
    }
    dice = np.array([r.histogram.max_dice().dice for r in lesion])
    assert summary["max_dice_per_volume"] == {
        "mean": np.mean(dice),
        "std": np.std(dice),
        "n": 6,
        "ci": list(bootstrap_ci(lambda idx: float(dice[idx].mean()), 6, 20, 0.2, 4)),
        "ci_method": "percentile bootstrap over volumes (20 resamples, seed 4)",
    }
    tumour = [r for r in lesion if r.family == "tumour"]
    tumour_pool = evaluator.pooled_histogram(tumour)
    tumour_best = tumour_pool.max_dice()
    versus = tumour + evaluator.healthy_records
    assert summary["families"]["tumour"] == {
        "n_volumes": 3,
        "n_lesion_volumes": 3,
        "pixel_ap": tumour_pool.average_precision(),
        "pixel_auroc": tumour_pool.auroc(),
        "max_dice": tumour_best.dice,
        "max_dice_threshold": tumour_best.threshold,
        "max_dice_upper_bound": tumour_best.upper_bound,
        "max_dice_per_volume": np.mean(dice[:3]),
        "volume_auroc": roc_auc_score([r.is_lesion for r in versus], [r.volume_score for r in versus]),
    }
    assert (summary["n_volumes"], summary["n_bins"], summary["value_range"]) == (10, 100, [0.0, 1.0])
    assert summary["volume"]["percentile"] == 99.0

    one = evaluator.summary(n_boot=1)  # one resample is a bootstrap too
    pixel = one["pixel"]
    assert "ci" in one["max_dice_per_volume"] and "auroc_ci" in one["volume"]
    assert "ap_ci" in pixel and "auroc_ci" in pixel and "ci" in pixel["max_dice"]
    assert "ci" not in evaluator.summary(n_boot=0)["max_dice_per_volume"]


def test_summary_defaults_to_1000_resamples_with_seed_0():
    evaluator = CohortEvaluator(n_bins=10)
    for subject in ("l1", "l2"):  # lesion volumes only: no volume-level bootstrap, faster
        evaluator.add_volume(subject, *_column(_voxels(2, 0.8, 1) + _voxels(2, 0.2)))
    method = "percentile bootstrap over volumes (1000 resamples, seed 0)"
    assert evaluator.summary()["max_dice_per_volume"]["ci_method"] == method


@pytest.mark.filterwarnings("error")  # empty pools are nan by convention, not numpy's empty-mean warning
def test_summary_without_lesion_volumes_has_empty_dice_statistics():
    evaluator = CohortEvaluator(n_bins=10)
    for subject in ("h1", "h2"):
        evaluator.add_volume(subject, *_column(_voxels(3, 0.2) + _voxels(1, 0.8)))
    summary = evaluator.summary(n_boot=5, threshold=0.5)
    assert summary["dice_per_volume"] == {"mean": None, "std": None, "n": 0, "threshold": None}
    assert summary["at_threshold"]["dice_per_volume"] == {"mean": None, "std": None, "n": 0, "threshold": 0.5}
    assert summary["max_dice_per_volume"] == {"mean": None, "std": None, "n": 0}


def test_summary_without_healthy_volumes_has_no_volume_ci_and_no_fpr_threshold():
    evaluator = CohortEvaluator(n_bins=10)
    for subject in ("l1", "l2"):
        evaluator.add_volume(subject, *_column(_voxels(2, 0.8, 1) + _voxels(2, 0.2)))
    summary = evaluator.summary(n_boot=5, target_fpr=0.1)
    assert "auroc_ci" not in summary["volume"] and "no negative" in summary["volume"]["reason"]
    assert summary["at_target_fpr"] == {"target_fpr": 0.1, "reason": "no healthy volumes to calibrate a threshold on"}


# ---------------------------------------------------------------------- figures
@pytest.fixture
def saved_figures(monkeypatch):
    """The figures plot_curves would save, by file name, with savefig's keywords; nothing is rendered
    (no layout pass, no PNG: test_plot_curves_writes_pngs writes real files), which keeps these fast."""
    from matplotlib.figure import Figure

    saved = {}

    def record(figure, path, **kwargs):
        saved[Path(path).name] = figure
        figure.savefig_kwargs = kwargs

    monkeypatch.setattr(Figure, "savefig", record)
    monkeypatch.setattr(Figure, "tight_layout", lambda figure: None)
    return saved


def hand_histogram(low=0.0, high=1.0):
    """The hand-computed example on 4 bins over [low, high]: AUROC 5 / 9, AP 8 / 15, best Dice 3 / 4."""
    scores = low + (high - low) * np.array([0.1, 0.3, 0.6, 0.6, 0.9, 0.9])
    labels = np.array([0, 1, 0, 1, 1, 0])
    return ScoreHistogram(4, (low, high)).update(scores, labels), scores, labels


def test_plot_curves_draws_each_curve_with_axis_labels_legend_and_title(tmp_path, saved_figures):
    from matplotlib.font_manager import FontProperties

    hist, scores, labels = hand_histogram()
    paths = plot_curves(hist, tmp_path, "synthetic")
    assert paths == {kind: tmp_path / f"{kind}.png" for kind in ("roc", "pr", "dice")}
    small = FontProperties(size="small").get_size_in_points()
    expected = {
        "roc": ("false-positive rate", "true-positive rate", "synthetic ROC", "all (AUROC 0.556)"),
        "pr": ("recall", "precision", "synthetic PR", "all (AP 0.533)"),
        "dice": ("threshold", "Dice", "synthetic DICE", "all (max 0.750)"),
    }
    for kind, (xlabel, ylabel, title, legend) in expected.items():
        figure = saved_figures[f"{kind}.png"]
        assert tuple(figure.get_size_inches()) == (5, 4.5) and figure.savefig_kwargs == {"dpi": 120}
        axes = figure.axes[0]
        assert (axes.get_xlabel(), axes.get_ylabel(), axes.get_title()) == (xlabel, ylabel, title)
        assert [(t.get_text(), t.get_fontsize()) for t in axes.get_legend().get_texts()] == [(legend, small)]

    curve, chance = saved_figures["roc.png"].axes[0].get_lines()
    fpr, tpr, _ = roc_curve(labels, scores, drop_intermediate=False)
    np.testing.assert_allclose(curve.get_xydata(), np.column_stack([fpr, tpr]))
    assert curve.get_drawstyle() == "default"
    np.testing.assert_array_equal(chance.get_xydata(), [[0, 0], [1, 1]])
    assert (chance.get_color(), chance.get_linestyle(), chance.get_linewidth()) == ("grey", ":", 1)
    (curve,) = saved_figures["pr.png"].axes[0].get_lines()
    precision, recall, _ = precision_recall_curve(labels, scores)
    np.testing.assert_allclose(curve.get_xydata(), np.column_stack([recall, precision]))
    assert curve.get_drawstyle() == "steps-post"
    (curve,) = saved_figures["dice.png"].axes[0].get_lines()
    np.testing.assert_allclose(curve.get_xydata(), [[0, 6 / 9], [0.25, 6 / 8], [0.5, 4 / 7], [0.75, 2 / 5]])
    assert curve.get_drawstyle() == "default"


def test_plot_curves_defaults_and_relative_thresholds(tmp_path, saved_figures):
    hist, _, _ = hand_histogram(-1.0, 3.0)
    out = tmp_path / "new" / "dir"
    paths = plot_curves(hist, out)  # no title, no prefix, thresholds in score units
    assert out.is_dir() and paths == {kind: out / f"{kind}.png" for kind in ("roc", "pr", "dice")}
    assert [saved_figures[f"{kind}.png"].axes[0].get_title() for kind in ("roc", "pr", "dice")] == ["ROC", "PR", "DICE"]
    dice = saved_figures["dice.png"].axes[0]
    assert dice.get_xlabel() == "threshold"
    np.testing.assert_allclose(dice.get_lines()[0].get_xdata(), [-1, 0, 1, 2])

    plot_curves({"method": hist}, out, prefix="rel_", relative_thresholds=True)
    dice = saved_figures["rel_dice.png"].axes[0]
    assert dice.get_xlabel() == "threshold (fraction of the score range)"
    np.testing.assert_allclose(dice.get_lines()[0].get_xdata(), [0, 0.25, 0.5, 0.75])
    assert dice.get_legend().get_texts()[0].get_text() == "method (max 0.750)"


def test_plot_curves_of_a_cohort_draws_the_pool_and_each_family_with_lesions(tmp_path, saved_figures):
    evaluator = CohortEvaluator(n_bins=10)
    volumes = (
        ("a", "x", _voxels(2, 0.9, 1) + _voxels(4, 0.1)),
        ("b", "y", [(0.9, 1, 1), (0.1, 1, 1), (0.9, 0, 1)] + _voxels(3, 0.1)),
        ("h", None, _voxels(4, 0.1)),
    )
    for subject, family, voxels in volumes:
        evaluator.add_volume(subject, *_column(voxels), family=family)
    plot_curves(evaluator, tmp_path)
    roc = saved_figures["roc.png"].axes[0]
    assert [t.get_text().split(" (")[0] for t in roc.get_legend().get_texts()] == ["pooled", "x", "y"]
    pools = [evaluator.pooled_histogram()] + [r.histogram for r in evaluator.records[:2]]
    for line, hist in zip(roc.get_lines(), pools):
        fpr, tpr, _ = hist.roc_curve()
        np.testing.assert_allclose(line.get_xydata(), np.column_stack([fpr, tpr]))

    one_family = CohortEvaluator(n_bins=10)
    one_family.add_volume("a", *_column(volumes[0][2]), family="x")
    one_family.add_volume("h", *_column(volumes[2][2]))
    plot_curves(one_family, tmp_path)
    assert [t.get_text() for t in saved_figures["roc.png"].axes[0].get_legend().get_texts()] == ["pooled (AUROC 1.000)"]
