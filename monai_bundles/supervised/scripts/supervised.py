"""Supervised ceiling: a segmentation network trained WITH lesion labels; its lesion probability is
the heatmap. Not an anomaly detector: it is the upper reference the unsupervised methods are read
against on synthetic data, where labelled lesion subjects of the same kind as the test lesions exist.

One set of weights serves every contrast it was trained on: the training set is the union over
contrasts of the same subjects (each contrast a separate entry).
"""

from __future__ import annotations

import copy
import logging
from typing import Iterable, Sequence

import ignite.distributed as idist
import torch
from ignite.engine import Engine, Events
from ignite.metrics import Metric

from medanomaly.bundles.inputs import resolve_inputs
from medanomaly.bundles.method import SliceAnomalyMethod
from medanomaly.bundles.model_info import update_model_info
from medanomaly.data import CONTRASTS, resolve_datalist
from medanomaly.data.companion import companion_lesion_subjects, synthetic_provenance
from medanomaly.data.contrast import check_contrasts, contrast_of_item
from medanomaly.metrics import ScoreHistogram

logger = logging.getLogger(__name__)


class SupervisedCeilingMethod(SliceAnomalyMethod):
    """Anomaly map = the network's lesion probability (softmax channel `lesion_channel`, or the
    sigmoid of a one-channel output). There is no pseudo-healthy image: the input image itself is
    returned in its place, so the shared outputs stay complete."""

    def __init__(self, network: torch.nn.Module, lesion_channel: int = 1, **smoothing):
        super().__init__(**smoothing)
        self.network, self.lesion_channel = network, lesion_channel

    def lesion_probability(self, image: torch.Tensor) -> torch.Tensor:
        logits = self.network(image)
        if logits.shape[1] == 1:
            return torch.sigmoid(logits)
        return torch.softmax(logits, dim=1)[:, self.lesion_channel : self.lesion_channel + 1]

    def anomaly_and_reconstruction(self, image: torch.Tensor, mask: torch.Tensor):
        return self.lesion_probability(image), image


# --------------------------------------------------------------------------- data over contrasts
def _contrast_datalists(datalist, contrasts: Iterable[str]) -> dict:
    """{datalist file: contrast asked for}, one file per contrast (a preset's per-contrast files);
    a single datalist file that serves every contrast appears once."""
    files: dict = {}
    for contrast in check_contrasts(contrasts):
        files.setdefault(resolve_datalist(datalist, contrast), contrast)
    return files


def _with_contrast(items: Iterable[dict]) -> list[dict]:
    """Entries with their `contrast` (`contrast_of_item`; None when unknown), each image once; a
    subject id becomes ``<subject>_<contrast>`` (BIDS-like), one id per volume across contrasts."""
    seen, unique = set(), []
    for item in items:
        if item["image"] not in seen:
            seen.add(item["image"])
            contrast = contrast_of_item(item)
            named = {"subject": f"{item['subject']}_{contrast}"} if contrast and item.get("subject") else {}
            unique.append({**item, "contrast": contrast, **named})
    return unique


def contrast_items(datalist, contrasts: Sequence[str] = CONTRASTS,
                   keys: str | Sequence[str] = "validation_lesion") -> list[dict]:
    """Entries of the `keys` splits of `datalist` (a preset name or a datalist file) over `contrasts`."""
    return _with_contrast(item for path in _contrast_datalists(datalist, contrasts)
                          for item in resolve_inputs(datalist=path, keys=keys))


def _lesion_subjects(path, contrast: str, lesion_key: str | None, n_lesion_subjects: int) -> list[dict]:
    """Labelled lesion subjects for training: the `lesion_key` split of the datalist, or for a synthetic
    cohort `n_lesion_subjects` of its companion cohort (another seed: never a validation or test subject)."""
    if lesion_key:
        items = resolve_inputs(datalist=path, keys=lesion_key)
    elif synthetic_provenance(path) is not None:
        items = companion_lesion_subjects(path, n_lesion_subjects, contrast=contrast)
    else:
        raise ValueError(f"Datalist {path} has no labelled lesion subjects for training: name a split of "
                         "lesion subjects with a 'label' (--lesion_key); the test splits are never used.")
    unlabelled = [item["image"] for item in items if "label" not in item]
    if unlabelled:
        raise ValueError(f"Lesion subjects without a 'label' (lesion mask) cannot train the supervised bundle: "
                         f"{unlabelled[:3]}")
    return items


