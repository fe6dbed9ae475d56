"""One detection, Slicer-free: which methods there are, the command line, the background
process with its progress, and what went wrong when it fails.

A thin layer over ``medanomaly.bundles`` (torch-free): `bundle_command` builds the command,
`BundleProcess` runs it, `parse_progress` reads its progress lines. The module's Logic uses
exactly these classes, and so do the pytest tests, with the repository's Python in place of
PythonSlicer.

A detection works in one folder::

    <work>/input.nrrd          the input volume, written by Slicer from its node
    <work>/mask.nrrd           the optional brain mask (same grid)
    <work>/output/             what the bundle writes: input_heatmap.nrrd,
                               input_anomaly.seg.nrrd, input_pseudo_healthy.nrrd, detections.json
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from medanomaly.bundles import BundleInfo, BundleProcess, bundle_command, find_bundle, list_bundles, parse_progress
from medanomaly.bundles.model_info import (
    has_weights,
    read_model_info,
    shipped_contrasts,
    trained_with_demo_config,
    weights_file,
)
from medanomaly.bundles.outputs import SUMMARY_FILE, output_paths, volume_name

from MedAnomalyLib.inputs import InputError, check_input, check_same_grid  # noqa: F401 (re-exported)

try:  # the first exception line of a traceback, as the CLI reports it
    from medanomaly.bundles.runner import root_cause
except ImportError:  # a medanomaly without it: the generic message below
    root_cause = None

INPUT_FILE, MASK_FILE, OUTPUT_DIR, OUTPUT_EXTENSION = "input.nrrd", "mask.nrrd", "output", ".nrrd"
DEVICES = ("cpu", "cuda")
LOG_LINES = 5000  # kept in memory for the error dialog; the module panel shows them as they come


class DetectionError(RuntimeError):
    """A detection that cannot start or did not finish; `log` holds the process output."""

    def __init__(self, message: str, log: str = "", returncode: int | None = None):
        super().__init__(message)
        self.message, self.log, self.returncode = message, log, returncode


class DetectionCancelled(DetectionError):
    pass


# ---------------------------------------------------------------------------------------------
# methods


USER_WEIGHTS = "user"  # the key of a method with a user's weights: "<bundle>:user[/<subfolder>]"


@dataclass(frozen=True)
class Method:
    """A bundle with one set of weights, as the method selector shows it: the bundle's own
    (shipped) weights, or weights a user put into the user models folder."""

    name: str
    title: str
    description: str
    version: str
    has_weights: bool
    demo_weights: bool
    threshold: float | None  # calibrated on healthy validation volumes (models/model_info.json)
    root: Path
    contrast: str | None = None  # MR contrast the weights were trained on (models/model_info.json), e.g. T1w
    model_dir: Path | None = None  # the user's weights folder; None: the bundle's own models/
    weights_name: str = ""  # the user's weights subfolder name ("" for <bundle>/ itself)

    @classmethod
    def from_bundle(cls, bundle: BundleInfo) -> "Method":
        metadata = bundle.metadata
        info = bundle.model_info
        threshold = info.get("threshold")
        return cls(name=bundle.name, title=metadata.get("name", bundle.name), description=bundle.description,
                   version=bundle.version, has_weights=bundle.has_weights,
                   demo_weights=bundle.has_weights and bundle.weights_need_demo_config,
                   threshold=None if threshold is None else float(threshold), root=bundle.root,
                   contrast=bundle.weights_contrast if bundle.has_weights else None)

    @classmethod
    def from_user_weights(cls, bundle: BundleInfo, model_dir: Path, weights_name: str = "") -> "Method":
        """The bundle run with the weights in `model_dir` (``--model_dir``; their own
        ``model_info.json`` says whether they need the demo overlay and holds the threshold)."""
        info = read_model_info(model_dir)
        threshold = info.get("threshold")
        return cls(name=bundle.name, title=bundle.metadata.get("name", bundle.name), description=bundle.description,
                   version=bundle.version, has_weights=has_weights(model_dir),
                   demo_weights=trained_with_demo_config(model_dir),
                   threshold=None if threshold is None else float(threshold), root=bundle.root,
                   contrast="/".join(shipped_contrasts(model_dir)) or None, model_dir=Path(model_dir),
                   weights_name=weights_name)

    @property
    def key(self) -> str:
        """Unique among the methods: the bundle's name for its own weights, else
        ``<bundle>:user`` or ``<bundle>:user/<subfolder>``."""
        if self.model_dir is None:
            return self.name
        return f"{self.name}:{USER_WEIGHTS}" + (f"/{self.weights_name}" if self.weights_name else "")

    @property
    def weights_folder(self) -> Path:
        return self.model_dir if self.model_dir is not None else self.root / "models"

    @property
    def weights_label(self) -> str:
        if self.model_dir is not None:
            return "your weights" + (f": {self.weights_name}" if self.weights_name else "")
        if not self.has_weights:
            return "no weights"
        return "demo weights" if self.demo_weights else "weights"

    @property
    def label(self) -> str:
        """Text of the method selector's item, e.g. ``dae (demo weights)``, ``dae (your weights)``."""
        return f"{self.name} ({self.weights_label})"

    @property
    def tooltip(self) -> str:
        threshold = "none calibrated" if self.threshold is None else f"{self.threshold:.4g}"
        return (f"{self.title} {self.version}\n\n{self.description}\n\nWeights: {self.weights_label} "
                f"({self.weights_folder})\nTrained on: {self.contrast or 'unknown contrast'} scans\n"
                f"Calibrated threshold: {threshold}")


