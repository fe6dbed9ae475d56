"""Slice layout helpers and the pools that hand tasks "another image" (Poisson sources, FPI)."""

from __future__ import annotations

from collections import deque
from typing import Callable, Sequence, Union

import numpy as np

SourceImage = Union[np.ndarray, tuple[np.ndarray, np.ndarray]]  # an image, or (image, brain mask)
SourceProvider = Callable[[np.random.Generator], SourceImage]


def as_slice(image, name: str = "image") -> np.ndarray:
    """A 2D float64 copy of an (H, W) or (1, H, W) array or tensor."""
    array = np.asarray(image, dtype=np.float64)
    if array.ndim == 3 and array.shape[0] == 1:
        array = array[0]
    if array.ndim != 2:
        raise ValueError(f"The {name} has shape {tuple(array.shape)}: synthetic anomalies work on one 2D "
                         "slice, (H, W) or (1, H, W); split volumes and batches into slices first.")
    return array.copy()


def brain_of(image: np.ndarray, brain_mask=None) -> np.ndarray:
    """The boolean brain mask of a 2D slice: the given one, or the non-zero pixels."""
    if brain_mask is None:
        return image > 0
    brain = as_slice(brain_mask, "brain mask") > 0.5
    if brain.shape != image.shape:
        raise ValueError(f"The brain mask has shape {brain.shape} but the image {image.shape}: "
                         "give the mask of this very slice.")
    return brain


def like_input(array: np.ndarray, original) -> np.ndarray:
    """`array` (2D) as float32 in the layout of `original`: (H, W) or (1, H, W)."""
    array = np.asarray(array, dtype=np.float32)
    return array[None] if np.ndim(original) == 3 else array


def as_provider(source: SourceProvider | Sequence[SourceImage] | None) -> SourceProvider | None:
    """A callable `provider(rng) -> image or (image, brain)`; a sequence becomes a uniform draw."""
    if source is None or callable(source):
        return source
    images = list(source)
    if not images:
        raise ValueError("The list of source images is empty: give at least one image, or None.")
    return lambda rng: images[rng.integers(len(images))]


class SourcePool:
    """Where a task gets another image from: the caller's `provider` when given, otherwise a
    ring buffer of the last `memory` slices this pool has seen. A ring buffer needs nothing
    from the caller and, in a data loader, holds slices of the same training data (one
    buffer per worker process); it is empty for the very first slice."""

    def __init__(self, provider: SourceProvider | Sequence[SourceImage] | None = None, memory: int = 16):
        self.provider = as_provider(provider)
        self.seen = deque(maxlen=max(int(memory), 1))

    def draw(self, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray] | None:
        """(image, brain) of another slice, or None while the ring buffer is still empty."""
        if self.provider is not None:
            drawn = self.provider(rng)
            image, brain = drawn if isinstance(drawn, tuple) else (drawn, None)
            image = as_slice(image, "source image")
            return image, brain_of(image, brain)
        if not self.seen:
            return None
        return self.seen[rng.integers(len(self.seen))]

    def remember(self, image: np.ndarray, brain: np.ndarray) -> None:
        if self.provider is None:
            self.seen.append((image.copy(), brain.copy()))
