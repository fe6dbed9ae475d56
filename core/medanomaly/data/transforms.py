"""MONAI transforms of the brain-MRI pipeline.

One chain serves training, calibration, inference and evaluation:
load -> brain mask -> crop to the brain's box -> RAS -> resample -> percentile normalisation ->
crop to the brain -> pad/crop the axial plane to the model size. Every spatial step is one of MONAI's invertible
transforms, so `monai.transforms.Invertd` brings slice-wise outputs back to the input grid.
"""

from __future__ import annotations

from typing import Hashable, Mapping, Sequence

import numpy as np
import torch
from monai.data import MetaTensor
from monai.transforms import (
    Compose,
    CropForegroundd,
    EnsureTyped,
    FgBgToIndicesd,
    LoadImaged,
    MapTransform,
    Orientationd,
    RandCropByPosNegLabeld,
    ResizeWithPadOrCropd,
    Spacingd,
    SqueezeDimd,
)
from scipy import ndimage

from medanomaly import io

IMAGE, MASK, LABEL = "image", "mask", "label"
# Keys under which the normalisation stores its intensity window in the image's meta,
# so a pseudo-healthy image can be mapped back to scanner intensities.
INTENSITY_LOW, INTENSITY_HIGH = "medanomaly_intensity_low", "medanomaly_intensity_high"


class CheckVolumed(MapTransform):
    """Fails early, with a message a user can act on, on files that are not 3D volumes."""

    def __call__(self, data: Mapping[Hashable, object]) -> dict:
        d = dict(data)
        for key in self.key_iterator(d):
            if isinstance(d[key], (str, bytes)) or hasattr(d[key], "__fspath__"):
                io.check_volume_file(d[key])
        return d


def bounding_box(mask: np.ndarray) -> tuple[slice, ...]:
    """The smallest box (one slice per axis) holding every non-zero voxel of a non-empty mask."""
    box = []
    for axis in range(mask.ndim):
        occupied = np.flatnonzero(mask.any(axis=tuple(a for a in range(mask.ndim) if a != axis)))
        box.append(slice(int(occupied[0]), int(occupied[-1]) + 1))
    return tuple(box)


def brain_mask_from_image(volume: np.ndarray, threshold_fraction: float = 0.02) -> np.ndarray:
    """Brain mask of a skull-stripped volume: voxels above a small fraction of the robust
    maximum, the largest connected component, holes filled."""
    positive = volume[volume > 0]
    robust_max = np.percentile(positive, 99) if positive.size else 0.0
    del positive
    foreground = volume > threshold_fraction * robust_max
    if not foreground.any():
        raise io.VolumeError("The image has no foreground: cannot find the brain.")
    # labelling and hole filling inside the foreground's box: memory follows the brain, not the grid
    # (outside the box is background, so a hole is a hole in the box as in the whole volume)
    box = bounding_box(foreground)
    labels, _ = ndimage.label(foreground[box])
    sizes = np.bincount(labels.ravel())
    sizes[0] = 0
    mask = np.zeros(volume.shape, dtype=bool)
    mask[box] = ndimage.binary_fill_holes(labels == sizes.argmax())
    return mask


class BrainMaskd(MapTransform):
    """Adds a brain mask where the data brings none (inputs are expected skull-stripped,
    as in the public anomaly-detection cohorts); a given mask is only binarised."""

    def __init__(self, image_key: str = IMAGE, mask_key: str = MASK, threshold_fraction: float = 0.02):
        super().__init__(keys=[image_key])
        self.image_key, self.mask_key, self.threshold_fraction = image_key, mask_key, threshold_fraction

    def __call__(self, data: Mapping[Hashable, object]) -> dict:
        d = dict(data)
        image = d[self.image_key]
        if isinstance(d.get(self.mask_key), torch.Tensor):
            if d[self.mask_key].shape[1:] != image.shape[1:]:
                raise io.VolumeError(
                    f"The brain mask has shape {tuple(d[self.mask_key].shape[1:])} but the image "
                    f"{tuple(image.shape[1:])}: they must share one grid."
                )
            d[self.mask_key] = (d[self.mask_key] > 0.5).to(torch.float32)
            return d
        mask = brain_mask_from_image(np.asarray(image[0]), self.threshold_fraction)
        d[self.mask_key] = MetaTensor(
            torch.from_numpy(mask[None].astype(np.float32)), affine=image.affine, meta=dict(image.meta)
        )
        return d


