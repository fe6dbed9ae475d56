"""Names of the files a detection writes (torch-free: the Slicer module reads them back)."""

from __future__ import annotations

import os
from pathlib import Path

VOLUME_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".mha", ".mhd", ".seg.nrrd")
SUMMARY_FILE = "detections.json"
LOCK_FILE = ".medanomaly.lock"
OUTPUT_SUFFIXES = ("_heatmap", "_pseudo_healthy", "_anomaly")  # what `output_paths` appends to a name


class OutputFolderBusyError(RuntimeError):
    """Another run is writing into the same output folder."""


def volume_name(path: str | Path) -> str:
    """File name without its volume suffix (`sub-0001_T1w.nii.gz` -> `sub-0001_T1w`)."""
    name = Path(path).name
    for suffix in sorted(VOLUME_SUFFIXES, key=len, reverse=True):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return name


def subject_name(subject, image_file) -> str:
    """The one name of a subject everywhere (outputs, per-volume records, the benchmark report):
    the datalist entry's `subject` id when it has one, else the image file's name."""
    return str(subject) if subject is not None else volume_name(image_file)


def output_paths(output_dir: str | Path, name: str, extension: str = ".nii.gz") -> dict[str, Path]:
    """Heatmap, segmentation and pseudo-healthy volume of one input."""
    output_dir = Path(output_dir)
    return {
        "heatmap": output_dir / f"{name}_heatmap{extension}",
        "segmentation": output_dir / f"{name}_anomaly.seg.nrrd",
        "pseudo_healthy": output_dir / f"{name}_pseudo_healthy{extension}",
    }


def is_output_file(path: str | Path) -> bool:
    """A file a run wrote (`output_paths`) or a hidden / temporary one: never an input to analyse."""
    name = Path(path).name
    return name.startswith(".") or name.lower().endswith(".seg.nrrd") or volume_name(name).endswith(OUTPUT_SUFFIXES)


_held_locks: dict[str, int] = {}


def lock_output_dir(output_dir: str | Path) -> None:
    """Claims `output_dir` for this process until it exits (an advisory `flock` on a lock file the
    system releases even when the process is killed): a second run into the same folder stops at
    once with a message, instead of both writing over each other's files. No-op where `fcntl` is
    missing (Windows)."""
    try:
        import fcntl
    except ImportError:
        return
    folder = Path(output_dir).resolve()
    if str(folder) in _held_locks:
        return
    folder.mkdir(parents=True, exist_ok=True)
    fd = os.open(folder / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        owner = os.read(fd, 64).decode(errors="replace").strip() or "unknown"
        os.close(fd)
        raise OutputFolderBusyError(f"Another MedAnomaly run (process {owner}) is writing into {folder}. Wait for "
                                    "it to finish, or choose another output folder.") from None
    os.ftruncate(fd, 0)
    os.write(fd, str(os.getpid()).encode())
    _held_locks[str(folder)] = fd
