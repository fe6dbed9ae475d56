"""Which MR contrast a bundle's weights were trained on, and the check that inputs match it.

Training records the contrast in ``model_info.json`` (``"contrast"``: one name, or a list for
weights trained on several); `check_input_contrasts` compares each input with it before any
model runs. Inputs of unknown contrast, and weights without a recorded one, are not checked.
"""

from __future__ import annotations

import logging
import os
from typing import Mapping, Sequence

from medanomaly.bundles.model_info import read_model_info, weights_contrasts
from medanomaly.data.contrast import CONTRASTS, check_contrast, contrast_of_item
from medanomaly.data.datalist import load_datalist, read_datalist

logger = logging.getLogger(__name__)


def contrast_record(contrasts) -> str | list[str]:
    """The ``model_info.json`` value of a set of contrasts: one name, or a list in `CONTRASTS` order."""
    chosen = {check_contrast(c) for c in ([contrasts] if isinstance(contrasts, str) else contrasts)}
    if not chosen:
        raise ValueError("No contrast to record.")
    ordered = [c for c in CONTRASTS if c in chosen]
    return ordered[0] if len(ordered) == 1 else ordered


def training_contrast(datalist, contrast: str | None = None, key: str = "training") -> str | list[str]:
    """The contrast(s) of the `key` split that training reads from `datalist` (a preset, resolved
    for `contrast`, or a datalist file): each entry's ``contrast``, else the datalist's, else the
    file's BIDS suffix; `contrast` (default T1w) when none of them says."""
    from medanomaly.data import DEFAULT_CONTRAST, resolve_datalist

    path = resolve_datalist(datalist, contrast)
    declared = read_datalist(path).get("contrast")
    found = {contrast_of_item(item, declared) for item in load_datalist(path, key)} - {None}
    return contrast_record(found or [contrast or DEFAULT_CONTRAST])


def inputs_contrast(items: Sequence[Mapping], default: str | None = None) -> str | None:
    """The one contrast of all `items` (each's ``contrast``, else its file's BIDS suffix), or
    `default` when they do not say or do not agree. It picks the shipped weights
    (`model_info.shipped_model_dir`): a FLAIR scan gets FLAIR weights where a bundle has them."""
    found = {contrast_of_item(item) for item in items}
    return found.pop() if len(found) == 1 and None not in found else default


def mismatch_message(model_dir, expected: Sequence[str], mismatched: Sequence[tuple[Mapping, str]]) -> str:
    bundle = weights_bundle_name(model_dir)
    item, found = mismatched[0]
    more = f" (and {len(mismatched) - 1} more input(s) not in {'/'.join(expected)})" if len(mismatched) > 1 else ""
    return (f"Contrast mismatch: the {bundle} weights in {model_dir} were trained on {'/'.join(expected)}, "
            f"but input {item.get('image')} is {found}{more}. Heatmaps on another contrast are not "
            f"reliable: use weights trained on {found} (medanomaly train {bundle} --contrast {found}).")


def weights_bundle_name(model_dir) -> str:
    """The bundle the weights in `model_dir` belong to: model_info's ``bundle``, else the folder above."""
    folder_above = os.path.basename(os.path.dirname(os.path.abspath(model_dir)))
    return str(read_model_info(model_dir).get("bundle") or folder_above)


def check_input_contrasts(items: Sequence[Mapping], model_dir, strict: bool = False) -> Sequence[Mapping]:
    """`items`, after comparing each one's contrast (`contrast_of_item`) with the contrast(s) the
    weights in `model_dir` were trained on: one warning per call naming the first mismatching
    input, or with `strict` a ValueError. Unknown contrasts on either side are not checked."""
    expected = [check_contrast(c) for c in weights_contrasts(model_dir)]
    if not expected:
        return items
    found = [(item, contrast_of_item(item)) for item in items]
    mismatched = [(item, c) for item, c in found if c is not None and c not in expected]
    if mismatched:
        message = mismatch_message(model_dir, expected, mismatched)
        if strict:
            raise ValueError(message + " (strict_contrast: true)")
        logger.warning(message + " Config strict_contrast: true (medanomaly detect|evaluate --strict) makes this "
                       "an error.")
    return items
