"""MONAI dictionary transforms that put synthetic anomalies into a data pipeline.

Both work on one `(1, H, W)` slice (tensor, MetaTensor or array) and its brain mask, and
write their outputs beside the input in the input's type. Their randomness comes from
MONAI's `set_random_state` (which `monai.data.DataLoader` calls once per worker): each
call draws a seed from `self.R` and builds a numpy Generator from it.

"Another image" (Poisson sources, the FPI partner) comes from a provider the bundle
passes (a callable ``provider(rng) -> image or (image, brain)``, or a list of images), or,
by default, from a ring buffer of the last slices the transform has seen: nothing to wire,
the partners are slices of the same training data, one buffer per worker.
"""

from __future__ import annotations

from typing import Hashable, Mapping, Sequence

import numpy as np
from monai.transforms import RandomizableTransform
from monai.utils import convert_to_dst_type

from medanomaly.anomalies.fpi import foreign_patch_interpolation
from medanomaly.anomalies.sources import SourceImage, SourcePool, SourceProvider, as_slice, brain_of
from medanomaly.anomalies.synthetic import SyntheticAnomaly
from medanomaly.anomalies.tasks import TASK_NAMES


class _SeededTransform(RandomizableTransform):
    def __init__(self):
        RandomizableTransform.__init__(self, prob=1.0)
        self._rng = np.random.default_rng(0)

    def randomize(self, data=None) -> None:
        self._rng = np.random.default_rng(self.R.randint(0, 2**31 - 1, size=2).tolist())


class RandSyntheticAnomalyd(_SeededTransform):
    """Writes `corrupted_key` (the slice with "many tasks" anomalies, see `SyntheticAnomaly`)
    and `anomaly_mask_key` (the changed pixels) from `image_key` and the brain mask under
    `mask_key` (non-zero pixels of the image when the key is absent)."""

    def __init__(self, image_key: str = "image", mask_key: str | None = "mask",
                 tasks: Sequence[str] = TASK_NAMES, clean_fraction: float = 0.2, max_anomalies: int = 4, *,
                 same_source: SourceProvider | Sequence[SourceImage] | None = None,
                 other_source: SourceProvider | Sequence[SourceImage] | None = None,
                 memory: int = 16, task_options: Mapping[str, Mapping] | None = None,
                 corrupted_key: str = "corrupted", anomaly_mask_key: str = "anomaly_mask"):
        super().__init__()
        self.image_key, self.mask_key = image_key, mask_key
        self.corrupted_key, self.anomaly_mask_key = corrupted_key, anomaly_mask_key
        self.anomaly = SyntheticAnomaly(tasks, clean_fraction, max_anomalies, seed=0, same_source=same_source,
                                        other_source=other_source, memory=memory, task_options=task_options)

    def __call__(self, data: Mapping[Hashable, object]) -> dict:
        d = dict(data)
        self.randomize()
        image = d[self.image_key]
        corrupted, mask = self.anomaly(image, d.get(self.mask_key) if self.mask_key else None, rng=self._rng)
        d[self.corrupted_key] = convert_to_dst_type(corrupted, image)[0]
        d[self.anomaly_mask_key] = convert_to_dst_type(mask, image)[0]
        return d


class RandFPId(_SeededTransform):
    """Writes `corrupted_key` (FPI of `image_key` with another slice), `anomaly_mask_key`
    (the square times the brain) and `alpha_key` (the blend factor, a float).

    The partner slice comes from `source` or the ring buffer; for the very first slice, with
    the buffer still empty, the partner is the slice mirrored left-right (a different
    anatomy at the same place with the same contrast). Partners must share the slice's
    grid (FPI blends the same location); a provider's slice of another shape is an error."""

    def __init__(self, image_key: str = "image", mask_key: str | None = "mask", *,
                 source: SourceProvider | Sequence[SourceImage] | None = None, memory: int = 16,
                 corrupted_key: str = "corrupted", anomaly_mask_key: str = "anomaly_mask", alpha_key: str = "alpha"):
        super().__init__()
        self.image_key, self.mask_key = image_key, mask_key
        self.corrupted_key, self.anomaly_mask_key, self.alpha_key = corrupted_key, anomaly_mask_key, alpha_key
        self.partners = SourcePool(source, memory)

    def __call__(self, data: Mapping[Hashable, object]) -> dict:
        d = dict(data)
        self.randomize()
        image = d[self.image_key]
        x = as_slice(image)
        brain = brain_of(x, d.get(self.mask_key) if self.mask_key else None)
        partner = self.partners.draw(self._rng)
        other = x[:, ::-1] * brain[:, ::-1] if partner is None else partner[0]
        corrupted, mask, alpha = foreign_patch_interpolation(x * brain, other, brain, rng=self._rng)
        self.partners.remember(x * brain, brain)
        d[self.corrupted_key] = convert_to_dst_type(corrupted[None], image)[0]
        d[self.anomaly_mask_key] = convert_to_dst_type(mask[None], image)[0]
        d[self.alpha_key] = alpha
        return d
