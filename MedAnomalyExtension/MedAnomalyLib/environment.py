"""Where the module finds MedAnomaly's code and bundles, and what Slicer's Python still needs.

Slicer-free and standard library only (``packaging``, which Slicer and pip ship, is imported
when requirements are compared), so the module can call it while Slicer starts without
slowing it down or importing torch.

Where ``medanomaly`` comes from, in order:

1. already importable (installed into Slicer's Python earlier);
2. the MedAnomaly source folder: the checkout the module sits in (``<root>/MedAnomalyExtension``
   next to ``<root>/pyproject.toml`` and ``<root>/core/medanomaly``), or the folder set in the
   module's Advanced settings. Its torch-free ``core`` is put on ``sys.path`` so the method list
   shows before anything is installed, and the dependency installer runs
   ``pip install --no-deps -e <root>`` after installing the requirements below;
3. otherwise the installer installs the ``medanomaly`` distribution from the package index.

What Slicer's Python needs (``install_plan``): PyTorch (through the PyTorch extension's
``PyTorchUtils`` when present: it picks the CUDA build that fits the driver), then the
package's other requirements. In a checkout they come from its ``pyproject.toml``; an
installed extension uses ``Resources/requirements.txt``, generated from the same list
(``python -m MedAnomalyLib.environment --write-requirements``). Exact pins are relaxed to
lower bounds, and packages that Slicer ships itself are never replaced (a different numpy or
SimpleITK inside the running application can break Slicer).
"""

from __future__ import annotations

import importlib
import importlib.metadata
import importlib.util
import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

MODULE_DIR = Path(__file__).resolve().parents[1]
REQUIREMENTS_FILE = MODULE_DIR / "Resources" / "requirements.txt"
DISTRIBUTION = "medanomaly"

# MONAI 1.6 (the bundles' monai_version) needs torch >= 2.8; torchvision 0.23 pairs with torch 2.8.
TORCH_REQUIREMENT = ">=2.8"
TORCHVISION_REQUIREMENT = ">=0.23"
TORCH_DISTRIBUTIONS = ("torch", "torchvision")
# Distributions that Slicer's own Python ships: any installed version is accepted.
SLICER_PROVIDED = ("numpy", "scipy", "SimpleITK", "pydicom", "requests", "packaging", "pillow")

SOURCE_FOLDER_ENV = "MEDANOMALY_SOURCE"
BUNDLE_PATH_ENV = "MEDANOMALY_BUNDLE_PATH"  # read by medanomaly.bundles.registry


def canonical(name: str) -> str:
    """Distribution names compare case- and separator-insensitively (PEP 503)."""
    return re.sub(r"[-_.]+", "-", name).lower()


# ---------------------------------------------------------------------------------------------
# the MedAnomaly source folder


def is_source_folder(path: str | os.PathLike | None) -> bool:
    """True for a MedAnomaly checkout: ``pyproject.toml`` and ``core/medanomaly`` side by side."""
    if not path:
        return False
    path = Path(path)
    return (path / "pyproject.toml").is_file() and (path / "core" / "medanomaly" / "__init__.py").is_file()


def find_source_folder(start: str | os.PathLike = MODULE_DIR,
                       configured: str | os.PathLike | None = None) -> Path | None:
    """The configured folder if it is a checkout, else ``$MEDANOMALY_SOURCE``, else the
    checkout this module sits in (searched upwards from `start`), else None."""
    for candidate in (configured, os.environ.get(SOURCE_FOLDER_ENV)):
        if is_source_folder(candidate):
            return Path(candidate).resolve()
    for folder in [Path(start).resolve(), *Path(start).resolve().parents]:
        if is_source_folder(folder):
            return folder
    return None


def medanomaly_importable() -> bool:
    return importlib.util.find_spec("medanomaly") is not None


def make_importable(source: str | os.PathLike | None) -> bool:
    """Makes ``import medanomaly`` work in this process (for the torch-free ``medanomaly.bundles``):
    adds ``<source>/core`` to ``sys.path`` when the package is not importable yet."""
    if medanomaly_importable():
        return True
    if is_source_folder(source):
        core = str(Path(source).resolve() / "core")
        if core not in sys.path:
            sys.path.insert(0, core)
        importlib.invalidate_caches()
    return medanomaly_importable()


