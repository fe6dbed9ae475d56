"""One volume after `Invertd`: its prediction (`pred`: anomaly map ++ pseudo-healthy image) and
what it is scored against (brain mask, label), all on the input file's own grid. Shared by the
output writer and the cohort handlers, so written and evaluated maps are the same voxels.
"""

from __future__ import annotations

from typing import Mapping

import numpy as np
import SimpleITK as sitk
import torch
from monai.data import MetaTensor

from medanomaly import io
from medanomaly.bundles.outputs import subject_name
from medanomaly.data import IMAGE, LABEL, MASK, brain_mask_from_image

PRED = "pred"


def item_subject_name(item: Mapping, index: int | None = None) -> str:
    """`outputs.subject_name` of a (batched, when `index` is given) dictionary item."""
    subject = item.get("subject")
    if index is not None and isinstance(subject, (list, tuple)):
        subject = subject[index]
    image = item[IMAGE]
    source = image.meta.get("filename_or_obj", "volume") if isinstance(image, MetaTensor) else "volume"
    if index is not None and isinstance(source, (list, tuple)):
        source = source[index]
    return subject_name(subject, source)


def source_file(item: Mapping, key: str = IMAGE) -> str:
    """The file `item[key]` was read from."""
    source = item[key].meta["filename_or_obj"]
    return source[0] if isinstance(source, (list, tuple)) else source


def to_numpy(tensor: torch.Tensor) -> np.ndarray:
    return tensor.detach().cpu().numpy() if isinstance(tensor, torch.Tensor) else np.asarray(tensor)


def scored_heatmap(item: Mapping) -> np.ndarray:
    """The inverted anomaly map on the input grid; voxels the method did not score (NaN or
    infinite) are 0, as are those outside its crop (the inverse transforms pad with 0)."""
    heatmap = to_numpy(item[PRED][0]).astype(np.float32)  # a copy: the prediction stays as it is
    heatmap[~np.isfinite(heatmap)] = 0.0
    return heatmap


def supplied_brain_mask(item: Mapping) -> np.ndarray:
    """The brain mask every method is scored on, on the input grid: the mask file the item
    supplies, else the image's foreground as `BrainMaskd` derives it (which then stores the
    image as the mask's source). Never the mask after its round trip through a method's model
    grid (`Invertd`), which loses edge voxels differently for each pixdim and crop."""
    image_file = source_file(item)
    mask_file = source_file(item, MASK) if isinstance(item.get(MASK), MetaTensor) else image_file
    if mask_file != image_file:
        return _input_grid_mask(mask_file, image_file, "The brain mask")
    # the mask of the (Z, Y, X) voxels as SimpleITK holds them, then transposed: no copy of the image
    # (the view lives only as long as `image`, which is why it is a variable)
    image = io.read_volume(image_file)
    return brain_mask_from_image(sitk.GetArrayViewFromImage(image)).transpose(2, 1, 0)


def label_array(item: Mapping, shape: tuple) -> np.ndarray:
    """Ground-truth lesion mask on the input grid; all zeros for a healthy subject."""
    label = item.get(LABEL)
    return np.zeros(shape, dtype=bool) if label is None else _input_grid_mask(label, source_file(item), "The label")


def _input_grid_mask(path, image_file, what: str) -> np.ndarray:
    """A binary volume file (> 0.5) that must lie on the input image's grid (`io.check_same_grid`)."""
    io.check_same_grid(image_file, path, what=what)
    return io.volume_array(io.read_volume(path, allow_constant=True)) > 0.5