def training_items(datalist, contrasts: Sequence[str] = CONTRASTS, healthy_key: str = "training",
                   lesion_key: str | None = None, n_lesion_subjects: int = 32,
                   n_healthy_subjects: int | None = None) -> list[dict]:
    """The labelled training set over `contrasts`: the cohort's healthy `healthy_key` subjects (the
    first `n_healthy_subjects`, default all; no label: an empty lesion mask) and the lesion subjects
    of `_lesion_subjects`, each contrast a separate entry."""
    items = []
    for path, contrast in _contrast_datalists(datalist, contrasts).items():
        healthy = resolve_inputs(datalist=path, keys=healthy_key)[:n_healthy_subjects]
        items += [{k: v for k, v in item.items() if k != "label"} for item in healthy]
        items += _lesion_subjects(path, contrast, lesion_key, n_lesion_subjects)
    items = _with_contrast(items)
    logger.info("Supervised training set: %d entries (%d with lesions), contrasts %s.", len(items),
                sum("label" in item for item in items), ", ".join(contrasts_of(items) or ["unknown"]))
    return items


def contrasts_of(items: Iterable[dict]) -> list[str]:
    """The known contrasts among `items`, in the order of CONTRASTS."""
    found = {item.get("contrast") for item in items}
    return [c for c in CONTRASTS if c in found]


class BestMetricInfoHandler:
    """After each validation, records the best validation metric so far and its epoch in
    `model_info.json` (the weights in model.pt are the ones that reached it)."""

    def __init__(self, model_dir: str, name: str = "best_val_max_dice"):
        self.model_dir, self.name = model_dir, name

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.COMPLETED, self._write)

    def _write(self, engine: Engine) -> None:
        best, epoch = getattr(engine.state, "best_metric", None), getattr(engine.state, "best_metric_epoch", None)
        if best is not None and best != -1:
            update_model_info(self.model_dir, **{self.name: round(float(best), 4), f"{self.name}_epoch": int(epoch)})


class PooledMaxDice(Metric):
    """Validation metric: [Dice], the best Dice over thresholds of the lesion probability pooled
    over all validation volumes (the benchmark's own metric, with 1,000 bins, over whole volumes:
    background voxels are easy negatives). Threshold-free, so model selection follows how well the
    map ranks lesion voxels even while no voxel is above 0.5 yet (argmax Dice stays 0 for the
    first thousands of steps of a small-lesion task). `output` is (logits, labels), as lists of
    decollated (C, ...) tensors or batched tensors. In a distributed training each rank validates its
    share of the volumes and the histograms are summed over the ranks (ignite.distributed)."""

    def __init__(self, lesion_channel: int = 1, n_bins: int = 1000, output_transform=lambda x: x, device="cpu"):
        self.lesion_channel, self.n_bins = lesion_channel, n_bins
        super().__init__(output_transform=output_transform, device=device)

    def reset(self) -> None:
        self.histogram = ScoreHistogram(self.n_bins, (0.0, 1.0))

    def update(self, output) -> None:
        logits, labels = output
        for logit, label in zip(logits, labels):
            probability = torch.softmax(logit.float(), dim=0)[self.lesion_channel]
            self.histogram.update(probability.detach().cpu().numpy(), (label[0] > 0).cpu().numpy())

    def compute(self) -> float:
        histogram = self.histogram
        if idist.get_world_size() > 1:  # validation shared out over the ranks of a distributed training
            histogram = copy.copy(histogram)
            histogram.pos_counts, histogram.neg_counts = (
                idist.all_reduce(torch.from_numpy(counts.copy())).cpu().numpy()
                for counts in (self.histogram.pos_counts, self.histogram.neg_counts))
        return float(histogram.max_dice().dice)