class EmptyLabeld(MapTransform):
    """Adds an all-zero lesion mask shaped like `like` to an entry without one (a healthy subject);
    a given lesion mask is binarised."""

    def __init__(self, label_key: str = LABEL, like: str = MASK):
        super().__init__(keys=[label_key])
        self.label_key, self.like = label_key, like

    def __call__(self, data: Mapping[Hashable, object]) -> dict:
        d = dict(data)
        if isinstance(d.get(self.label_key), torch.Tensor):
            if d[self.label_key].shape[1:] != d[self.like].shape[1:]:
                raise io.VolumeError(f"The lesion mask has shape {tuple(d[self.label_key].shape[1:])} but the "
                                     f"image {tuple(d[self.like].shape[1:])}: they must share one grid.")
            d[self.label_key] = (d[self.label_key] > 0.5).to(torch.float32)
        else:
            d[self.label_key] = torch.zeros_like(d[self.like])
        return d


class NormaliseBrainIntensityd(MapTransform):
    """Maps the brain's [lower, upper] intensity percentiles to [0, 1], clips, zeroes the
    background. Percentiles over brain voxels only: background zeros would shift them."""

    def __init__(self, image_key: str = IMAGE, mask_key: str = MASK, lower: float = 0.5, upper: float = 99.5):
        super().__init__(keys=[image_key])
        self.image_key, self.mask_key, self.lower, self.upper = image_key, mask_key, lower, upper

    def __call__(self, data: Mapping[Hashable, object]) -> dict:
        d = dict(data)
        image, mask = d[self.image_key], d[self.mask_key] > 0.5
        brain = image[mask]
        if brain.numel() == 0:
            raise io.VolumeError("The brain mask is empty after resampling: nothing to analyse.")
        low, high = (float(v) for v in torch.quantile(brain.float()[:: max(1, brain.numel() // 2_000_000)],
                                                       torch.tensor([self.lower, self.upper]) / 100))
        scaled = ((image - low) / max(high - low, 1e-6)).clamp(0, 1) * mask
        if isinstance(scaled, MetaTensor):
            scaled.meta[INTENSITY_LOW], scaled.meta[INTENSITY_HIGH] = low, high
        d[self.image_key] = scaled
        return d


def preprocessing(
    pixdim: Sequence[float] = (1.5, 1.5, 1.5),
    image_size: Sequence[int] = (128, 128),
    lower_percentile: float = 0.5,
    upper_percentile: float = 99.5,
    reader: str = "medanomaly",
    label: bool = False,
) -> Compose:
    """Deterministic chain from file paths `{"image", "mask"?}` to a brain-centred volume
    `(1, H, W, Z)` in RAS at `pixdim`, intensities in [0, 1], with its brain mask.
    `reader="medanomaly"` reads through `medanomaly.io.read_volume` (every format SimpleITK reads,
    DICOM series, the same series and checks as the outputs' writer); a MONAI reader name
    ("ITKReader", "NibabelReader") is used as MONAI reads it, after a header check.
    `label=True` brings the lesion mask `"label"` along on the same grid (all zeros for an
    entry without one: a healthy subject), for supervised training."""
    keys = [IMAGE, MASK, LABEL] if label else [IMAGE, MASK]
    return Compose(
        [
            *_loaders(keys, reader),
            EnsureTyped(keys=keys, dtype=torch.float32, allow_missing_keys=True),
            BrainMaskd(IMAGE, MASK),
            *([EmptyLabeld(LABEL, like=MASK)] if label else []),
            # the brain's box first: memory and time then follow the brain, not the grid (a brain in a
            # mostly empty 512 x 512 x 400 field); the margin keeps interpolation context for resampling
            CropForegroundd(keys=keys, source_key=MASK, margin=4, allow_smaller=True),
            Orientationd(keys=keys, axcodes="RAS"),
            Spacingd(keys=keys, pixdim=pixdim, mode=("bilinear", *["nearest"] * (len(keys) - 1))),
            NormaliseBrainIntensityd(IMAGE, MASK, lower_percentile, upper_percentile),
            CropForegroundd(keys=keys, source_key=MASK, allow_smaller=True),
            ResizeWithPadOrCropd(keys=keys, spatial_size=(*image_size, -1)),
        ]
    )


def _loaders(keys: list[str], reader: str) -> list:
    """Loading of the image and its masks: a mask or label may be constant (empty), the image not."""
    options = dict(ensure_channel_first=True, image_only=True, allow_missing_keys=True)
    if reader == "medanomaly":
        return [LoadImaged(keys=keys[:1], reader=io.VolumeReader(), **options),
                LoadImaged(keys=keys[1:], reader=io.VolumeReader(allow_constant=True), **options)]
    return [CheckVolumed(keys=keys, allow_missing_keys=True), LoadImaged(keys=keys, reader=reader, **options)]


def random_axial_slices(num_samples: int) -> list:
    """Random axial slices through the brain, `(1, H, W)` each; a slice is drawn with
    probability proportional to its brain area (centres sampled from the mask)."""
    keys = [IMAGE, MASK]
    return [
        # deterministic, so a CacheDataset keeps the brain voxel indices instead of
        # recomputing them for every sample
        FgBgToIndicesd(keys=MASK, fg_postfix="_brain_indices", bg_postfix="_background_indices"),
        RandCropByPosNegLabeld(keys=keys, label_key=MASK, spatial_size=(-1, -1, 1), pos=1, neg=0,
                               num_samples=num_samples, fg_indices_key=f"{MASK}_brain_indices",
                               bg_indices_key=f"{MASK}_background_indices"),
        SqueezeDimd(keys=keys, dim=-1),
    ]


def lesion_balanced_axial_slices(num_samples: int, lesion_weight: float = 1.0, brain_weight: float = 1.0) -> list:
    """Random axial slices `(1, H, W)` of image, brain mask and lesion mask for supervised training:
    a slice centre is a lesion voxel with probability lesion_weight / (lesion_weight + brain_weight),
    else a brain voxel outside the lesion (a subject without lesion gives brain slices only).
    Needs `preprocessing(label=True)`."""
    keys = [IMAGE, MASK, LABEL]
    return [
        RandCropByPosNegLabeld(keys=keys, label_key=LABEL, spatial_size=(-1, -1, 1), pos=lesion_weight,
                               neg=brain_weight, num_samples=num_samples, image_key=MASK, image_threshold=0.5),
        SqueezeDimd(keys=keys, dim=-1),
    ]


def intensity_window(image: MetaTensor) -> tuple[float, float] | None:
    """The (low, high) scanner intensities that normalisation mapped to (0, 1), if recorded."""
    meta = getattr(image, "meta", {})
    if INTENSITY_LOW in meta:
        return float(meta[INTENSITY_LOW]), float(meta[INTENSITY_HIGH])
    return None


def axial_axis(affine: np.ndarray | torch.Tensor) -> int:
    """Index of the voxel axis closest to the scanner's inferior-superior direction."""
    affine = np.asarray(affine, dtype=float)[:3, :3]
    return int(np.argmax(np.abs(affine[2]) / np.linalg.norm(affine, axis=0)))

