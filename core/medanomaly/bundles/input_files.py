"""Which files a detection runs on: volume files, DICOM series folders, folders and globs of
volumes expanded to paths, each with a unique output name.

Torch-free: the CLI checks the inputs with `expand_inputs` before it starts a bundle, and the
bundle (`inputs.resolve_inputs`) expands them with the same function.
"""

from __future__ import annotations

import glob
import os
from pathlib import Path
from typing import Sequence

from medanomaly.bundles.outputs import VOLUME_SUFFIXES, is_output_file, volume_name


def expand_inputs(input: str | os.PathLike | Sequence[str | os.PathLike]) -> list[Path]:
    """Files and DICOM folders as given, the volume files of a folder, the volume files a glob
    matches. Raises `FileNotFoundError` naming an entry that matches nothing."""
    entries = [Path(input)] if isinstance(input, (str, os.PathLike)) else [Path(entry) for entry in input]
    paths: list[Path] = []
    for entry in entries:
        if entry.is_dir():
            paths += [entry] if _is_dicom_folder(entry) else _volume_files(entry)
        elif entry.exists():
            paths.append(entry)
        else:
            matches = [Path(m) for m in sorted(glob.glob(str(entry))) if _is_input_volume(Path(m))]
            if not matches:
                raise FileNotFoundError(f"Input {entry} does not exist.")
            paths += matches
    if not paths:
        raise FileNotFoundError(f"No volume files found in {', '.join(map(str, entries))}.")
    return paths


def unique_output_names(files: Sequence[Path]) -> list[str]:
    """Output names of input files, one per file: the file's name without its suffix; files of the
    same name get as many parent folders as it takes to tell them apart
    (`a/scan.nii.gz`, `b/scan.nii.gz`, `b/t2.nii` -> `a_scan`, `b_scan`, `t2`)."""
    paths = [Path(f).resolve() for f in files]
    if len(set(paths)) != len(paths):
        twice = next(p for p in paths if paths.count(p) > 1)
        raise ValueError(f"The input {twice} is given twice.")
    depths = [0] * len(paths)
    names = [volume_name(p) for p in paths]
    while len(set(names)) != len(names):
        for i, name in enumerate(names):
            if names.count(name) > 1:
                depths[i] += 1
        names = [_name_with_parents(p, d) for p, d in zip(paths, depths)]
    return names


def _name_with_parents(path: Path, depth: int) -> str:
    parents = [part.strip("/\\:") for part in path.parent.parts[len(path.parent.parts) - depth:]] if depth else []
    return "_".join([*filter(None, parents), volume_name(path)])


def _is_input_volume(path: Path) -> bool:
    """A volume file, not hidden (e.g. a temporary file) and not an earlier run's output beside the scans."""
    return path.is_file() and path.name.lower().endswith(VOLUME_SUFFIXES) and not is_output_file(path)


def _volume_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if _is_input_volume(p))


def _is_dicom_folder(folder: Path) -> bool:
    return any(p.suffix.lower() == ".dcm" for p in folder.iterdir()) and not _volume_files(folder)
