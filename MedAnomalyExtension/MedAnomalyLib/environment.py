"""Where the module finds MedAnomaly's code and bundles, and what Slicer's Python still needs.

Slicer-free and standard library only (``packaging``, which Slicer and pip ship, is imported
when requirements are compared), so the module can call it while Slicer starts without
slowing it down or importing torch.

Where the MedAnomaly source (``pyproject.toml``, ``core/medanomaly``, ``monai_bundles/``) comes
from, in order (`find_source_folder`):

1. the folder set in the module's Advanced settings, or ``$MEDANOMALY_SOURCE`` (an explicit
   choice, e.g. a developer's checkout);
2. the copy the extension ships: ``Resources/medanomaly/`` next to the module (installed by
   ``MedAnomalyExtension/CMakeLists.txt``, laid out like a checkout);
3. the checkout the module sits in (``<root>/MedAnomalyExtension`` next to ``<root>/pyproject.toml``).

Its torch-free ``core`` is put on ``sys.path`` so the method list shows before anything is
installed; its ``monai_bundles/`` goes on the bundle search path (``$MEDANOMALY_BUNDLE_PATH``,
after the user's extra bundle folders), for this process and the bundle processes; and the
installer installs the package from that folder, never a name from an index:
``pip install --no-deps <shipped folder>`` (a copy in site-packages), or
``pip install --no-deps -e <checkout>`` for a checkout. Weights a user trains or downloads go
into ``<Slicer settings folder>/MedAnomaly/models/<bundle>/`` (`user_models_folder`), where the
method list finds them beside the shipped ones.

What Slicer's Python needs (``install_plan``): PyTorch (through the PyTorch extension's
``PyTorchUtils`` when present: it picks the CUDA build that fits the driver), then the
package's other requirements, read from the source folder's ``pyproject.toml``
(``Resources/requirements.txt``, generated from the same list with
``python -m MedAnomalyLib.environment --write-requirements``, when there is no TOML reader).
Exact pins are relaxed to lower bounds, and packages that Slicer ships itself are never
replaced (a different numpy or SimpleITK inside the running application can break Slicer).
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
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Mapping

MODULE_DIR = Path(__file__).resolve().parents[1]
REQUIREMENTS_FILE = MODULE_DIR / "Resources" / "requirements.txt"
# The MedAnomaly source an installed extension carries (MedAnomalyExtension/CMake/MedAnomalyPackageFiles.cmake).
SHIPPED_SUBFOLDER = ("Resources", "medanomaly")
USER_MODELS_SUBFOLDER = ("MedAnomaly", "models")  # under Slicer's settings folder
DISTRIBUTION = "medanomaly"

# MONAI 1.6 (the bundles' monai_version) needs torch >= 2.8; torchvision 0.23 pairs with torch 2.8.
TORCH_REQUIREMENT = ">=2.8"
TORCHVISION_REQUIREMENT = ">=0.23"
TORCH_DISTRIBUTIONS = ("torch", "torchvision")
# Distributions that Slicer's own Python ships: any installed version is accepted.
SLICER_PROVIDED = ("numpy", "scipy", "SimpleITK", "pydicom", "requests", "packaging", "pillow")
# Of those, the ones an install must never change (Slicer's VTK / ITK wrapping and its own modules are
# built against them): every pip run gets a constraints file pinning the versions Slicer has.
PINNED_DISTRIBUTIONS = ("numpy", "scipy", "SimpleITK")
PIP_CONSTRAINT_ENV = "PIP_CONSTRAINT"  # read by pip inside other installers (PyTorchUtils' light-the-torch)

# The oldest Slicer the module supports (parameterNodeWrapper, Python 3.12, the APIs it was written
# against) and the oldest Python the medanomaly package runs on (pyproject.toml: requires-python).
MINIMUM_SLICER = (5, 10)
MINIMUM_PYTHON = (3, 10)

SOURCE_FOLDER_ENV = "MEDANOMALY_SOURCE"
BUNDLE_PATH_ENV = "MEDANOMALY_BUNDLE_PATH"  # read by medanomaly.bundles.registry


def canonical(name: str) -> str:
    """Distribution names compare case- and separator-insensitively (PEP 503)."""
    return re.sub(r"[-_.]+", "-", name).lower()


# ---------------------------------------------------------------------------------------------
# the Slicer and Python versions


def version_problem(slicer_version: tuple[int, ...] | None,
                    python_version: tuple[int, ...] | None = None) -> str | None:
    """Why MedAnomaly cannot run here, as a sentence for the user, or None when it can.
    `slicer_version` is (major, minor) of the running Slicer (None: unknown, not checked);
    `python_version` defaults to this interpreter's."""
    python_version = tuple(sys.version_info[:2] if python_version is None else python_version[:2])
    too_old = []
    if slicer_version is not None and tuple(slicer_version[:2]) < MINIMUM_SLICER:
        too_old.append("3D Slicer {}.{} or newer (this is Slicer {}.{})".format(*MINIMUM_SLICER, *slicer_version[:2]))
    if python_version < MINIMUM_PYTHON:
        too_old.append("Python {}.{} or newer (this Slicer has Python {}.{})".format(*MINIMUM_PYTHON, *python_version))
    if not too_old:
        return None
    return (f"MedAnomaly needs {' and '.join(too_old)}. Install a newer 3D Slicer (download.slicer.org) "
            "and MedAnomaly from its Extensions Manager; the module is disabled in this Slicer.")