def user_weights(bundle: BundleInfo, user_models: str | os.PathLike | None) -> list[Method]:
    """The weights a user added for `bundle`: ``<user_models>/<bundle>/`` itself and each of its
    subfolders that holds a ``model.pt``."""
    folder = Path(user_models) / bundle.name if user_models else None
    if folder is None or not folder.is_dir():
        return []
    methods = [Method.from_user_weights(bundle, folder)] if has_weights(folder) else []
    for sub in sorted(p for p in folder.iterdir() if p.is_dir()):
        if has_weights(sub):
            methods.append(Method.from_user_weights(bundle, sub, sub.name))
    return methods


def available_methods(user_models: str | os.PathLike | None = None) -> list[Method]:
    """Every bundle on the bundle search path (``$MEDANOMALY_BUNDLE_PATH`` first) with its own
    weights, plus one entry per set of weights in `user_models` (`user_weights`); those with
    weights first."""
    methods = []
    for bundle in list_bundles():
        methods.append(Method.from_bundle(bundle))
        methods += user_weights(bundle, user_models)
    return sorted(methods, key=lambda m: (not m.has_weights, m.name, m.model_dir is not None, m.weights_name))


def method_by_name(name: str, user_models: str | os.PathLike | None = None) -> Method:
    """A method by its `Method.key` (``dae``, ``dae:user``, ``dae:user/mine``)."""
    bundle_name, _, weights = name.partition(":")
    bundle = find_bundle(bundle_name)
    if not weights:
        return Method.from_bundle(bundle)
    for method in user_weights(bundle, user_models):
        if method.key == name:
            return method
    raise LookupError(f"No weights '{weights}' for the method '{bundle_name}' in {user_models}.")


# ---------------------------------------------------------------------------------------------
# the work folder


@dataclass(frozen=True)
class WorkFolder:
    root: Path

    @classmethod
    def create(cls, parent: str | os.PathLike | None = None) -> "WorkFolder":
        if parent is not None:
            Path(parent).mkdir(parents=True, exist_ok=True)
        root = Path(tempfile.mkdtemp(prefix="MedAnomaly-", dir=parent))
        (root / OUTPUT_DIR).mkdir()
        return cls(root)

    @property
    def input_file(self) -> Path:
        return self.root / INPUT_FILE

    @property
    def mask_file(self) -> Path:
        return self.root / MASK_FILE

    @property
    def output_dir(self) -> Path:
        return self.root / OUTPUT_DIR

    def remove(self) -> None:
        shutil.rmtree(self.root, ignore_errors=True)


