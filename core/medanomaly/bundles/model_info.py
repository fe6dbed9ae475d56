"""The two files of trained weights: `model.pt` and `model_info.json` (what the weights were
trained with: variant, contrast, cohort, calibrated threshold).

Torch-free: the CLI and the Slicer module read model_info.json at start-up. Only writing it
(`update_model_info`, in bundle processes) loads `medanomaly.io`.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

MODEL_FILE, MODEL_INFO_FILE = "model.pt", "model_info.json"

logger = logging.getLogger(__name__)


class ModelInfoError(ValueError):
    """A bundle's model_info.json or metadata.json that cannot be read; the message names the file."""


def weights_file(model_dir: str | os.PathLike) -> Path:
    return Path(model_dir) / MODEL_FILE


def has_weights(model_dir: str | os.PathLike) -> bool:
    return weights_file(model_dir).is_file()


def model_info_file(model_dir: str | os.PathLike) -> Path:
    return Path(model_dir) / MODEL_INFO_FILE


def read_model_info(model_dir: str | os.PathLike) -> dict:
    """`model_dir/model_info.json` (what those weights were trained with), or {} when absent.
    Raises `ModelInfoError` naming the file when it is not a JSON object."""
    path = model_info_file(model_dir)
    if not path.is_file():
        return {}
    try:
        info = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ModelInfoError(f"{path} is damaged ({err}); restore it, or train and calibrate again.") from None
    if not isinstance(info, dict):
        raise ModelInfoError(f"{path} holds a JSON {type(info).__name__}, not an object; restore it.")
    return info


def update_model_info(model_dir: str | os.PathLike, **fields) -> dict:
    """Merges fields into `model_dir/model_info.json`, written atomically (a crash keeps the old file)."""
    from medanomaly import io  # loads torch: imported only where a bundle process writes

    info = read_model_info(model_dir)
    info.update(fields)
    io.write_json(model_info_file(model_dir), info, indent=2, sort_keys=True)
    return info


def weights_contrasts(model_dir: str | os.PathLike) -> tuple[str, ...]:
    """The MR contrast(s) the weights in `model_dir` were trained on (model_info.json "contrast",
    one name or a list, as recorded), or () when unknown."""
    recorded = read_model_info(model_dir).get("contrast")
    if not recorded:
        return ()
    return (str(recorded),) if isinstance(recorded, str) else tuple(str(c) for c in recorded)


def shipped_model_dir(models_root: str | os.PathLike, contrast: str | None = None) -> Path:
    """The shipped weights for scans of `contrast`: `models_root/<contrast>/` when the bundle ships
    weights trained on that contrast there, else `models_root` (its default weights)."""
    if contrast:
        candidate = Path(models_root) / str(contrast)
        if has_weights(candidate):
            return candidate
    return Path(models_root)


def shipped_contrasts(models_root: str | os.PathLike) -> tuple[str, ...]:
    """The contrasts `models_root` has weights for: the default weights' (model_info.json), then
    each subfolder `<contrast>/` whose weights record that contrast (not a variant's subfolder)."""
    root, found = Path(models_root), list(weights_contrasts(models_root))
    for sub in sorted(root.iterdir()) if root.is_dir() else ():
        if has_weights(sub) and weights_contrasts(sub) == (sub.name,) and sub.name not in found:
            found.append(sub.name)
    return tuple(found)


def trained_with_demo_config(model_dir: str | os.PathLike) -> bool:
    """True when the weights in `model_dir` come from the demo overlay (its smaller network)."""
    return read_model_info(model_dir).get("variant") == "demo"


def load_threshold(model_dir: str | os.PathLike, default: float | None = None) -> float | None:
    """The calibrated threshold stored with the weights, or `default` (with a warning)."""
    info = read_model_info(model_dir)
    if info.get("threshold") is None:  # absent, or null: calibration found no finite threshold
        logger.warning("No calibrated threshold in %s: segmentation uses %s. Run the calibrate workflow.",
                       model_info_file(model_dir), default)
        return default
    return float(info["threshold"])