# ---------------------------------------------------------------------------------------------
# the MedAnomaly source folder


def is_source_folder(path: str | os.PathLike | None) -> bool:
    """True for a MedAnomaly checkout: ``pyproject.toml`` and ``core/medanomaly`` side by side."""
    if not path:
        return False
    path = Path(path)
    return (path / "pyproject.toml").is_file() and (path / "core" / "medanomaly" / "__init__.py").is_file()


def shipped_folder(module_dir: str | os.PathLike = MODULE_DIR) -> Path:
    """Where an installed extension keeps its copy of the MedAnomaly source:
    ``<module folder>/Resources/medanomaly`` (it exists only in a build or install tree)."""
    return Path(module_dir).joinpath(*SHIPPED_SUBFOLDER)


def is_shipped(source: str | os.PathLike | None, module_dir: str | os.PathLike = MODULE_DIR) -> bool:
    """True when `source` is the copy shipped with the module (installed without ``-e``)."""
    return bool(source) and Path(source).resolve() == shipped_folder(module_dir).resolve()


def find_source_folder(start: str | os.PathLike = MODULE_DIR,
                       configured: str | os.PathLike | None = None) -> Path | None:
    """The MedAnomaly source to use, or None: the configured folder if it is a checkout, else
    ``$MEDANOMALY_SOURCE``, else the copy shipped in the module's resources (`shipped_folder`
    of `start`), else the checkout the module sits in (searched upwards from `start`)."""
    for candidate in (configured, os.environ.get(SOURCE_FOLDER_ENV), shipped_folder(start)):
        if is_source_folder(candidate):
            return Path(candidate).resolve()
    for folder in [Path(start).resolve(), *Path(start).resolve().parents]:
        if is_source_folder(folder):
            return folder
    return None


def source_version(source: str | os.PathLike) -> str | None:
    """The ``[project] version`` of a source folder's ``pyproject.toml`` (read without a TOML
    parser, which Python < 3.11 lacks), or None."""
    try:
        text = (Path(source) / "pyproject.toml").read_text(encoding="utf-8")
    except OSError:
        return None
    project = re.search(r"^\[project\]\s*$(.*?)(?=^\[|\Z)", text, re.M | re.S)
    version = project and re.search(r"^version\s*=\s*[\"']([^\"']+)[\"']", project.group(1), re.M)
    return version.group(1) if version else None


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


def source_bundles(source: str | os.PathLike | None) -> Path | None:
    """The ``monai_bundles`` folder of a source folder (shipped copy or checkout), if it has one."""
    folder = Path(source) / "monai_bundles" if source else None
    return folder if folder is not None and folder.is_dir() else None


