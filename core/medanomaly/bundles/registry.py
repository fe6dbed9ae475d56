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

from medanomaly.bundles.model_info import (
    ModelInfoError,
    has_weights,
    read_model_info,
    shipped_contrasts,
    trained_with_demo_config,
)

BUNDLE_PATH_ENV = "MEDANOMALY_BUNDLE_PATH"  # os.pathsep-separated folders of bundles, searched first
_PACKAGE = Path(__file__).resolve().parents[1]
PACKAGED_BUNDLES = _PACKAGE / "monai_bundles"  # bundles shipped inside the installed package, if any
REPOSITORY_ROOT = _PACKAGE.parents[1]  # the checkout around core/medanomaly when run from one


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
    def trains_distributed(self) -> bool:
        """True when the bundle trains in several processes (PyTorch distributed under torchrun):
        it has the overlay configs/multi_gpu_train.yaml."""
        return self.has_config("multi_gpu_train")

    @property
    def evaluates_distributed(self) -> bool:
        """True when the bundle's inference, evaluation and calibration shard the volumes over
        several processes: it has the overlay configs/multi_gpu_evaluate.yaml."""
        return self.has_config("multi_gpu_evaluate")

    def has_config(self, name: str) -> bool:
        return (self.configs_dir / f"{name}.yaml").is_file()

    @property
    def model_dir(self) -> Path:
        return self.root / "models"

    @property
    def has_weights(self) -> bool:
        return has_weights(self.model_dir)

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
            "trains_distributed": self.trains_distributed,
            "evaluates_distributed": self.evaluates_distributed,
        }


def repository_bundles() -> Path | None:
    """`monai_bundles/` of the repository checkout this package runs from (an editable install or
    PYTHONPATH=core), or None for an installed package, which sits in no `core/` folder."""
    is_checkout = _PACKAGE.parent.name == "core" and (REPOSITORY_ROOT / "pyproject.toml").is_file()
    return REPOSITORY_ROOT / "monai_bundles" if is_checkout else None


def bundle_search_places() -> list[tuple[Path, str]]:
    """Where bundles are searched, in order, each with where the place comes from: the folders of
    $MEDANOMALY_BUNDLE_PATH, then the bundles shipped as package data, then the repository checkout.
    A bundle name found in an earlier place hides the same name in later ones."""
    places = [(Path(p), f"${BUNDLE_PATH_ENV}") for p in os.environ.get(BUNDLE_PATH_ENV, "").split(os.pathsep) if p]
    if PACKAGED_BUNDLES.is_dir():
        places.append((PACKAGED_BUNDLES, "shipped with the package"))
    repository = repository_bundles()
    if repository is not None and repository.is_dir():
        places.append((repository, "the repository checkout"))
    return places


def bundle_search_path() -> list[Path]:
    """The folders searched for bundles, in order (`bundle_search_places`)."""
    return [folder for folder, _ in bundle_search_places()]


def _describe_search_places() -> str:
    described = [f"{folder} ({source}{'' if folder.is_dir() else ', not a folder'})"
                 for folder, source in bundle_search_places()]
    return "; ".join(described) or f"nothing (set ${BUNDLE_PATH_ENV} to a folder of bundles)"


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
    raise BundleNotFound(f"No bundle named '{name_or_path}' (available: {names}). Searched, in order: "
                         f"{_describe_search_places()}. More bundle folders go into ${BUNDLE_PATH_ENV} "
                         f"(separated by '{os.pathsep}').")


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