def bundle_path_environment(extra_folders: list[str | os.PathLike] | None) -> dict[str, str]:
    """``{"MEDANOMALY_BUNDLE_PATH": ...}`` for extra bundle folders (searched before the
    repository's own), or {} when there are none."""
    folders = [str(Path(f)) for f in (extra_folders or []) if str(f).strip()]
    return {BUNDLE_PATH_ENV: os.pathsep.join(folders)} if folders else {}


# ---------------------------------------------------------------------------------------------
# requirements


def _requirement(text: str):
    from packaging.requirements import Requirement

    return Requirement(text)


def relax(requirement: str) -> str:
    """A pinned requirement as Slicer's Python should get it: ``==X`` becomes ``>=X``;
    packages Slicer ships keep whatever version Slicer has."""
    req = _requirement(requirement)
    extras = f"[{','.join(sorted(req.extras))}]" if req.extras else ""
    if canonical(req.name) in {canonical(n) for n in SLICER_PROVIDED}:
        return f"{req.name}{extras}"
    specifiers = sorted(f">={s.version}" if s.operator in ("==", "===") else str(s) for s in req.specifier)
    marker = f"; {req.marker}" if req.marker else ""
    return f"{req.name}{extras}{','.join(specifiers)}{marker}"


def requirements_from_pyproject(pyproject: str | os.PathLike) -> list[str]:
    """The package's dependencies as Slicer's Python needs them (no torch: see `install_plan`).
    Without a TOML reader (Python < 3.11, as in Slicer 5.8, and no `tomli`) the module's shipped
    requirements file, which a test keeps equal to this list."""
    try:
        import tomllib
    except ImportError:
        try:
            import tomli as tomllib
        except ImportError:
            return read_requirements(REQUIREMENTS_FILE)

    with open(pyproject, "rb") as f:
        dependencies = tomllib.load(f)["project"]["dependencies"]
    torch = {canonical(n) for n in TORCH_DISTRIBUTIONS}
    return [relax(d) for d in dependencies if canonical(_requirement(d).name) not in torch]


def read_requirements(path: str | os.PathLike = REQUIREMENTS_FILE) -> list[str]:
    lines = Path(path).read_text(encoding="utf-8").splitlines()
    return [line.split("#", 1)[0].strip() for line in lines if line.split("#", 1)[0].strip()]


def requirements_file_text(requirements: list[str]) -> str:
    header = ("# Python packages the MedAnomaly module installs into Slicer's Python (besides PyTorch,\n"
              "# which comes through the PyTorch extension). Generated from pyproject.toml by\n"
              "#   python -m MedAnomalyLib.environment --write-requirements\n"
              "# Used when the module is not inside a MedAnomaly checkout.\n")
    return header + "".join(f"{r}\n" for r in requirements)


def installed_version(distribution: str) -> str | None:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


def unsatisfied(requirement: str) -> str | None:
    """Why `requirement` is not met in this Python (None when it is): missing, too old, or
    one of its requested extras' dependencies missing (e.g. ``monai[fire]`` without fire)."""
    req = _requirement(requirement)
    if req.marker is not None and not req.marker.evaluate():
        return None
    version = installed_version(req.name)
    if version is None:
        return f"{req.name} is not installed"
    if req.specifier and not req.specifier.contains(version, prereleases=True):
        return f"{req.name} {version} is installed, {req.specifier} is needed"
    for extra in sorted(req.extras):
        for dependency in importlib.metadata.requires(req.name) or []:
            sub = _requirement(dependency)
            if sub.marker is None or not sub.marker.evaluate({"extra": extra}):
                continue
            if sub.marker.evaluate({"extra": ""}):
                continue  # not specific to this extra
            if installed_version(sub.name) is None:
                return f"{sub.name} (needed by {req.name}[{extra}]) is not installed"
    return None