# ---------------------------------------------------------------------------------------------
# the command


@dataclass
class DetectionRequest:
    """Everything one run of a bundle's inference needs; `command()` is what the module launches."""

    method: str
    input_file: Path
    output_dir: Path
    device: str = "cpu"
    threshold: float | None = None  # None: the bundle's calibrated threshold
    mask_file: Path | None = None
    python: str | None = None  # PythonSlicer inside Slicer
    model_dir: Path | None = None  # None: the bundle's own models/ (with its demo overlay if needed)

    def __post_init__(self):
        if self.device not in DEVICES:
            raise ValueError(f"Unknown device '{self.device}' (choose from {', '.join(DEVICES)}).")
        if self.threshold is not None and not (float(self.threshold) >= 0.0):
            raise ValueError(f"The threshold must be a number >= 0, not {self.threshold}.")

    def overrides(self) -> dict:
        """The bundle config values this run sets. Unset options are left out entirely: a
        `model_dir` key, even None, would tell `bundle_command` that the weights are the
        user's own and drop the demo overlay the shipped weights need."""
        overrides = {
            "input": str(self.input_file),
            "mask": None if self.mask_file is None else str(self.mask_file),
            "output_dir": str(self.output_dir),
            "output_ext": OUTPUT_EXTENSION,
            "device": self.device,
            "threshold": None if self.threshold is None else float(self.threshold),
            "model_dir": None if self.model_dir is None else str(self.model_dir),
            "amp": False if self.device == "cpu" else None,  # the configs enable AMP whenever CUDA exists
        }
        return {key: value for key, value in overrides.items() if value is not None}

    def command(self) -> list[str]:
        return bundle_command(self.method, "inference", overrides=self.overrides(), python=self.python)

    def expected_outputs(self) -> dict[str, Path]:
        return output_paths(self.output_dir, volume_name(self.input_file), OUTPUT_EXTENSION)


def check_ready(request: DetectionRequest) -> None:
    """Fails before launching anything when the run cannot work (no weights, no input file)."""
    method = Method.from_bundle(find_bundle(request.method))
    weights = weights_file(request.model_dir or method.root / "models")
    if not weights.is_file():
        raise DetectionError(
            f"The method '{method.name}' has no trained weights ({weights} is missing). "
            f"Train it first (medanomaly train {method.name}), or choose a method marked 'weights'.")
    if not Path(request.input_file).is_file():
        raise DetectionError(f"The input file {request.input_file} was not written; the volume could not be saved.")


# ---------------------------------------------------------------------------------------------
# the background process


@dataclass
class Update:
    """What arrived from the process since the last poll."""

    lines: list[str] = field(default_factory=list)  # log lines (progress lines left out)
    fraction: float | None = None  # latest progress, 0..1
    message: str = ""
    finished: bool = False
    returncode: int | None = None


