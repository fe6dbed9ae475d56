"""Find and describe the MONAI bundles of MedAnomaly (no torch import: Slicer reads this at start-up)."""

from __future__ import annotations

import importlib
import json
import os
import sys
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

BUNDLE_PATH_ENV = "MEDANOMALY_BUNDLE_PATH"
REPOSITORY_BUNDLES = Path(__file__).resolve().parents[3] / "monai_bundles"
MODEL_FILE, MODEL_INFO_FILE = "model.pt", "model_info.json"


class BundleNotFound(LookupError):
    pass


@dataclass(frozen=True)
class BundleInfo:
    """A bundle folder with its metadata and what its `models/` folder holds."""

    name: str
    root: Path

    @property
    def configs_dir(self) -> Path:
        return self.root / "configs"

    @property
    def metadata(self) -> dict:
        path = self.configs_dir / "metadata.json"
        try:
            return json.loads(path.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
            raise ModelInfoError(f"{path} is damaged ({err}); restore it from the bundle's release.") from None

    @property
    def description(self) -> str:
        return self.metadata.get("description", "")

    @property
    def version(self) -> str:
        return self.metadata.get("version", "")

    @property
    def post_train_workflows(self) -> list[str]:
        """The bundle's own workflows that `medanomaly train` runs after training and before
        calibration (metadata.json "post_train_workflows"; e.g. scrps builds its latent
        repository). Each is a config overlay `configs/<name>.yaml` on inference.yaml."""
        return [str(name) for name in self.metadata.get("post_train_workflows", [])]

    @property
    def model_dir(self) -> Path:
        return self.root / "models"

    @property
    def has_weights(self) -> bool:
        return (self.model_dir / MODEL_FILE).is_file()

    @property
    def model_info(self) -> dict:
        """What the shipped weights were trained with (configs, cohort, threshold), if recorded."""
        return read_model_info(self.model_dir)

    @property
    def weights_contrast(self) -> str | None:
        """The contrast(s) the shipped weights serve, e.g. ``T2w`` or ``T2w/FLAIR`` (the default
        weights' and those of models/<contrast>/); None when unknown."""
        return "/".join(shipped_contrasts(self.model_dir)) or None

    @property
    def weights_need_demo_config(self) -> bool:
        """True when the shipped weights come from the demo overlay (its smaller network)."""
        return trained_with_demo_config(self.model_dir)

    def config_file(self, name: str) -> Path:
        path = self.configs_dir / f"{name}.yaml"
        if not path.is_file():
            available = sorted(p.stem for p in self.configs_dir.glob("*.yaml"))
            raise FileNotFoundError(f"Bundle '{self.name}' has no config '{name}' (has: {', '.join(available)}).")
        return path

    def summary(self) -> dict:
        return {
            "name": self.name,
            "version": self.version,
            "description": self.description,
            "root": str(self.root),
            "has_weights": self.has_weights,
            "demo_weights": self.weights_need_demo_config,
            "contrast": self.weights_contrast,
        }


class ModelInfoError(ValueError):
    """A bundle's model_info.json or metadata.json that cannot be read; the message names the file."""


def read_model_info(model_dir: str | os.PathLike) -> dict:
    """`model_dir/model_info.json` (what those weights were trained with), or {} when absent.
    Raises `ModelInfoError` naming the file when it is not a JSON object."""
    path = Path(model_dir) / MODEL_INFO_FILE
    if not path.is_file():
        return {}
    try:
        info = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ModelInfoError(f"{path} is damaged ({err}); restore it, or train and calibrate again.") from None
    if not isinstance(info, dict):
        raise ModelInfoError(f"{path} holds a JSON {type(info).__name__}, not an object; restore it.")
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
        if (candidate / MODEL_FILE).is_file():
            return candidate
    return Path(models_root)


def shipped_contrasts(models_root: str | os.PathLike) -> tuple[str, ...]:
    """The contrasts `models_root` has weights for: the default weights' (model_info.json), then
    each subfolder `<contrast>/` whose weights record that contrast (not a variant's subfolder)."""
    root, found = Path(models_root), list(weights_contrasts(models_root))
    for sub in sorted(root.iterdir()) if root.is_dir() else ():
        if (sub / MODEL_FILE).is_file() and weights_contrasts(sub) == (sub.name,) and sub.name not in found:
            found.append(sub.name)
    return tuple(found)


def trained_with_demo_config(model_dir: str | os.PathLike) -> bool:
    """True when the weights in `model_dir` come from the demo overlay (its smaller network)."""
    return read_model_info(model_dir).get("variant") == "demo"


def bundle_search_path() -> list[Path]:
    """Folders searched for bundles: $MEDANOMALY_BUNDLE_PATH entries first, then the repository's."""
    extra = [Path(p) for p in os.environ.get(BUNDLE_PATH_ENV, "").split(os.pathsep) if p]
    return [*extra, REPOSITORY_BUNDLES]


def _is_bundle(path: Path) -> bool:
    return (path / "configs" / "metadata.json").is_file()


def bundle_problem(bundle: BundleInfo) -> str | None:
    """Why a bundle cannot be listed (a damaged metadata.json or model_info.json), or None."""
    try:
        bundle.metadata, bundle.model_info  # noqa: B018 - reading them is the check
    except (OSError, ValueError) as err:  # ModelInfoError is a ValueError
        return str(err)
    return None


def _bundles_on_search_path() -> list[BundleInfo]:
    found: dict[str, BundleInfo] = {}
    for folder in bundle_search_path():
        if folder.is_dir():
            for child in sorted(folder.iterdir()):
                if _is_bundle(child) and child.name not in found:
                    found[child.name] = BundleInfo(child.name, child.resolve())
    return list(found.values())


def list_bundles() -> list[BundleInfo]:
    """The usable bundles on the search path; one with a damaged metadata.json or model_info.json
    is skipped with a warning that names the file (a listing never fails on one bad bundle)."""
    usable = []
    for bundle in _bundles_on_search_path():
        problem = bundle_problem(bundle)
        if problem:
            warnings.warn(f"Skipping bundle '{bundle.name}': {problem}", stacklevel=2)
        else:
            usable.append(bundle)
    return usable


def find_bundle(name_or_path: str | os.PathLike | BundleInfo) -> BundleInfo:
    """A bundle by name (searched on the bundle path) or by its folder."""
    if isinstance(name_or_path, BundleInfo):
        return name_or_path
    path = Path(name_or_path)
    if _is_bundle(path):
        return BundleInfo(path.resolve().name, path.resolve())
    for bundle in _bundles_on_search_path():
        if bundle.name == str(name_or_path):
            problem = bundle_problem(bundle)
            if problem:
                raise BundleNotFound(f"Bundle '{bundle.name}' cannot be used: {problem}")
            return bundle
    names = ", ".join(b.name for b in list_bundles()) or "none"
    raise BundleNotFound(f"No bundle named '{name_or_path}' (available: {names}; search path: "
                         f"{os.pathsep.join(map(str, bundle_search_path()))}).")


def _is_scripts_module(name: str) -> bool:
    return name == "scripts" or name.startswith("scripts.")


@contextmanager
def bundle_scripts(bundle: str | os.PathLike | BundleInfo, *submodules: str):
    """`import scripts` means this bundle's code package inside the block, as under
    `python -m monai.bundle run`. Every bundle names its package `scripts`, so several bundles
    in one process (tests, notebooks) need this swap; another bundle's modules come back after.
    Yields the package, with `submodules` (e.g. "losses") imported too."""
    root = str(find_bundle(bundle).root)
    saved = {name: sys.modules.pop(name) for name in list(sys.modules) if _is_scripts_module(name)}
    sys.path.insert(0, root)
    try:
        package = importlib.import_module("scripts")
        for name in submodules:
            importlib.import_module(f"scripts.{name}")
        yield package
    finally:
        sys.path.remove(root)
        for name in [n for n in sys.modules if _is_scripts_module(n)]:
            del sys.modules[name]
        sys.modules.update(saved)


def import_bundle_scripts(bundle: str | os.PathLike | BundleInfo, *submodules: str) -> dict:
    """A bundle's `scripts` package and submodules, keyed by module name, usable after the swap."""
    with bundle_scripts(bundle, *submodules):
        return {name: module for name, module in sys.modules.items() if _is_scripts_module(name)}
