"""Preprocess once per cohort, not once per run.

`PersistentCacheDataset` is MONAI's `CacheDataset` (every volume's deterministic preprocessing
kept in memory for the run) whose cache items are also written to disk by MONAI's
`PersistentDataset` machinery and read back by the next run: training, calibration and
evaluation of every bundle start from preprocessed volumes after the first run.

A cache file is named by (a) the item: its paths with each file's size and modification time,
so a regenerated or replaced scan is preprocessed again, and (b) the deterministic prefix of the
transform chain, pickled: a changed pipeline (spacing, size, reader, normalisation) gets files
of its own. The cache lives in ``$MEDANOMALY_HOME/cache/preprocessed`` (next to the synthetic
cohorts; ``$MEDANOMALY_PREPROCESSED_CACHE`` moves it; deleting it is always safe); `cache_dir=None` in a config
keeps the default, `persistent=False` makes it a plain in-memory `CacheDataset`.
"""

from __future__ import annotations

import hashlib
import logging
import os
import pickle
from pathlib import Path
from typing import Callable, Sequence

import torch
from monai.data import CacheDataset, PersistentDataset
from monai.transforms import Compose, RandomizableTrait, Transform, convert_to_contiguous
from monai.utils import convert_to_tensor

logger = logging.getLogger(__name__)


CACHE_ENV = "MEDANOMALY_PREPROCESSED_CACHE"


def default_cache_dir() -> Path:
    """``$MEDANOMALY_PREPROCESSED_CACHE``, else ``$MEDANOMALY_HOME/cache/preprocessed``."""
    from medanomaly.data.synth import medanomaly_home

    return Path(os.environ.get(CACHE_ENV) or medanomaly_home() / "cache" / "preprocessed")


def item_stamp_hash(item) -> bytes:
    """Hash of a datalist item: its keys and values, and for every value that is an existing file
    that file's size and modification time."""
    parts = []
    for key in sorted(item, key=str):
        value = item[key]
        stamp = ""
        if isinstance(value, (str, os.PathLike)) and os.path.isfile(value):
            stat = os.stat(value)
            stamp = f"{stat.st_size}:{stat.st_mtime_ns}"
        parts.append(f"{key}={value!r}@{stamp}")
    return hashlib.sha256("\n".join(parts).encode()).hexdigest().encode()


def transform_hash(transforms: Sequence[Callable]) -> bytes:
    """Hash of the deterministic transforms (pickled, so their parameters count)."""
    return hashlib.sha256(pickle.dumps(list(transforms), protocol=4)).hexdigest()[:16].encode()


def deterministic_prefix(transform) -> list:
    """The transforms a cache stores: those before the first random one (MONAI's rule)."""
    prefix = []
    for t in Compose(transform).flatten().transforms:
        if isinstance(t, RandomizableTrait) or not isinstance(t, Transform):
            break
        prefix.append(t)
    return prefix


def _picklable(transform) -> bool:
    try:
        pickle.dumps(deterministic_prefix(transform), protocol=4)
    except Exception:  # noqa: BLE001 - any reason it cannot be pickled means: no disk cache
        return False
    return True


class PersistentCacheDataset(CacheDataset):
    """`CacheDataset` whose cached (deterministic) part persists on disk across runs."""

    def __init__(self, data: Sequence, transform, cache_dir: str | Path | None = None, persistent: bool = True,
                 **kwargs):
        self.disk = None
        if persistent and not _picklable(transform):
            logger.warning("The preprocessing chain cannot be pickled, so it cannot key a disk cache: caching in "
                           "memory for this run only.")
            persistent = False
        if persistent:
            cache_dir = Path(cache_dir) if cache_dir else default_cache_dir()
            cache_dir.mkdir(parents=True, exist_ok=True)
            self.disk = PersistentDataset(data=data, transform=transform, cache_dir=cache_dir,
                                          hash_func=item_stamp_hash, hash_transform=transform_hash,
                                          track_meta=True, weights_only=False)
        super().__init__(data=data, transform=transform, **kwargs)

    def _load_cache_item(self, idx: int):
        if self.disk is None:
            return super()._load_cache_item(idx)
        # the same types whether the item was just computed or read back (the disk copy holds tensors)
        item = convert_to_tensor(self.disk._cachecheck(self.data[idx]), convert_numeric=False, track_meta=True)
        if self.as_contiguous:
            item = convert_to_contiguous(item, memory_format=torch.contiguous_format)
        return item
