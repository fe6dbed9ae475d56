"""MR contrasts: their names, and which contrast a scan, a datalist or a set of weights is.

Names follow BIDS suffixes (``T1w``, ``T2w``, ``FLAIR``). A datalist says its contrast with a
top-level ``"contrast"`` key (an entry may override it with its own ``"contrast"``); a file says
it with its BIDS suffix (``sub-01_T2w.nii.gz``); a bundle's weights with ``"contrast"`` in
``model_info.json``. Anything else is unknown (None), never guessed from the intensities.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Mapping

CONTRASTS = ("T1w", "T2w", "FLAIR")
DEFAULT_CONTRAST = "T1w"
#: Decathlon-style ``modality`` label of each contrast.
MODALITY_LABELS = {"T1w": "T1", "T2w": "T2", "FLAIR": "FLAIR"}

_BY_LOWER = {c.lower(): c for c in CONTRASTS}
_ALIASES = {"t1": "T1w", "t2": "T2w", "t2-flair": "FLAIR", "t2flair": "FLAIR"}
_SUFFIX = re.compile(r"_(T1w|T2w|FLAIR)(?:\.nii\.gz|\.nii|\.nrrd|\.nhdr|\.mha|\.mhd|\.json)?$", re.IGNORECASE)


def check_contrast(name: str) -> str:
    """The canonical name of a contrast (case-insensitive; ``t2`` -> ``T2w``); ValueError otherwise."""
    key = str(name).strip().lower()
    found = _BY_LOWER.get(key) or _ALIASES.get(key)
    if found is None:
        raise ValueError(f"Unknown contrast {name!r}; choose one of {', '.join(CONTRASTS)}.")
    return found


def check_contrasts(names) -> tuple[str, ...]:
    """Canonical contrasts in the order of `CONTRASTS`, without repeats (``"all"`` = every one)."""
    if isinstance(names, str):
        names = [n for n in re.split(r"[,\s]+", names) if n]
    names = list(names)
    if any(str(n).lower() == "all" for n in names):
        return CONTRASTS
    chosen = {check_contrast(n) for n in names}
    if not chosen:
        raise ValueError(f"Choose at least one contrast of {', '.join(CONTRASTS)}.")
    return tuple(c for c in CONTRASTS if c in chosen)


def contrast_of_file(path) -> str | None:
    """The contrast named by a file's BIDS suffix, or None."""
    match = _SUFFIX.search(Path(str(path)).name)
    return check_contrast(match.group(1)) if match else None


def contrast_of_item(item: Mapping, datalist_contrast: str | None = None) -> str | None:
    """The contrast of one input: its own ``contrast`` key, else its datalist's, else its file name's."""
    if item.get("contrast"):
        return check_contrast(item["contrast"])
    if datalist_contrast:
        return check_contrast(datalist_contrast)
    image = item.get("image")
    return contrast_of_file(image) if isinstance(image, (str, Path)) else None