def bundle_path_environment(extra_folders: list[str | os.PathLike] | None, source: str | os.PathLike | None = None,
                            inherited: str | None = None) -> dict[str, str]:
    """``{"MEDANOMALY_BUNDLE_PATH": ...}``: the user's extra bundle folders first, then what the
    variable held before the module set it (`inherited`), then the source folder's own
    ``monai_bundles`` (the shipped bundles of an installed extension); {} when all are empty."""
    folders = [str(Path(f)) for f in (extra_folders or []) if str(f).strip()]
    folders += [f for f in (inherited or "").split(os.pathsep) if f.strip()]
    bundles = source_bundles(source)
    if bundles is not None:
        folders.append(str(bundles))
    unique = list(dict.fromkeys(folders))
    return {BUNDLE_PATH_ENV: os.pathsep.join(unique)} if unique else {}


# What the bundle path held before the module first set it, and what the module set last.
_bundle_path_state: dict[str, str | None] = {"inherited": None, "applied": None}


def apply_bundle_path(extra_folders: list[str | os.PathLike] | None, source: str | os.PathLike | None,
                      environ=None, state: dict | None = None) -> dict[str, str]:
    """Sets ``$MEDANOMALY_BUNDLE_PATH`` in `environ` (``os.environ``: ``list_bundles`` here and
    the bundle processes read it) to `bundle_path_environment`, keeping a value set before
    (by the user, or before Slicer started) after the module's folders; restores that value
    when the module has nothing to add. Returns the variable as the bundle process gets it."""
    environ = os.environ if environ is None else environ
    state = _bundle_path_state if state is None else state
    current = environ.get(BUNDLE_PATH_ENV)
    if current != state["applied"]:  # not the module's own value: someone else set it
        state["inherited"] = current
    extra = bundle_path_environment(extra_folders, source, state["inherited"])
    if extra:
        environ[BUNDLE_PATH_ENV] = state["applied"] = extra[BUNDLE_PATH_ENV]
    else:
        if state["inherited"] is None:
            environ.pop(BUNDLE_PATH_ENV, None)
        else:
            environ[BUNDLE_PATH_ENV] = state["inherited"]
        state["applied"] = None
    return extra


def user_models_folder(settings_folder: str | os.PathLike) -> Path:
    """Where a user's own weights go: ``<Slicer settings folder>/MedAnomaly/models``, one
    folder per bundle (``<bundle>/model.pt`` + ``model_info.json``, or several named
    subfolders ``<bundle>/<name>/model.pt``). Outside the extension, so they survive updates."""
    return Path(settings_folder).joinpath(*USER_MODELS_SUBFOLDER)


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
    problems: list[str] = field(default_factory=list)  # what the installer cannot fix
    source: Path | None = None

    @property
    def empty(self) -> bool:
        """Nothing to install and nothing wrong: MedAnomaly can run."""
        return not (self.torch or self.packages or self.medanomaly or self.problems)

    def summary(self) -> str:
        lines = []
        if self.torch:
            lines.append("PyTorch: " + " ".join(self.torch))
        if self.packages:
            lines.append("Python packages: " + ", ".join(self.packages))
        if self.medanomaly:
            lines.append("MedAnomaly: pip install " + " ".join(self.medanomaly))
        if self.problems:
            lines += ["", "Cannot be installed:"] + [f"- {p}" for p in self.problems]
        return "\n".join(lines + ["", "Why:"] + [f"- {r}" for r in self.reasons])


def medanomaly_install_arguments(source: Path, module_dir: str | os.PathLike = MODULE_DIR) -> list[str]:
    """pip arguments that install ``medanomaly`` from `source`, never from an index: the
    shipped copy as a regular install (the extension folder may be replaced by an update),
    a checkout as an editable one. ``--no-deps``: the requirements are installed before, relaxed."""
    if is_shipped(source, module_dir):
        return ["--no-deps", str(source)]
    return ["--no-deps", "-e", str(source)]


class DependencyError(RuntimeError):
    """Slicer's Python cannot be made ready: its packages cannot be checked, or the installer
    cannot provide something (see `InstallPlan.problems`)."""


UNKNOWN_PLAN = ("MedAnomaly cannot check the Python packages of this Slicer (the 'packaging' module is "
                "missing), so it cannot tell whether they are installed. Reinstall 3D Slicer.")


