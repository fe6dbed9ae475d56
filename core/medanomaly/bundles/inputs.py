"""The items a bundle runs on (`resolve_inputs`): the user's files, checked voxel by voxel before
any model loads, or the entries of a datalist."""

from __future__ import annotations

from typing import Sequence

from medanomaly import io
from medanomaly.bundles.input_files import expand_inputs, unique_output_names
from medanomaly.data import IMAGE, MASK, datalist_items


def resolve_inputs(input: str | Sequence[str] | None = None, datalist: str | None = None,
                   keys: str | Sequence[str] = "test_lesion", mask: str | None = None,
                   contrast: str | None = None, input_contrast: str | None = None) -> list[dict]:
    """Items `{"image", "mask"?, "label"?, "subject"?, "contrast"?}` to run on.

    `input`: a volume file, a DICOM series folder, a folder or glob of volumes, or a list of
    them (`input_contrast`, if given, is their contrast). Without `input`, the `keys` of
    `datalist` (a Decathlon-style JSON file, or the name of a synthetic cohort preset, generated
    on first use, in `contrast`); a datalist's top-level "contrast" is copied into its entries.
    """
    if input:
        return _file_items(input, mask, input_contrast)
    if not datalist:
        raise ValueError("Nothing to run on: give an input volume (--input) or a datalist (--datalist).")
    return datalist_items(datalist, keys, contrast)


def _file_items(input, mask: str | None, input_contrast: str | None) -> list[dict]:
    files = expand_inputs(input)
    items = [{IMAGE: str(p), "subject": name, **({"contrast": input_contrast} if input_contrast else {})}
             for p, name in zip(files, unique_output_names(files))]
    for item in items:  # every file checked, voxels too, before any model is loaded
        io.check_input_volume(item[IMAGE])
        io.read_volume(item[IMAGE])
    if mask:
        if len(items) != 1:
            raise ValueError("A brain mask can only be given with a single input volume.")
        io.check_same_grid(items[0][IMAGE], mask, what="The brain mask")
        items[0][MASK] = str(mask)
    return items