class DetectionJob:
    """A bundle's inference in its own process (its own process group / session), followed
    without blocking: `poll()` from a GUI timer, or `wait()` in scripts and tests."""

    def __init__(self, command: list[str], cwd: str | os.PathLike | None = None, env: dict | None = None,
                 request: DetectionRequest | None = None, worker=None):
        self.command, self.request = list(command), request
        self.started = time.monotonic()
        self.log_lines: list[str] = []
        self.fraction, self.message = 0.0, ""
        self.finished = False
        cwd = None if cwd is None else str(cwd)
        if worker is not None:  # forked from the warm worker where it can (same run, no start-up)
            self.process = worker.start_bundle(self.command, cwd=cwd, env=env)
        else:
            self.process = BundleProcess(self.command, cwd=cwd, env=env)

    @classmethod
    def start(cls, request: DetectionRequest, env: dict | None = None, warm: bool = True) -> "DetectionJob":
        """The request's run; with `warm`, forked from the session's warm worker (`shared_worker`)."""
        worker = shared_worker(request.python, env) if warm else None
        return cls(request.command(), cwd=request.output_dir, env=env, request=request, worker=worker)

    @property
    def cancelled(self) -> bool:
        return self.process.cancelled

    @property
    def returncode(self) -> int | None:
        return self.process.poll()

    @property
    def log(self) -> str:
        return "\n".join(self.log_lines)

    @property
    def elapsed(self) -> float:
        return time.monotonic() - self.started

    def _take(self, lines: list[str], update: Update) -> None:
        for line in lines:
            progress = parse_progress(line)
            if progress is not None:
                update.fraction, update.message = progress
                self.fraction, self.message = progress
                continue
            update.lines.append(line)
            self.log_lines.append(line)
        del self.log_lines[:-LOG_LINES]

    def poll(self) -> Update:
        """Lines and progress since the last call; never blocks for long (GUI timers)."""
        update = Update()
        if self.finished:
            update.finished, update.returncode = True, self.returncode
            return update
        self._take(self.process.poll_lines(), update)
        if self.process.poll() is not None:
            # the process has exited: collect what its reader thread still holds
            self._take(list(self.process.lines(timeout=2.0)), update)
            self.finished = True
            update.finished, update.returncode = True, self.process.poll()
        return update

    def wait(self, on_update: Callable[[Update], None] | None = None, interval: float = 0.1,
             timeout: float | None = None) -> int:
        """Polls until the process ends (or `timeout` seconds pass: then it is cancelled)."""
        while True:
            update = self.poll()
            if on_update is not None and (update.lines or update.fraction is not None or update.finished):
                on_update(update)
            if update.finished:
                return update.returncode
            if timeout is not None and self.elapsed > timeout:
                self.cancel()
                raise DetectionError(f"The detection took longer than {timeout:.0f} s and was stopped.",
                                     self.log, self.returncode)
            time.sleep(interval)

    def cancel(self, grace_seconds: float = 3.0) -> None:
        """Stops the whole process tree (the bundle may have started worker processes)."""
        if os.name == "nt" and self.process.poll() is None:
            # no process groups on Windows: end the tree by its root process id
            self.process.cancelled = True
            subprocess.run(["taskkill", "/F", "/T", "/PID", str(self.process.process.pid)],
                           capture_output=True, check=False)
            try:
                self.process.process.wait(timeout=grace_seconds)
            except subprocess.TimeoutExpired:
                self.process.process.kill()
        else:
            self.process.cancel(grace_seconds=grace_seconds)

    def result(self) -> "DetectionResult":
        """The output files of a finished run; raises `DetectionError` with the log when it failed."""
        if not self.finished:
            raise RuntimeError("The detection is still running.")
        if self.cancelled:
            raise DetectionCancelled("The detection was cancelled.", self.log, self.returncode)
        if self.returncode != 0:
            message = explain_failure(self.returncode, self.log)
            if self.request is not None:  # the work folder's file name means nothing to the user
                for name in (f"'{self.request.input_file}'", str(self.request.input_file)):
                    message = message.replace(name, "the input volume")
            raise DetectionError(message, self.log, self.returncode)
        if self.request is None:
            raise RuntimeError("This job was started from a bare command: read its outputs with read_result().")
        return read_result(self.request, self.log)


_WORKER = None


def shared_worker(python: str | None, env: dict | None = None):
    """The session's warm worker (`medanomaly.bundles.warm`) for this Python and environment, started
    on first use and restarted when they change; None where there is none (not Linux, an older
    medanomaly, MEDANOMALY_WARM_WORKER=0). It ends with the application."""
    global _WORKER
    try:
        from medanomaly.bundles import warm
    except ImportError:
        return None
    if not warm.supported():
        return None
    key = (python, tuple(sorted((env or {}).items())))
    if _WORKER is None or _WORKER[0] != key:
        if _WORKER is not None:
            _WORKER[1].close()
        _WORKER = (key, warm.WarmWorker(python, env))
        import atexit

        atexit.register(_WORKER[1].close)
    return _WORKER[1]