def needs_install(plan: InstallPlan | None) -> bool:
    """True when `plan` has something to install, False when everything is there. An unknown
    plan (None: the check itself failed) or one with `problems` raises `DependencyError`: it
    never counts as "all installed"."""
    if plan is None:
        raise DependencyError(UNKNOWN_PLAN)
    if plan.problems:
        raise DependencyError("\n".join(plan.problems))
    return not plan.empty


def dependency_status(plan: InstallPlan | None) -> tuple[bool | None, str]:
    """(ready, sentence) for the module panel: True all installed, False something missing or
    wrong (the sentence says what), None unknown."""
    if plan is None:
        return None, UNKNOWN_PLAN
    if plan.problems:
        return False, " ".join(plan.problems)
    if plan.empty:
        return True, "All installed."
    return False, "Missing (installed on the first Apply, after asking): " + "; ".join(plan.reasons)


def install_plan(source: str | os.PathLike | None = None,
                 requirements_file: str | os.PathLike = REQUIREMENTS_FILE,
                 module_dir: str | os.PathLike = MODULE_DIR) -> InstallPlan:
    """What is missing in this Python for running MedAnomaly's bundles.

    `source` is the MedAnomaly source folder (see `find_source_folder`) or None. Its
    ``pyproject.toml`` lists the requirements; without one ``requirements_file`` does.
    ``medanomaly`` is installed from `source` when it is missing, or when the installed copy of
    the shipped source has another version than the extension ships (an updated extension).
    Without a source folder it cannot be installed: `problems` says so.
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
    installed = installed_version(DISTRIBUTION)
    shipped = source_version(source) if source and is_shipped(source, module_dir) else None
    if installed is None or (shipped is not None and installed != shipped):
        if source is None:
            plan.problems.append(
                f"{DISTRIBUTION} is not installed and its source was not found: reinstall the MedAnomaly "
                "extension, or set the MedAnomaly source folder (Advanced) to a MedAnomaly checkout.")
        else:
            plan.medanomaly = medanomaly_install_arguments(source, module_dir)
            plan.reasons.append(f"{DISTRIBUTION} is not installed (source: {source})" if installed is None else
                                f"{DISTRIBUTION} {installed} is installed, the extension ships {shipped}")
    return plan


# ---------------------------------------------------------------------------------------------
# installing without changing what Slicer has


def installed_versions() -> dict[str, str]:
    """{canonical distribution name: version} of every distribution in this Python."""
    versions = {}
    for distribution in importlib.metadata.distributions():
        name = distribution.metadata["Name"]
        if name:
            versions.setdefault(canonical(name), distribution.version)
    return versions


def slicer_pins(installed: Mapping[str, str | None], names=PINNED_DISTRIBUTIONS) -> dict[str, str]:
    """{name: version} of the `names` present in `installed` (a map as `installed_versions` gives,
    read when the installation starts): what pip must leave exactly as it is."""
    versions = {canonical(k): v for k, v in installed.items() if v}
    return {name: versions[canonical(name)] for name in names if canonical(name) in versions}


def constraints_text(pins: Mapping[str, str]) -> str:
    return ("# Written by the MedAnomaly module: versions Slicer has, which pip must not change.\n"
            + "".join(f"{name}=={version}\n" for name, version in pins.items()))


_FORBIDDEN_PIP_OPTIONS = ("-U", "--upgrade", "--force-reinstall", "-I", "--ignore-installed",
                          "--upgrade-strategy")


def pip_install_arguments(requirements: list[str], constraints_file: str | os.PathLike,
                          pins: Mapping[str, str]) -> list[str]:
    """What follows ``pip install`` (``slicer.util.pip_install`` takes it as a list): the
    constraints file first, then `requirements` (requirement strings, or the arguments that
    install medanomaly from its source). A requirement naming a pinned package is left out when
    the pinned version meets it, and raises `DependencyError` when it does not (pip would have
    to change Slicer's package); options that upgrade or reinstall what is installed are refused."""
    pinned = {canonical(name): (name, version) for name, version in pins.items()}
    arguments = []
    for item in requirements:
        if item.split("=", 1)[0] in _FORBIDDEN_PIP_OPTIONS:
            raise ValueError(f"pip option {item} could change the packages Slicer has")
        if not item.startswith("-") and not _is_path(item):
            try:
                requirement = _requirement(item)
            except ValueError:
                requirement = None
            if requirement is not None and canonical(requirement.name) in pinned:
                name, version = pinned[canonical(requirement.name)]
                if requirement.specifier and not requirement.specifier.contains(version, prereleases=True):
                    raise DependencyError(
                        f"{item} is needed, but this Slicer has {name} {version}, which an installation must not "
                        f"change (Slicer is built with it). Use a 3D Slicer that ships a suitable {name}.")
                continue
        arguments.append(item)
    return ["--constraint", str(constraints_file), *arguments]


def _is_path(item: str) -> bool:
    return os.sep in item or (os.altsep is not None and os.altsep in item) or item.startswith(".")


@contextmanager
def constraints_file(pins: Mapping[str, str]) -> Iterator[Path]:
    """A temporary constraints file pinning `pins`, removed afterwards."""
    folder = Path(tempfile.mkdtemp(prefix="MedAnomaly-pip-"))
    try:
        path = folder / "slicer-constraints.txt"
        path.write_text(constraints_text(pins), encoding="utf-8")
        yield path
    finally:
        shutil.rmtree(folder, ignore_errors=True)


@contextmanager
def pip_constraint_environment(path: str | os.PathLike, environ=None) -> Iterator[None]:
    """``$PIP_CONSTRAINT`` set to `path` inside the block, for installers that run pip themselves
    (PyTorchUtils). As a ``file:`` URL: pip splits the variable at white space, a URL has none."""
    environ = os.environ if environ is None else environ
    previous = environ.get(PIP_CONSTRAINT_ENV)
    environ[PIP_CONSTRAINT_ENV] = " ".join(filter(None, [Path(path).resolve().as_uri(), previous]))
    try:
        yield
    finally:
        if previous is None:
            environ.pop(PIP_CONSTRAINT_ENV, None)
        else:
            environ[PIP_CONSTRAINT_ENV] = previous


PACKAGE_BUILD_FILES = ("pyproject.toml", "README.md", "LICENSE")  # what building the package reads besides core/


@contextmanager
def staged_source(source: str | os.PathLike) -> Iterator[Path]:
    """A temporary copy of what building the ``medanomaly`` package needs (``pyproject.toml``,
    ``README.md``, ``LICENSE``, ``core/``; not the bundles), removed afterwards. pip builds a
    local folder in place (``build/``, ``*.egg-info``): installing from this copy leaves the
    extension's folder untouched, and works where that folder is read-only."""
    source = Path(source)
    folder = Path(tempfile.mkdtemp(prefix="MedAnomaly-source-"))
    try:
        staged = folder / "medanomaly"
        staged.mkdir()
        for name in PACKAGE_BUILD_FILES:
            if (source / name).is_file():
                shutil.copyfile(source / name, staged / name)
        shutil.copytree(source / "core", staged / "core",
                        ignore=shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info", "build"))
        yield staged
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def loaded_distributions(modules=None) -> set[str]:
    """Canonical names of the distributions whose top-level modules this process has imported."""
    modules = sys.modules if modules is None else modules
    try:
        owners = importlib.metadata.packages_distributions()  # Python >= 3.10
    except AttributeError:
        return set()
    tops = {name.split(".")[0] for name in modules}
    return {canonical(dist) for top in tops for dist in owners.get(top, [])}


def changed_versions(before: Mapping[str, str], after: Mapping[str, str],
                     only: set[str] | None = None) -> list[str]:
    """``"numpy 2.1.0 -> 2.4.6"`` for each distribution of `before` (restricted to `only`) whose
    version changed or that was removed; new distributions are not changes."""
    changed = []
    for name in sorted(before):
        if only is not None and canonical(name) not in only:
            continue
        if after.get(name) != before[name]:
            changed.append(f"{name} {before[name]} -> {after.get(name) or 'removed'}")
    return changed


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
