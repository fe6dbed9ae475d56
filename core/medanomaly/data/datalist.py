"""Datalists in the MONAI / Medical Segmentation Decathlon JSON style.

A datalist is one JSON file with metadata (``name``, ``description``, ``modality``,
``labels``, ``numTraining``, ...) and one list of entries per split, e.g.::

    {"name": "...", "modality": {"0": "T1"}, "labels": {"0": "background", "1": "lesion"},
     "numTraining": 2,
     "training": [{"image": "training/sub-0001_T1w.nii.gz", "mask": "...", "subject": "sub-0001"}],
     "test_lesion": [{"image": "...", "mask": "...", "label": "...", "family": "tumour"}]}

Paths are stored relative to the datalist's folder, so a cohort can be moved as a whole;
`load_datalist` returns them absolute. The same file loads with
``monai.data.load_decathlon_datalist(path, data_list_key=key, base_dir=folder)``.
Real cohorts (IXI, OpenBHB, CamCAN, BraTS, ATLAS) plug in by writing such a file.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Mapping, Sequence

# Entry keys whose values are file paths (a string or a list of strings).
PATH_KEYS = ("image", "label", "mask")


def _read_json(path: Path) -> dict:
    if not path.is_file():
        raise FileNotFoundError(
            f"Datalist file {path} does not exist. Pass the path of a Decathlon-style datalist.json, "
            "or create the synthetic cohort first (medanomaly.data.ensure_cohort() or `medanomaly demo`)."
        )
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except json.JSONDecodeError as exc:
        raise ValueError(f"Datalist file {path} is not valid JSON ({exc}); regenerate or fix it.") from exc
    if not isinstance(data, dict):
        raise ValueError(f"Datalist file {path} must hold a JSON object with one list per split.")
    return data


def datalist_keys(path: str | os.PathLike) -> list[str]:
    """The split keys of a datalist: the top-level keys whose values are lists."""
    data = _read_json(Path(path))
    return [k for k, v in data.items() if isinstance(v, list)]


def read_datalist(path: str | os.PathLike) -> dict:
    """The whole datalist JSON as a dict, paths as stored (relative)."""
    return _read_json(Path(path))


def _absolute(base: Path, value: Any) -> Any:
    if isinstance(value, str):
        p = Path(value)
        return str(p if p.is_absolute() else (base / p).resolve())
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return [_absolute(base, v) for v in value]
    return value


def load_datalist(path: str | os.PathLike, key: str) -> list[dict]:
    """Entries of split `key` of the datalist at `path`, with absolute file paths.

    Entries that are plain strings (the Decathlon ``"test": ["img.nii.gz", ...]`` form) become
    ``{"image": path}``. Raises FileNotFoundError for a missing file and KeyError, listing the
    available keys, for a missing split.
    """
    path = Path(path)
    data = _read_json(path)
    if key not in data or not isinstance(data[key], list):
        available = [k for k, v in data.items() if isinstance(v, list)]
        raise KeyError(
            f"Datalist {path} has no split '{key}'. Available splits: {', '.join(available) or '(none)'}."
        )
    base = path.resolve().parent
    entries = []
    for i, item in enumerate(data[key]):
        if isinstance(item, str):
            item = {"image": item}
        if not isinstance(item, dict) or "image" not in item:
            raise ValueError(f"Entry {i} of split '{key}' in {path} must be an object with an 'image' path.")
        for k in PATH_KEYS:
            value = item.get(k)
            if value is not None and not (isinstance(value, str) and value) and not (
                    isinstance(value, list) and value and all(isinstance(v, str) and v for v in value)):
                raise ValueError(f"Entry {i} of split '{key}' in {path}: '{k}' must be a file path, got {value!r}.")
        entry = dict(item)
        for k in PATH_KEYS:
            if k in entry:
                entry[k] = _absolute(base, entry[k])
        entries.append(entry)
    return entries


def write_datalist(
    path: str | os.PathLike,
    splits: Mapping[str, Sequence[Mapping[str, Any]]],
    *,
    name: str = "dataset",
    description: str = "",
    modality: Mapping[str, str] | None = None,
    labels: Mapping[str, str] | None = None,
    training_key: str = "training",
    metadata: Mapping[str, Any] | None = None,
) -> Path:
    """Writes a Decathlon-style datalist atomically (temporary file, then rename).

    `splits` maps split names to lists of entries (dicts, or plain image paths); absolute
    paths under the datalist's folder are stored relative to it. `metadata` adds top-level keys (e.g. provenance).
    Returns the path written.
    """
    path = Path(path)
    base = path.resolve().parent

    def _relative(value: Any) -> Any:
        if isinstance(value, str):
            p = Path(value)
            if p.is_absolute():
                try:
                    return p.resolve().relative_to(base).as_posix()
                except ValueError:
                    return str(p)
            return p.as_posix()
        if isinstance(value, list) and all(isinstance(v, str) for v in value):
            return [_relative(v) for v in value]
        return value

    doc: dict[str, Any] = {
        "name": name,
        "description": description,
        "tensorImageSize": "3D",
        "modality": dict(modality or {"0": "T1"}),
        "labels": dict(labels or {"0": "background", "1": "lesion"}),
        "numTraining": len(splits.get(training_key, [])),
    }
    if metadata:
        doc.update(metadata)
    for split, items in splits.items():
        doc[split] = [
            _relative(item)
            if isinstance(item, str)
            else {k: (_relative(v) if k in PATH_KEYS else v) for k, v in item.items()}
            for item in items
        ]
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(doc, f, indent=2)
            f.write("\n")
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


TEST_KEYS = ("test_lesion", "test_healthy")


def first_test_volumes(datalist: str | os.PathLike, n_volumes: int, folder: str | os.PathLike) -> tuple[Path, int]:
    """The first `n_volumes` test volumes of `datalist`, about a quarter of them healthy (at least
    one of each kind when possible), written as `folder/datalist.json` (for quick benchmark runs).
    Returns (its path, the number of volumes)."""
    lesion, healthy = (load_datalist(datalist, key) for key in TEST_KEYS)
    n_healthy = min(len(healthy), max(1, n_volumes // 4)) if n_volumes > 1 else 0
    n_lesion = min(len(lesion), n_volumes - n_healthy)
    path = write_datalist(Path(folder) / "datalist.json",
                          {"test_lesion": lesion[:n_lesion], "test_healthy": healthy[:n_healthy]},
                          name=f"{Path(datalist).parent.name} test subset",
                          description=f"first test volumes of {datalist}")
    return path, n_lesion + n_healthy

