"""Metrics for unsupervised lesion detection in 3D brain MRI.

Pixel (voxel) level metrics are computed from a :class:`ScoreHistogram`: counts of
lesion / non-lesion voxels per bin of the anomaly score.  A histogram has a fixed size
(``n_bins``), so whole cohorts are evaluated in constant memory, histograms of parts can
be summed, and bootstrapping over subjects only re-sums per-volume histograms.

Thresholds live on the bin edges ``edges[k]``: "predict lesion" means "score in a bin
``>= k``", which is exactly ``score >= edges[k]`` for ``1 <= k < n_bins`` (scores are
assigned to bins so that bin ``k`` holds ``edges[k] <= score < edges[k + 1]``; scores
outside ``value_range`` are clipped into the first / last bin).  Curves and AP / AUROC
are exactly those of sklearn for scores tied within each bin.

Conventions for degenerate cases (documented once here):

- no positive (lesion) voxels: AP, AUROC, max Dice and recall are ``nan``;
- no negative voxels: AUROC and FPR are ``nan``;
- ``dice_at``: ``2 TP / (P + PP)``; ``nan`` when nothing is positive and nothing is
  predicted (0 / 0), ``0`` when there is no lesion but something is predicted;
- precision with nothing predicted is ``nan``;
- :meth:`CohortEvaluator.summary` turns ``nan`` / ``inf`` into ``None`` (strict JSON).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
from scipy.stats import rankdata
from sklearn.metrics import average_precision_score, roc_auc_score

logger = logging.getLogger(__name__)

# Warn when more than this fraction of the voxels fall outside ``value_range``.
CLIP_WARNING_FRACTION = 1e-3

HISTOGRAM_METRICS = ("average_precision", "auroc", "max_dice")

# Lesion-size groups of the per-group breakdown: (upper bound in ml, name), by lesion volume.
SIZE_GROUPS_ML = ((1.0, "small (<1 ml)"), (10.0, "medium (1-10 ml)"), (math.inf, "large (>=10 ml)"))


def size_group(lesion_ml: float | None) -> str | None:
    """The size group of a lesion of `lesion_ml` millilitres (None: no lesion or unknown size)."""
    if lesion_ml is None or not lesion_ml > 0:
        return None
    return next(name for bound, name in SIZE_GROUPS_ML if lesion_ml < bound)


def _to_numpy(array: Any) -> np.ndarray:
    """numpy view of a numpy array, torch tensor (incl. MONAI MetaTensor) or list."""
    if hasattr(array, "detach"):  # torch.Tensor without importing torch
        array = array.detach().cpu()
        if hasattr(array, "as_tensor"):  # MONAI MetaTensor -> plain tensor
            array = array.as_tensor()
        array = array.numpy()
    return np.asarray(array)


def _safe_divide(numerator: np.ndarray, denominator: np.ndarray) -> np.ndarray:
    """Elementwise numerator / denominator, nan where the denominator is 0."""
    numerator = np.asarray(numerator, dtype=np.float64)
    denominator = np.asarray(denominator, dtype=np.float64)
    out = np.full(np.broadcast(numerator, denominator).shape, np.nan)
    np.divide(numerator, denominator, out=out, where=denominator != 0)
    return out


@dataclass(frozen=True)
class DiceResult:
    """Best Dice over the bin-edge thresholds.

    ``dice`` is reached exactly at ``threshold`` (a bin edge).  ``upper_bound`` bounds the
    Dice of the *unbinned* scores at any threshold, so the exact best Dice lies in
    ``[dice, upper_bound]``: the binning error is at most ``upper_bound - dice``.
    """

    dice: float
    threshold: float
    upper_bound: float

    @property
    def binning_error(self) -> float:
        return self.upper_bound - self.dice


class ScoreHistogram:
    """Counts of lesion / non-lesion voxels per anomaly-score bin.

    ``n_bins`` equal bins over ``value_range``; the memory used is ``2 * n_bins`` integers
    whatever the number of voxels.
    """

    def __init__(
        self,
        n_bins: int = 10000,
        value_range: tuple[float, float] = (0.0, 1.0),
        warn_clipped: bool = True,
    ):
        low, high = float(value_range[0]), float(value_range[1])
        if int(n_bins) < 1:
            raise ValueError(f"n_bins must be a positive integer, got {n_bins}.")
        if not (math.isfinite(low) and math.isfinite(high) and low < high):
            raise ValueError(
                f"value_range must be finite with low < high, got {value_range}; "
                "pass the range the anomaly scores are expected to lie in."
            )
        self.n_bins = int(n_bins)
        self.value_range = (low, high)
        self.edges = np.linspace(low, high, self.n_bins + 1)
        self.pos_counts = np.zeros(self.n_bins, dtype=np.int64)
        self.neg_counts = np.zeros(self.n_bins, dtype=np.int64)
        self.n_clipped = 0
        self.warn_clipped = warn_clipped
        self._clip_warning_logged = False

    # ------------------------------------------------------------------ filling
    def bin_index(self, scores: np.ndarray) -> np.ndarray:
        """Bin of each score: ``edges[k] <= s < edges[k+1]``, clipped into [0, n_bins-1].

        Arithmetic binning can be one bin off through rounding; comparing with the
        stored edges corrects that, so bins agree exactly with the reported thresholds.
        """
        scores = np.asarray(scores, dtype=np.float64)
        low, high = self.value_range
        last = self.n_bins - 1
        index = np.floor((scores - low) * (self.n_bins / (high - low)))
        index = np.clip(index, 0, last).astype(np.int64)
        index -= (scores < self.edges[index]) & (index > 0)
        index += (scores >= self.edges[index + 1]) & (index < last)
        return index

    def update(self, scores: Any, labels: Any, mask: Any = None) -> "ScoreHistogram":
        """Add voxels; ``labels > 0`` is lesion, ``mask > 0`` restricts to brain voxels."""
        scores, labels = _to_numpy(scores), _to_numpy(labels)
        if scores.size != labels.size:
            raise ValueError(
                f"scores (shape {scores.shape}) and labels (shape {labels.shape}) must "
                "have the same number of voxels; resample the label onto the heatmap grid."
            )
        scores, labels = scores.reshape(-1), labels.reshape(-1) > 0
        if mask is not None:
            mask = _to_numpy(mask)
            if mask.size != scores.size:
                raise ValueError(
                    f"mask (shape {mask.shape}) must have as many voxels as scores "
                    f"(shape {scores.shape})."
                )
            inside = mask.reshape(-1) > 0
            scores, labels = scores[inside], labels[inside]
        if np.isnan(scores).any():
            raise ValueError("scores contain NaN; fix the anomaly map before evaluating.")

        low, high = self.value_range
        self.n_clipped += int(np.count_nonzero((scores < low) | (scores > high)))
        # One bincount for both classes: slot 2*bin + label.
        slots = 2 * self.bin_index(scores) + labels
        counts = np.bincount(slots, minlength=2 * self.n_bins).reshape(self.n_bins, 2)
        self.neg_counts += counts[:, 0]
        self.pos_counts += counts[:, 1]
        self._warn_if_clipped()
        return self

    def _warn_if_clipped(self) -> None:
        total = self.n_pos + self.n_neg
        if (
            self.warn_clipped
            and not self._clip_warning_logged
            and self.n_clipped > CLIP_WARNING_FRACTION * total
        ):
            logger.warning(
                "%d of %d scores (%.2f%%) lie outside value_range %s and were clipped "
                "into the edge bins; widen value_range for exact curves.",
                self.n_clipped, total, 100.0 * self.n_clipped / total, self.value_range,
            )
            self._clip_warning_logged = True

    # ------------------------------------------------------------------ combining
    def _check_compatible(self, other: "ScoreHistogram") -> None:
        if not isinstance(other, ScoreHistogram):
            raise TypeError(f"can only merge a ScoreHistogram, got {type(other).__name__}.")
        if other.n_bins != self.n_bins or other.value_range != self.value_range:
            raise ValueError(
                f"cannot merge histograms with different bins: {self.n_bins} bins over "
                f"{self.value_range} vs {other.n_bins} over {other.value_range}."
            )

    def merge(self, other: "ScoreHistogram") -> "ScoreHistogram":
        """Add the counts of ``other`` in place; returns self."""
        self._check_compatible(other)
        self.pos_counts += other.pos_counts
        self.neg_counts += other.neg_counts
        self.n_clipped += other.n_clipped
        self._warn_if_clipped()
        return self

    def copy(self) -> "ScoreHistogram":
        new = ScoreHistogram(self.n_bins, self.value_range, self.warn_clipped)
        new.pos_counts = self.pos_counts.copy()
        new.neg_counts = self.neg_counts.copy()
        new.n_clipped = self.n_clipped
        new._clip_warning_logged = self._clip_warning_logged
        return new

    def __add__(self, other: "ScoreHistogram") -> "ScoreHistogram":
        return self.copy().merge(other)

    def __radd__(self, other: Any) -> "ScoreHistogram":
        # Lets the builtin sum() start from 0.
        if isinstance(other, (int, float)) and other == 0:
            return self.copy()
        return NotImplemented

    @classmethod
    def from_counts(
        cls,
        pos_counts: np.ndarray,
        neg_counts: np.ndarray,
        value_range: tuple[float, float] = (0.0, 1.0),
    ) -> "ScoreHistogram":
        """Histogram from count arrays (e.g. a bootstrap re-sum of volume histograms)."""
        pos_counts = np.asarray(pos_counts, dtype=np.int64)
        neg_counts = np.asarray(neg_counts, dtype=np.int64)
        if pos_counts.shape != neg_counts.shape or pos_counts.ndim != 1:
            raise ValueError("pos_counts and neg_counts must be 1D arrays of equal length.")
        hist = cls(len(pos_counts), value_range, warn_clipped=False)
        hist.pos_counts, hist.neg_counts = pos_counts.copy(), neg_counts.copy()
        return hist

    # ------------------------------------------------------------------ counts
    @property
    def n_pos(self) -> int:
        return int(self.pos_counts.sum())

    @property
    def n_neg(self) -> int:
        return int(self.neg_counts.sum())

    def _counts_at_or_above(self) -> tuple[np.ndarray, np.ndarray]:
        """TP and FP when predicting bins >= k, for k = 0..n_bins (last: nothing)."""
        zero = np.zeros(1, dtype=np.int64)
        tp = np.concatenate([np.cumsum(self.pos_counts[::-1])[::-1], zero])
        fp = np.concatenate([np.cumsum(self.neg_counts[::-1])[::-1], zero])
        return tp, fp

    def _threshold_of_bin(self, k: int) -> float:
        """Threshold of "predict bins >= k"; past the last bin nothing is predicted."""
        return float(self.edges[k]) if k < self.n_bins else math.inf

    # ------------------------------------------------------------------ curves
    def roc_curve(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(fpr, tpr, thresholds) like sklearn's ``roc_curve(drop_intermediate=False)``.

        One point per non-empty bin, thresholds decreasing, starting at (0, 0) with
        threshold ``inf``; thresholds are the bins' lower edges.
        """
        tp, fp = self._counts_at_or_above()
        keep = np.flatnonzero(self.pos_counts + self.neg_counts)[::-1]
        thresholds = np.concatenate([[np.inf], self.edges[keep]])
        tpr = _safe_divide(np.concatenate([[0], tp[keep]]), self.n_pos)
        fpr = _safe_divide(np.concatenate([[0], fp[keep]]), self.n_neg)
        return fpr, tpr, thresholds

    def precision_recall_curve(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(precision, recall, thresholds) like sklearn's ``precision_recall_curve``.

        Thresholds increasing (one per non-empty bin), recall decreasing, with a final
        point (precision 1, recall 0) that has no threshold.
        """
        tp, fp = self._counts_at_or_above()
        keep = np.flatnonzero(self.pos_counts + self.neg_counts)
        precision = _safe_divide(tp[keep], tp[keep] + fp[keep])
        recall = _safe_divide(tp[keep], self.n_pos)
        return (
            np.concatenate([precision, [1.0]]),
            np.concatenate([recall, [0.0]]),
            self.edges[keep],
        )

    def auroc(self) -> float:
        """Area under the ROC curve (trapezoids: tied scores count one half)."""
        if self.n_pos == 0 or self.n_neg == 0:
            return math.nan
        tp, _ = self._counts_at_or_above()
        # Bin k moves the curve right by neg[k]/N between heights tp[k+1] and tp[k].
        area = np.sum(self.neg_counts * (tp[1:] + tp[:-1]) / 2.0)
        return float(area / (self.n_pos * self.n_neg))

    def average_precision(self) -> float:
        """sklearn's step-wise AP: sum over bins of recall gain x precision at that bin."""
        if self.n_pos == 0:
            return math.nan
        tp, fp = self._counts_at_or_above()
        has_pos = self.pos_counts > 0  # only bins that raise recall contribute
        precision = tp[:-1][has_pos] / (tp[:-1][has_pos] + fp[:-1][has_pos])
        return float(np.sum(self.pos_counts[has_pos] * precision) / self.n_pos)

    def dice_curve(self) -> tuple[np.ndarray, np.ndarray]:
        """(thresholds, dice) at every bin's lower edge: ``2 TP / (P + TP + FP)``."""
        tp, fp = self._counts_at_or_above()
        dice = _safe_divide(2 * tp[:-1], self.n_pos + tp[:-1] + fp[:-1])
        return self.edges[:-1].copy(), dice

    def max_dice(self) -> DiceResult:
        """Best Dice over bin-edge thresholds, with a rigorous bound for unbinned scores.

        For any threshold ``t`` inside bin ``k`` the voxels predicted by the raw scores
        lie between those of edges ``k`` and ``k + 1``, so ``TP(t) <= TP_k`` and
        ``PP(t) >= PP_{k+1}``.  Hence ``Dice(t) <= 2 TP_k / (P + PP_{k+1})``; the maximum
        over ``k`` bounds the exact best Dice.  The gap shrinks as bins get finer.
        """
        if self.n_pos == 0:
            return DiceResult(math.nan, math.nan, math.nan)
        thresholds, dice = self.dice_curve()
        best = int(np.argmax(dice))
        tp, fp = self._counts_at_or_above()
        predicted = tp + fp
        bound = np.max(2.0 * tp[:-1] / (self.n_pos + predicted[1:]))
        return DiceResult(float(dice[best]), float(thresholds[best]), float(bound))

    def dice_at(self, threshold: float) -> dict[str, float]:
        """Dice, precision, recall and FPR when predicting ``score >= threshold``.

        The threshold is snapped down to the lower edge of its bin (reported as
        ``threshold_used``; exact for bin edges, otherwise off by < one bin width);
        thresholds outside ``value_range`` are clipped like scores, except ``+inf``,
        which predicts nothing.
        """
        if math.isnan(threshold):
            raise ValueError("threshold is nan; pass a finite threshold or inf.")
        if threshold == math.inf:
            k = self.n_bins
        else:
            k = int(self.bin_index(np.array([threshold]))[0])
        tp, fp = self._counts_at_or_above()
        tp_k, fp_k = tp[k], fp[k]
        return {
            "dice": float(_safe_divide(2 * tp_k, self.n_pos + tp_k + fp_k)),
            "precision": float(_safe_divide(tp_k, tp_k + fp_k)),
            "recall": float(_safe_divide(tp_k, self.n_pos)),
            "fpr": float(_safe_divide(fp_k, self.n_neg)),
            "threshold_used": self._threshold_of_bin(k),
        }

    def threshold_at_fpr(self, target_fpr: float) -> float:
        """Smallest bin-edge threshold whose false-positive fraction is <= ``target_fpr``.

        FPR = negatives with ``score >= threshold`` / all negatives; meant for healthy
        volumes.  Returns ``inf`` (with a warning) when only "predict nothing" reaches the
        target, i.e. the last bin alone holds too many negatives: widen ``value_range``.
        """
        if not 0.0 <= target_fpr <= 1.0:
            raise ValueError(f"target_fpr must lie in [0, 1], got {target_fpr}.")
        if self.n_neg == 0:
            raise ValueError("threshold_at_fpr needs negative voxels; the histogram has none.")
        _, fp = self._counts_at_or_above()
        # fp is non-increasing in k, so the first k reaching the target is the smallest.
        k = int(np.argmax(fp / self.n_neg <= target_fpr))
        if k == self.n_bins:
            logger.warning(
                "No threshold inside value_range %s reaches FPR <= %g; returning inf.",
                self.value_range, target_fpr,
            )
        return self._threshold_of_bin(k)

    def metric(self, name: str) -> float:
        """One scalar metric by name: 'average_precision', 'auroc' or 'max_dice'."""
        if name == "average_precision":
            return self.average_precision()
        if name == "auroc":
            return self.auroc()
        if name == "max_dice":
            return self.max_dice().dice
        raise ValueError(f"unknown metric {name!r}; choose one of {HISTOGRAM_METRICS}.")

    def __repr__(self) -> str:
        return (
            f"ScoreHistogram(n_bins={self.n_bins}, value_range={self.value_range}, "
            f"n_pos={self.n_pos}, n_neg={self.n_neg}, n_clipped={self.n_clipped})"
        )


# ---------------------------------------------------------------------- volume / slice level
def detection_metrics(scores: Any, labels: Any) -> dict[str, Any]:
    """AUROC and AP of per-item scores (volumes or slices) with sklearn.

    Returns ``dict(auroc, ap, n_pos, n_neg)``; with one class missing both metrics are
    ``nan`` and a ``reason`` key says why.
    """
    scores = _to_numpy(scores).reshape(-1).astype(np.float64)
    labels = _to_numpy(labels).reshape(-1) > 0
    if scores.size != labels.size:
        raise ValueError(f"got {scores.size} scores but {labels.size} labels.")
    if np.isnan(scores).any():
        raise ValueError("scores contain NaN; every item needs a finite score.")
    n_pos, n_neg = int(labels.sum()), int((~labels).sum())
    result: dict[str, Any] = {"auroc": math.nan, "ap": math.nan, "n_pos": n_pos, "n_neg": n_neg}
    if n_pos == 0 or n_neg == 0:
        missing = "positive" if n_pos == 0 else "negative"
        result["reason"] = f"no {missing} items (n_pos={n_pos}, n_neg={n_neg})"
        return result
    result["auroc"] = float(roc_auc_score(labels, scores))
    result["ap"] = float(average_precision_score(labels, scores))
    return result


def rank_auroc(scores: np.ndarray, labels: np.ndarray) -> float:
    """AUROC by the Mann-Whitney rank sum (ties count one half, as sklearn's), nan when a class
    is missing: cheap enough for bootstrap resamples."""
    labels = np.asarray(labels) > 0
    n_pos = int(labels.sum())
    n_neg = labels.size - n_pos
    if n_pos == 0 or n_neg == 0:
        return math.nan
    ranks = rankdata(scores)
    return float((ranks[labels].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def _as_volume(array: Any, name: str) -> np.ndarray:
    """3D numpy volume from (X, Y, Z) or channel-first (1, X, Y, Z)."""
    volume = _to_numpy(array)
    if volume.ndim == 4 and volume.shape[0] == 1:
        volume = volume[0]
    if volume.ndim != 3:
        raise ValueError(
            f"{name} must be a 3D volume (X, Y, Z) or (1, X, Y, Z), got shape {volume.shape}."
        )
    return volume


def _brain_mask(mask: Any, shape: tuple[int, ...]) -> np.ndarray:
    if mask is None:
        return np.ones(shape, dtype=bool)
    mask = _as_volume(mask, "mask") > 0
    if mask.shape != shape:
        raise ValueError(f"mask shape {mask.shape} does not match heatmap shape {shape}.")
    return mask


def top_percentile_mean(values: np.ndarray, percentile: float = 99.0) -> float:
    """Mean of the values at or above their ``percentile``-th percentile (e.g. the top 1 %):
    a robust maximum, comparable between sets of different sizes, that small lesions still move."""
    cutoff = np.percentile(values, percentile)
    return float(values[values >= cutoff].mean())


SLICE_REDUCTIONS = ("top_percentile", "mean", "max", "p99")


def _reduce(values: np.ndarray, reduction: str, percentile: float = 99.0) -> float:
    if reduction == "top_percentile":
        return top_percentile_mean(values, percentile)
    if reduction == "mean":
        return float(values.mean())
    if reduction == "max":
        return float(values.max())
    if reduction == "p99":
        return float(np.percentile(values, 99.0))
    raise ValueError(f"unknown slice reduction {reduction!r}; use one of {SLICE_REDUCTIONS}.")


def slice_scores_and_labels(
    heatmap: Any,
    label: Any,
    mask: Any = None,
    axis: int = -1,
    reduction: str = "top_percentile",
    percentile: float = 99.0,
) -> tuple[np.ndarray, np.ndarray]:
    """Per-slice anomaly score and label of one 3D volume.

    Slices along ``axis`` of the 3D volume (``-1`` = axial after RAS orientation) that
    contain no brain voxel are skipped.  The score reduces the slice's brain voxels:
    ``top_percentile`` (default) is the mean of the scores at or above the slice's
    ``percentile``-th percentile, like the volume score of the same name, so a small edge
    slice does not outscore a large slice with a lesion as its ``mean`` would; ``mean``,
    ``max`` and 99th percentile ``p99`` remain available.  The label is 1 when the slice
    has a lesion voxel inside the brain mask.  ``label=None`` means a healthy volume.
    """
    heatmap = _as_volume(heatmap, "heatmap")
    if not -3 <= axis <= 2:
        raise ValueError(f"axis {axis} is not an axis of a 3D volume; use -1 for axial.")
    _reduce(np.zeros(1), reduction)  # validate the name even for empty volumes
    mask = _brain_mask(mask, heatmap.shape)
    lesion = np.zeros(heatmap.shape, bool) if label is None else _as_volume(label, "label") > 0
    if lesion.shape != heatmap.shape:
        raise ValueError(
            f"label shape {lesion.shape} does not match heatmap shape {heatmap.shape}."
        )

    heatmap, mask, lesion = (np.moveaxis(a, axis, 0) for a in (heatmap, mask, lesion))
    brain_slices = np.flatnonzero(mask.reshape(mask.shape[0], -1).any(axis=1))
    scores = np.array([_reduce(heatmap[i][mask[i]], reduction, percentile) for i in brain_slices])
    labels = np.array([int(lesion[i][mask[i]].any()) for i in brain_slices], dtype=np.int64)
    return scores.astype(np.float64), labels


def volume_score(
    heatmap: Any,
    mask: Any = None,
    reduction: str = "mean",
    percentile: float = 99.0,
) -> float:
    """One anomaly score per volume from its brain voxels.

    ``mean``: mean score; ``top_percentile``: mean of the scores at or above the
    ``percentile``-th percentile (e.g. the top 1 %), which small lesions still move.
    """
    heatmap = _as_volume(heatmap, "heatmap")
    values = heatmap[_brain_mask(mask, heatmap.shape)].astype(np.float64)
    if values.size == 0:
        raise ValueError("the brain mask is empty; check the mask of this volume.")
    if reduction == "mean":
        return float(values.mean())
    if reduction == "top_percentile":
        return top_percentile_mean(values, percentile)
    raise ValueError(f"unknown volume reduction {reduction!r}; use 'mean' or 'top_percentile'.")


# ---------------------------------------------------------------------- bootstrap
def bootstrap_ci(
    statistic: Callable[[np.ndarray], float],
    n_items: int,
    n_boot: int = 1000,
    alpha: float = 0.05,
    seed: int | np.random.Generator = 0,
) -> tuple[float, float]:
    """Percentile bootstrap CI of ``statistic(indices)`` resampling items (subjects).

    Resamples where the statistic is nan (e.g. no lesion drawn) are dropped; returns
    ``(nan, nan)`` if none is left.
    """
    if n_items < 1:
        raise ValueError("bootstrap_ci needs at least one item.")
    if not 0.0 < alpha < 1.0:
        raise ValueError(f"alpha must lie in (0, 1), got {alpha}.")
    rng = np.random.default_rng(seed)
    values = np.array(
        [statistic(rng.integers(0, n_items, size=n_items)) for _ in range(n_boot)],
        dtype=np.float64,
    )
    values = values[~np.isnan(values)]
    if values.size < n_boot:
        logger.debug("bootstrap: %d of %d resamples gave nan", n_boot - values.size, n_boot)
    if values.size == 0:
        return math.nan, math.nan
    low, high = np.quantile(values, [alpha / 2.0, 1.0 - alpha / 2.0])
    return float(low), float(high)


def bootstrap_histogram_metric(
    per_volume_histograms: Sequence[ScoreHistogram],
    metric_name: str | Callable[[ScoreHistogram], float],
    n_boot: int = 1000,
    alpha: float = 0.05,
    seed: int | np.random.Generator = 0,
) -> tuple[float, float]:
    """Bootstrap CI of a pooled pixel metric: resample volumes, re-sum their histograms.

    ``metric_name`` is 'average_precision', 'auroc', 'max_dice' or a callable taking a
    :class:`ScoreHistogram`.
    """
    if not per_volume_histograms:
        raise ValueError("bootstrap_histogram_metric needs at least one volume histogram.")
    first = per_volume_histograms[0]
    for hist in per_volume_histograms[1:]:
        first._check_compatible(hist)
    metric = metric_name if callable(metric_name) else (lambda h: h.metric(metric_name))
    pos = np.stack([h.pos_counts for h in per_volume_histograms])
    neg = np.stack([h.neg_counts for h in per_volume_histograms])
    n_volumes = len(per_volume_histograms)

    def pooled_metric(indices: np.ndarray) -> float:
        times_drawn = np.bincount(indices, minlength=n_volumes)
        return metric(
            ScoreHistogram.from_counts(times_drawn @ pos, times_drawn @ neg, first.value_range)
        )

    return bootstrap_ci(pooled_metric, n_volumes, n_boot=n_boot, alpha=alpha, seed=seed)


# ---------------------------------------------------------------------- cohort
@dataclass
class VolumeRecord:
    """What the evaluator keeps of one volume: counts and scores, no voxel arrays."""

    subject: str
    family: str | None
    histogram: ScoreHistogram
    volume_score: float
    slice_scores: np.ndarray
    slice_labels: np.ndarray
    meta: dict = field(default_factory=dict)

    @property
    def n_lesion_voxels(self) -> int:
        return self.histogram.n_pos

    @property
    def is_lesion(self) -> bool:
        return self.n_lesion_voxels > 0

    @property
    def lesion_ml(self) -> float | None:
        """Lesion volume in ml when the caller recorded it (``meta["lesion_ml"]``)."""
        value = self.meta.get("lesion_ml")
        return None if value is None else float(value)


def _json_safe(value: Any) -> Any:
    """Plain Python types for json.dumps; nan / inf become None (strict JSON)."""
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    if isinstance(value, np.ndarray):
        return [_json_safe(v) for v in value.tolist()]
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    if isinstance(value, (int, np.integer)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        return float(value) if math.isfinite(value) else None
    return value


class CohortEvaluator:
    """Evaluates a cohort volume by volume in constant memory per volume.

    Lesion volumes (any label voxel > 0) give the pixel and per-volume metrics; healthy
    volumes (all-zero or ``None`` label) are negatives for volume / slice detection and
    give the false-positive fraction at a threshold.
    """

    def __init__(
        self,
        n_bins: int = 10000,
        value_range: tuple[float, float] = (0.0, 1.0),
        volume_reduction: str = "mean",
        slice_reduction: str = "top_percentile",
        volume_percentile: float = 99.0,
        slice_percentile: float = 99.0,
    ):
        self.n_bins = n_bins
        self.value_range = (float(value_range[0]), float(value_range[1]))
        self.volume_reduction = volume_reduction
        self.slice_reduction = slice_reduction
        self.volume_percentile = volume_percentile
        self.slice_percentile = slice_percentile
        self.records: list[VolumeRecord] = []
        self._n_voxels = 0
        self._n_clipped = 0
        self._clip_warning_logged = False
        ScoreHistogram(n_bins, value_range)  # validate the binning early

    def add_volume(
        self,
        subject: str,
        heatmap: Any,
        label: Any,
        mask: Any,
        axis: int = -1,
        family: str | None = None,
        meta: dict | None = None,
    ) -> VolumeRecord:
        """Add one volume (heatmap, label, brain mask: (X, Y, Z) or (1, X, Y, Z))."""
        if any(r.subject == subject for r in self.records):
            raise ValueError(
                f"subject {subject!r} was already added; give each volume a unique id "
                "(e.g. subject_session)."
            )
        heatmap = _as_volume(heatmap, "heatmap")
        lesion = np.zeros(heatmap.shape, bool) if label is None else _as_volume(label, "label") > 0
        brain = _brain_mask(mask, heatmap.shape)
        histogram = ScoreHistogram(self.n_bins, self.value_range, warn_clipped=False)
        histogram.update(heatmap, lesion, brain)
        slice_scores, slice_labels = slice_scores_and_labels(
            heatmap, lesion, brain, axis=axis, reduction=self.slice_reduction, percentile=self.slice_percentile
        )
        record = VolumeRecord(
            subject=str(subject),
            family=family,
            histogram=histogram,
            volume_score=volume_score(
                heatmap, brain, self.volume_reduction, self.volume_percentile
            ),
            slice_scores=slice_scores,
            slice_labels=slice_labels,
            meta=dict(meta or {}),
        )
        self.records.append(record)
        self._warn_if_clipped(histogram)
        return record

    def _warn_if_clipped(self, histogram: ScoreHistogram) -> None:
        # One warning per cohort rather than one per volume.
        self._n_voxels += histogram.n_pos + histogram.n_neg
        self._n_clipped += histogram.n_clipped
        too_many = self._n_clipped > CLIP_WARNING_FRACTION * self._n_voxels
        if too_many and not self._clip_warning_logged:
            logger.warning(
                "%d of %d scores so far lie outside value_range %s and were clipped into "
                "the edge bins (first seen up to subject %r); widen value_range.",
                self._n_clipped, self._n_voxels, self.value_range, self.records[-1].subject,
            )
            self._clip_warning_logged = True

    # ------------------------------------------------------------------ views
    @property
    def lesion_records(self) -> list[VolumeRecord]:
        return [r for r in self.records if r.is_lesion]

    @property
    def healthy_records(self) -> list[VolumeRecord]:
        return [r for r in self.records if not r.is_lesion]

    def pooled_histogram(self, records: Sequence[VolumeRecord] | None = None) -> ScoreHistogram:
        """Sum of the volume histograms (default: lesion volumes, the pixel-metric pool)."""
        records = self.lesion_records if records is None else records
        empty = ScoreHistogram(self.n_bins, self.value_range, warn_clipped=False)
        return sum((r.histogram for r in records), empty)

    def families(self) -> dict[str, list[VolumeRecord]]:
        groups: dict[str, list[VolumeRecord]] = {}
        for record in self.records:
            if record.family is not None:
                groups.setdefault(record.family, []).append(record)
        return groups

    def sizes(self) -> dict[str, list[VolumeRecord]]:
        """Lesion volumes by size group (`SIZE_GROUPS_ML`), for those with a recorded size."""
        groups: dict[str, list[VolumeRecord]] = {name: [] for _, name in SIZE_GROUPS_ML}
        for record in self.lesion_records:
            group = size_group(record.lesion_ml)
            if group is not None:
                groups[group].append(record)
        return {name: records for name, records in groups.items() if records}

    def _default_threshold(self) -> float:
        return self.pooled_histogram().max_dice().threshold

    def per_volume(self, threshold: float | None = None) -> list[dict[str, Any]]:
        """One row per volume; Dice at ``threshold`` (default: pooled best-Dice threshold).

        Dice and AP are None for healthy volumes; ``fpr`` is the false-positive fraction
        of the volume's non-lesion brain voxels at the threshold.
        """
        threshold = self._default_threshold() if threshold is None else threshold
        rows = []
        for record in self.records:
            at = (
                dict(dice=math.nan, fpr=math.nan)
                if math.isnan(threshold)
                else record.histogram.dice_at(threshold)
            )
            rows.append(
                _json_safe(
                    {
                        "subject": record.subject,
                        "family": record.family,
                        "n_brain_voxels": record.histogram.n_pos + record.histogram.n_neg,
                        "n_lesion_voxels": record.n_lesion_voxels,
                        "threshold": threshold,
                        "dice": at["dice"] if record.is_lesion else math.nan,
                        "fpr": at["fpr"],
                        "ap": record.histogram.average_precision(),
                        "volume_score": record.volume_score,
                        "max_dice": record.histogram.max_dice().dice,
                        "lesion_ml": record.lesion_ml,
                        "size_group": size_group(record.lesion_ml),
                        "n_slices": int(record.slice_labels.size),
                        "n_lesion_slices": int(record.slice_labels.sum()),
                        "meta": record.meta,
                    }
                )
            )
        return rows

    # ------------------------------------------------------------------ storage
    def save(self, path: str | Path) -> Path:
        """Every volume's histogram, volume score and slice scores in one compressed ``.npz``
        (a few hundred KB per cohort), so curves and summaries can be redrawn after the run
        (`CohortEvaluator.load`)."""
        import json

        slices = [r.slice_scores.size for r in self.records]
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        np.savez_compressed(
            path,
            n_bins=self.n_bins, value_range=np.array(self.value_range),
            reductions=np.array([self.volume_reduction, self.slice_reduction]),
            volume_percentile=self.volume_percentile,
            slice_percentile=self.slice_percentile,
            subjects=np.array([r.subject for r in self.records], dtype=str),
            families=np.array(["" if r.family is None else r.family for r in self.records], dtype=str),
            meta=np.array([json.dumps(_json_safe(r.meta)) for r in self.records], dtype=str),
            volume_scores=np.array([r.volume_score for r in self.records], dtype=np.float64),
            pos_counts=np.stack([r.histogram.pos_counts for r in self.records]),
            neg_counts=np.stack([r.histogram.neg_counts for r in self.records]),
            n_clipped=np.array([r.histogram.n_clipped for r in self.records], dtype=np.int64),
            slice_offsets=np.cumsum([0, *slices]),
            slice_scores=np.concatenate([r.slice_scores for r in self.records]),
            slice_labels=np.concatenate([r.slice_labels for r in self.records]),
        )
        return path

    @classmethod
    def load(cls, path: str | Path) -> "CohortEvaluator":
        """A cohort written by `save`, with every per-volume record back."""
        import json

        with np.load(path, allow_pickle=False) as data:
            volume_reduction, slice_reduction = (str(x) for x in data["reductions"])
            # files written before the slice percentile was stored: the default
            slice_percentile = float(data["slice_percentile"]) if "slice_percentile" in data.files else 99.0
            evaluator = cls(int(data["n_bins"]), tuple(data["value_range"]), volume_reduction, slice_reduction,
                            float(data["volume_percentile"]), slice_percentile)
            offsets = data["slice_offsets"]
            for i, subject in enumerate(data["subjects"]):
                histogram = ScoreHistogram.from_counts(data["pos_counts"][i], data["neg_counts"][i],
                                                       evaluator.value_range)
                histogram.n_clipped = int(data["n_clipped"][i])
                evaluator.records.append(VolumeRecord(
                    subject=str(subject), family=str(data["families"][i]) or None, histogram=histogram,
                    volume_score=float(data["volume_scores"][i]),
                    slice_scores=data["slice_scores"][offsets[i]:offsets[i + 1]].astype(np.float64),
                    slice_labels=data["slice_labels"][offsets[i]:offsets[i + 1]].astype(np.int64),
                    meta=json.loads(str(data["meta"][i])),
                ))
        return evaluator

    # ------------------------------------------------------------------ summary
    def _pixel_summary(self, n_boot: int, alpha: float, seed: int) -> dict[str, Any]:
        records = self.lesion_records
        pooled = self.pooled_histogram(records)
        best = pooled.max_dice()
        summary = {
            "n_volumes": len(records),
            "n_pos": pooled.n_pos,
            "n_neg": pooled.n_neg,
            "n_clipped": sum(r.histogram.n_clipped for r in records),
            "ap": pooled.average_precision(),
            "auroc": pooled.auroc(),
            "max_dice": {
                "dice": best.dice,
                "threshold": best.threshold,
                "upper_bound": best.upper_bound,
                "binning_error": best.binning_error,
            },
        }
        if n_boot > 0 and records:
            histograms = [r.histogram for r in records]
            ci = {
                name: bootstrap_histogram_metric(histograms, name, n_boot, alpha, seed)
                for name in HISTOGRAM_METRICS
            }
            summary["ap_ci"] = ci["average_precision"]
            summary["auroc_ci"] = ci["auroc"]
            # CI of the best Dice, threshold re-optimised in every resample.
            summary["max_dice"]["ci"] = ci["max_dice"]
        return summary

    def _volume_summary(self, n_boot: int, alpha: float, seed: int) -> dict[str, Any]:
        """Volume detection AUROC / AP (lesion vs healthy volumes) with, for ``n_boot > 0``, a
        percentile-bootstrap CI of the AUROC over volumes (seeded; resamples lacking a class dropped)."""
        scores = np.array([r.volume_score for r in self.records], dtype=np.float64)
        labels = np.array([r.is_lesion for r in self.records])
        result = detection_metrics(scores, labels)
        result.update(reduction=self.volume_reduction, percentile=self.volume_percentile)
        if n_boot > 0 and "reason" not in result:
            result["auroc_ci"] = list(bootstrap_ci(lambda idx: rank_auroc(scores[idx], labels[idx]),
                                                   scores.size, n_boot, alpha, seed))
            result["ci_method"] = f"percentile bootstrap over volumes ({n_boot} resamples, seed {seed})"
        return result

    def _per_volume_dice(self, threshold: float) -> dict[str, Any]:
        if math.isnan(threshold) or not self.lesion_records:
            return {"mean": math.nan, "std": math.nan, "n": 0, "threshold": threshold}
        dice = [r.histogram.dice_at(threshold)["dice"] for r in self.lesion_records]
        return {
            "mean": float(np.mean(dice)),
            "std": float(np.std(dice)),
            "n": len(dice),
            "threshold": threshold,
        }

    def _max_dice_per_volume(self, records: Sequence[VolumeRecord] | None = None, n_boot: int = 0,
                             alpha: float = 0.05, seed: int = 0) -> dict[str, Any]:
        """[Dice] of each lesion volume at its own best threshold, mean ± std; with
        ``n_boot > 0`` a percentile-bootstrap CI of the mean over volumes (seeded)."""
        records = self.lesion_records if records is None else [r for r in records if r.is_lesion]
        dice = np.array([r.histogram.max_dice().dice for r in records])
        if not dice.size:
            return {"mean": math.nan, "std": math.nan, "n": 0}
        result = {"mean": float(np.mean(dice)), "std": float(np.std(dice)), "n": int(dice.size)}
        if n_boot > 0:
            result["ci"] = list(bootstrap_ci(lambda idx: float(dice[idx].mean()), dice.size, n_boot, alpha, seed))
            result["ci_method"] = f"percentile bootstrap over volumes ({n_boot} resamples, seed {seed})"
        return result

    def _at_threshold(self, threshold: float) -> dict[str, Any]:
        """Pooled lesion metrics and healthy false-positive fraction at one threshold."""
        # Empty pools give nan through the 0 / 0 conventions of dice_at.
        at = self.pooled_histogram().dice_at(threshold)
        healthy = self.pooled_histogram(self.healthy_records)
        return {
            "threshold": threshold,
            "threshold_used": at["threshold_used"],
            "dice": at["dice"],
            "precision": at["precision"],
            "recall": at["recall"],
            "fpr_lesion_volumes": at["fpr"],
            "fpr_healthy": healthy.dice_at(threshold)["fpr"],
            "dice_per_volume": self._per_volume_dice(threshold),
        }

    def _group_summary(self, records: Sequence[VolumeRecord]) -> dict[str, Any]:
        """Pooled pixel metrics, mean per-volume [Dice] and volume AUROC (the group's lesion
        volumes against all healthy volumes) of one group of volumes."""
        lesion = [r for r in records if r.is_lesion]
        pooled = self.pooled_histogram(lesion)
        best = pooled.max_dice()
        versus = lesion + self.healthy_records
        return {
            "n_volumes": len(records),
            "n_lesion_volumes": len(lesion),
            "pixel_ap": pooled.average_precision(),
            "pixel_auroc": pooled.auroc(),
            "max_dice": best.dice,
            "max_dice_threshold": best.threshold,
            "max_dice_upper_bound": best.upper_bound,
            "max_dice_per_volume": self._max_dice_per_volume(lesion)["mean"],
            "volume_auroc": detection_metrics([r.volume_score for r in versus],
                                              [r.is_lesion for r in versus])["auroc"] if lesion else math.nan,
        }

    def _family_summary(self) -> dict[str, Any]:
        return {family: self._group_summary(records) for family, records in sorted(self.families().items())}

    def _size_summary(self) -> dict[str, Any]:
        return {name: {**self._group_summary(records), "lesion_ml_range": [min(r.lesion_ml for r in records),
                                                                          max(r.lesion_ml for r in records)]}
                for name, records in self.sizes().items()}

    def summary(
        self,
        n_boot: int = 1000,
        target_fpr: float | None = None,
        threshold: float | None = None,
        alpha: float = 0.05,
        seed: int = 0,
    ) -> dict[str, Any]:
        """JSON-serialisable cohort metrics (nan / inf as None).

        - ``pixel``: pooled over lesion volumes: AP, AUROC, best Dice (+ threshold,
          upper bound) with subject-bootstrap CIs (``n_boot=0`` skips them);
        - ``dice_per_volume``: mean ± std over lesion volumes at the pooled best threshold;
        - ``max_dice_per_volume``: mean ± std of each lesion volume's own [Dice], with a
          percentile-bootstrap CI over volumes;
        - ``volume`` / ``slice``: detection AUROC / AP (lesion vs healthy), with the score's
          ``reduction`` and ``percentile``; ``volume["auroc_ci"]`` is ``[low, high]``, a
          percentile-bootstrap CI over volumes (``ci_method`` says how);
        - ``at_threshold``: metrics at a given threshold (e.g. a calibrated one);
        - ``at_target_fpr``: the threshold reaching ``target_fpr`` on healthy volumes
          and the metrics there;
        - ``families`` / ``sizes``: pooled pixel AP / AUROC / best Dice, mean per-volume
          [Dice] and volume AUROC per lesion family and per lesion-size group.
        """
        if not self.records:
            raise ValueError("no volumes added; call add_volume before summary.")
        pixel = self._pixel_summary(n_boot, alpha, seed)
        is_lesion = [r.is_lesion for r in self.records]
        result: dict[str, Any] = {
            "n_volumes": len(self.records),
            "n_lesion_volumes": int(sum(is_lesion)),
            "n_healthy_volumes": len(self.records) - int(sum(is_lesion)),
            "n_bins": self.n_bins,
            "value_range": list(self.value_range),
            "pixel": pixel,
            "dice_per_volume": self._per_volume_dice(pixel["max_dice"]["threshold"]),
            "max_dice_per_volume": self._max_dice_per_volume(n_boot=n_boot, alpha=alpha, seed=seed),
            "volume": self._volume_summary(n_boot, alpha, seed),
            "slice": detection_metrics(
                np.concatenate([r.slice_scores for r in self.records]),
                np.concatenate([r.slice_labels for r in self.records]),
            ),
            "families": self._family_summary(),
            "sizes": self._size_summary(),
        }
        result["slice"].update(reduction=self.slice_reduction, percentile=self.slice_percentile)
        if threshold is not None:
            result["at_threshold"] = self._at_threshold(float(threshold))
        if target_fpr is not None:
            healthy = self.pooled_histogram(self.healthy_records)
            if healthy.n_neg == 0:
                result["at_target_fpr"] = {
                    "target_fpr": target_fpr,
                    "reason": "no healthy volumes to calibrate a threshold on",
                }
            else:
                fpr_threshold = healthy.threshold_at_fpr(target_fpr)
                result["at_target_fpr"] = {
                    "target_fpr": target_fpr,
                    **self._at_threshold(fpr_threshold),
                }
        return _json_safe(result)


# ---------------------------------------------------------------------- plots
def _histograms_to_plot(
    source: CohortEvaluator | ScoreHistogram | dict[str, ScoreHistogram],
) -> dict[str, ScoreHistogram]:
    if isinstance(source, ScoreHistogram):
        return {"all": source}
    if isinstance(source, dict):
        return source
    curves = {"pooled": source.pooled_histogram()}
    families = source.families()
    if len(families) > 1:
        for family, records in sorted(families.items()):
            hist = source.pooled_histogram([r for r in records if r.is_lesion])
            if hist.n_pos:
                curves[family] = hist
    return curves


def plot_curves(
    evaluator_or_histogram: CohortEvaluator | ScoreHistogram | dict[str, ScoreHistogram],
    out_dir: str | Path,
    title: str = "",
    prefix: str = "",
    relative_thresholds: bool = False,
) -> dict[str, Path]:
    """Write roc.png, pr.png and dice.png to out_dir: pooled, plus one line per family, for a
    cohort; one line per entry for a mapping name -> histogram (e.g. one per method).
    `prefix` goes in front of the file names; `relative_thresholds` draws Dice against the
    threshold's position in each histogram's value range (methods with different ranges)."""
    # Figure + Agg canvas directly: no pyplot, no display, no global backend change.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    curves = _histograms_to_plot(evaluator_or_histogram)
    paths = {}
    for kind, xlabel, ylabel in (
        ("roc", "false-positive rate", "true-positive rate"),
        ("pr", "recall", "precision"),
        ("dice", "threshold (fraction of the score range)" if relative_thresholds else "threshold", "Dice"),
    ):
        figure = Figure(figsize=(5, 4.5))
        FigureCanvasAgg(figure)
        axes = figure.add_subplot()
        for name, hist in curves.items():
            if kind == "roc":
                x, y, _ = hist.roc_curve()
                legend = f"{name} (AUROC {hist.auroc():.3f})"
            elif kind == "pr":
                y, x, _ = hist.precision_recall_curve()
                legend = f"{name} (AP {hist.average_precision():.3f})"
            else:
                x, y = hist.dice_curve()
                if relative_thresholds:
                    low, high = hist.value_range
                    x = (x - low) / (high - low)
                legend = f"{name} (max {hist.max_dice().dice:.3f})"
            axes.plot(x, y, label=legend, drawstyle="steps-post" if kind == "pr" else None)
        if kind == "roc":
            axes.plot([0, 1], [0, 1], color="grey", linestyle=":", linewidth=1)
        axes.set_xlabel(xlabel)
        axes.set_ylabel(ylabel)
        axes.set_title(f"{title} {kind.upper()}".strip())
        axes.legend(loc="best", fontsize="small")
        figure.tight_layout()
        paths[kind] = out_dir / f"{prefix}{kind}.png"
        figure.savefig(paths[kind], dpi=120)
    return paths