# ---------------------------------------------------------------------------------------------
# results and failures


@dataclass(frozen=True)


class DetectionResult:
    heatmap: Path
    segmentation: Path | None
    pseudo_healthy: Path | None
    threshold: float | None
    volume_score: float | None
    record: dict


def read_result(request: DetectionRequest, log: str = "") -> DetectionResult:
    """The files a finished run wrote, from ``detections.json`` (or the expected names)."""
    expected = request.expected_outputs()
    summary = Path(request.output_dir) / SUMMARY_FILE
    records = json.loads(summary.read_text()) if summary.is_file() else []
    record = next((r for r in records if Path(r.get("heatmap", "")).name == expected["heatmap"].name),
                  records[0] if records else {})
    heatmap = Path(record.get("heatmap", expected["heatmap"]))
    if not heatmap.is_file():
        raise DetectionError(f"The method finished but wrote no heatmap ({heatmap}).", log, 0)

    def optional(key):
        path = Path(record.get(key, expected[key]))
        return path if path.is_file() else None

    threshold = record.get("threshold")
    return DetectionResult(heatmap=heatmap, segmentation=optional("segmentation"),
                           pseudo_healthy=optional("pseudo_healthy"),
                           threshold=None if threshold is None else float(threshold),
                           volume_score=record.get("volume_score"), record=record)


_FAILURES = [
    (re.compile(r"CUDA out of memory|OutOfMemoryError|CUBLAS_STATUS_ALLOC_FAILED", re.I),
     "The GPU ran out of memory. Close other programs that use the GPU, or choose CPU as the device."),
    (re.compile(r"\bMemoryError\b|DefaultCPUAllocator: can't allocate memory|not enough memory|"
                r"Cannot allocate memory", re.I),
     "The computer ran out of memory. Close other programs, or crop the volume to the head first "
     "(Crop Volume module)."),
    (re.compile(r"Torch not compiled with CUDA enabled|No CUDA GPUs are available|Found no NVIDIA driver|"
                r"CUDA driver version is insufficient|no kernel image is available", re.I),
     "PyTorch cannot use the GPU here. Choose CPU as the device, or install a CUDA build of PyTorch "
     "with the PyTorch Utils module."),
    (re.compile(r"No weights at (?P<path>\S+)"),
     "The method has no trained weights ({path}). Train it first, or choose a method marked 'weights'."),
    (re.compile(r"do not fit this network configuration"),
     "The method's weights do not fit its network configuration (were they trained with another config?)."),
    (re.compile(r"No module named '(?P<module>[^']+)'"),
     "A Python package is missing in Slicer's Python ({module}). Press 'Install dependencies' in the "
     "Advanced section, then try again."),
    (re.compile(r"VolumeError: (?P<sentence>.+)"), "The input cannot be used: {sentence}"),
]


def explain_failure(returncode: int | None, log: str) -> str:
    """A sentence for the user about why the run failed, from its exit code and log."""
    for pattern, message in _FAILURES:
        matches = list(pattern.finditer(log or ""))
        if matches:
            return message.format(**{k: v.strip() for k, v in matches[-1].groupdict().items()})
    if returncode is not None and returncode in (-getattr(signal, "SIGKILL", 9), 137):
        return ("The method was stopped by the operating system (exit code {0}), most likely because the "
                "computer ran out of memory. Close other programs or run on a smaller volume.").format(returncode)
    cause = root_cause(log or "") if root_cause is not None else None
    if cause:
        return f"The method failed (exit code {returncode}): {cause}"
    return f"The method failed (exit code {returncode}). The log below says why."
