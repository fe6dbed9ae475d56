"""`SyntheticAnomaly`: 1-4 random anomalies from the chosen tasks, or a clean slice."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping, Sequence

import numpy as np

from medanomaly.anomalies.shapes import AnomalyRegion, sample_region
from medanomaly.anomalies.sources import (
    SourceImage,
    SourcePool,
    SourceProvider,
    as_slice,
    brain_of,
    like_input,
)
from medanomaly.anomalies.tasks import TASK_NAMES, TASKS

_MIN_BRAIN_PIXELS = 16  # slices with less brain than this are returned clean
CHANGED = 1e-3  # a pixel a task moved by more than this is part of the anomaly mask


@dataclass
class AnomalyResult:
    """The corrupted slice, the mask of changed pixels (in the input's layout, float32) and
    the (task name, region) of every anomaly, in the order they were applied."""

    image: np.ndarray
    mask: np.ndarray
    anomalies: list[tuple[str, AnomalyRegion]] = field(default_factory=list)


class SyntheticAnomaly:
    """Corrupts a healthy slice for restoration training ("many tasks", cDDPM).

    With probability `clean_fraction` the slice is returned unchanged with an empty mask;
    otherwise 1 to `max_anomalies` anomalies are applied one after the other (after each,
    another follows with probability 1/2, as in the reference code), each with a task drawn
    uniformly from `tasks`.

    Sources of the Poisson tasks: "poisson_same" takes its patch from `same_source` (a
    callable ``provider(rng) -> image or (image, brain)``, or a sequence of images) or, when
    None, from a ring buffer of the last `memory` slices this object has corrupted (the same
    training data; the very first slice blends a patch from another place of itself).
    "poisson_other" needs `other_source`, e.g. slices of a differently contrasted cohort.

    `task_options` maps a task name to keyword options of its function (e.g.
    ``{"intensity": {"scale": 0.1}, "sink": {"push_range": (0.5, 5)}}``).
    Random numbers come from `seed` (an int or a numpy Generator), or from the `rng` given
    to a call (the MONAI wrapper does this); no global random state is used.
    """

    def __init__(self, tasks: Sequence[str] = TASK_NAMES, clean_fraction: float = 0.2, max_anomalies: int = 4,
                 seed: int | np.random.Generator | None = None, *,
                 same_source: SourceProvider | Sequence[SourceImage] | None = None,
                 other_source: SourceProvider | Sequence[SourceImage] | None = None,
                 memory: int = 16, task_options: Mapping[str, Mapping] | None = None):
        self.tasks = tuple(tasks)
        unknown = [t for t in self.tasks if t not in TASKS]
        if unknown or not self.tasks:
            raise ValueError(f"Unknown or no anomaly tasks {unknown}: choose from {list(TASK_NAMES)}.")
        if "poisson_other" in self.tasks and other_source is None:
            raise ValueError("The task 'poisson_other' blends patches from another source: pass "
                             "other_source (images or a callable rng -> image), or drop the task.")
        if not 0.0 <= clean_fraction <= 1.0 or max_anomalies < 1:
            raise ValueError(f"clean_fraction must lie in [0, 1] (got {clean_fraction}) and max_anomalies "
                             f"be at least 1 (got {max_anomalies}).")
        self.clean_fraction, self.max_anomalies = float(clean_fraction), int(max_anomalies)
        self.rng = np.random.default_rng(seed)
        self.same_source = SourcePool(same_source, memory)
        self.other_source = SourcePool(other_source)
        self.task_options = {name: dict(options) for name, options in (task_options or {}).items()}

    def __call__(self, image, brain_mask=None, rng: np.random.Generator | None = None):
        """`(corrupted_image, anomaly_mask)` in the layout of `image`, float32."""
        result = self.sample(image, brain_mask, rng)
        return result.image, result.mask

    def sample(self, image, brain_mask=None, rng: np.random.Generator | None = None) -> AnomalyResult:
        rng = self.rng if rng is None else rng
        clean = as_slice(image)
        brain = brain_of(clean, brain_mask)
        clean *= brain
        corrupted, mask, anomalies = clean.copy(), np.zeros(clean.shape, dtype=bool), []
        if rng.random() >= self.clean_fraction and np.count_nonzero(brain) >= _MIN_BRAIN_PIXELS:
            for _ in range(self._anomaly_count(rng)):
                task = self.tasks[rng.integers(len(self.tasks))]
                region = sample_region(brain, rng)
                if region is None:
                    continue
                corrupted = TASKS[task](corrupted, brain, region, rng, source=self._source(task, clean, brain, rng),
                                        **self.task_options.get(task, {}))
                mask |= region.mask(clean.shape) & brain
                anomalies.append((task, region))
        self.same_source.remember(clean, brain)  # after use: a slice is never its own buffered source
        corrupted = np.clip(corrupted, 0.0, 1.0) * brain
        # a task may move pixels just outside its region (the Poisson box solve): as in the
        # reference code, those that moved by more than CHANGED count as anomalous too
        mask |= np.abs(corrupted - clean) > CHANGED
        return AnomalyResult(like_input(corrupted, image), like_input(mask, image), anomalies)

    def _anomaly_count(self, rng: np.random.Generator) -> int:
        count = 1
        while count < self.max_anomalies and rng.random() < 0.5:
            count += 1
        return count

    def _source(self, task: str, clean: np.ndarray, brain: np.ndarray, rng: np.random.Generator):
        if task == "poisson_other":
            return self.other_source.draw(rng)
        if task == "poisson_same":
            drawn = self.same_source.draw(rng)
            return (clean, brain) if drawn is None else drawn
        return None