@dataclass
class InstallPlan:
    """What `MedAnomalyLogic.setupPythonRequirements` has to install, in order."""

    torch: list[str] = field(default_factory=list)  # e.g. ["torch>=2.8", "torchvision>=0.23"]
    packages: list[str] = field(default_factory=list)  # pip requirement strings
    medanomaly: list[str] = field(default_factory=list)  # pip arguments that install medanomaly itself
    reasons: list[str] = field(default_factory=list)  # one sentence per unmet requirement
    source: Path | None = None

    @property
    def empty(self) -> bool:
        return not (self.torch or self.packages or self.medanomaly)

    def summary(self) -> str:
        lines = []
        if self.torch:
            lines.append("PyTorch: " + " ".join(self.torch))
        if self.packages:
            lines.append("Python packages: " + ", ".join(self.packages))
        if self.medanomaly:
            lines.append("MedAnomaly: pip install " + " ".join(self.medanomaly))
        return "\n".join(lines + ["", "Why:"] + [f"- {r}" for r in self.reasons])


def install_plan(source: str | os.PathLike | None = None,
                 requirements_file: str | os.PathLike = REQUIREMENTS_FILE) -> InstallPlan:
    """What is missing in this Python for running MedAnomaly's bundles.

    `source` is a MedAnomaly checkout (see `find_source_folder`) or None. Its ``pyproject.toml``
    lists the requirements; without a checkout ``requirements_file`` does.
    """
    source = Path(source).resolve() if is_source_folder(source) else None
    plan = InstallPlan(source=source)
    for name, spec in zip(TORCH_DISTRIBUTIONS, (TORCH_REQUIREMENT, TORCHVISION_REQUIREMENT)):
        reason = unsatisfied(name + spec)
        if reason:
            plan.torch.append(name + spec)
            plan.reasons.append(reason)
    if source:
        requirements = requirements_from_pyproject(source / "pyproject.toml")
    else:
        requirements = read_requirements(requirements_file)
    for requirement in requirements:
        reason = unsatisfied(requirement)
        if reason:
            plan.packages.append(requirement)
            plan.reasons.append(reason)
    if installed_version(DISTRIBUTION) is None:
        plan.medanomaly = ["--no-deps", "-e", str(source)] if source else [DISTRIBUTION]
        plan.reasons.append(f"{DISTRIBUTION} is not installed" + (f" (source: {source})" if source else ""))
    return plan


# ---------------------------------------------------------------------------------------------
# the Python that runs the bundles, and the devices it can use


def python_executable() -> str:
    """``PythonSlicer`` (Slicer's Python launcher, on Slicer's PATH) inside Slicer; elsewhere
    the current interpreter."""
    return shutil.which("PythonSlicer") or sys.executable


def gpu_names(timeout: float = 5.0) -> list[str]:
    """Names of the NVIDIA GPUs ``nvidia-smi`` reports (no torch import); [] when there is no
    driver. Whether the installed PyTorch can use them shows when a run starts."""
    executable = shutil.which("nvidia-smi")
    if executable is None:
        return []
    try:
        result = subprocess.run([executable, "--query-gpu=name,memory.total", "--format=csv,noheader"],
                                capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)
    except (OSError, subprocess.SubprocessError):
        return []
    if result.returncode != 0:
        return []
    return [line.strip() for line in result.stdout.splitlines() if line.strip()]


def device_choices(gpus: list[str] | None = None) -> list[tuple[str, str]]:
    """(label, device) pairs for the device selector: GPU first when one is present."""
    gpus = gpu_names() if gpus is None else gpus
    more = f" (+{len(gpus) - 1} more)" if len(gpus) > 1 else ""
    choices = [(f"GPU (CUDA): {gpus[0]}{more}", "cuda")] if gpus else []
    return choices + [("CPU", "cpu")]


def main(argv=None) -> int:
    import argparse

    parser = argparse.ArgumentParser(description="MedAnomaly's requirements for Slicer's Python.")
    parser.add_argument("--write-requirements", action="store_true",
                        help=f"regenerate {REQUIREMENTS_FILE.relative_to(MODULE_DIR)} from the checkout's "
                             "pyproject.toml")
    parser.add_argument("--plan", action="store_true", help="print what this Python would still need")
    args = parser.parse_args(argv)
    source = find_source_folder()
    if args.write_requirements:
        if source is None:
            parser.error("not inside a MedAnomaly checkout")
        REQUIREMENTS_FILE.write_text(requirements_file_text(requirements_from_pyproject(source / "pyproject.toml")))
        print(f"wrote {REQUIREMENTS_FILE}")
    if args.plan or not args.write_requirements:
        plan = install_plan(source)
        print("nothing to install" if plan.empty else plan.summary())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
