"""Names of the files a detection writes (torch-free: the Slicer module reads them back)."""

from __future__ import annotations

from pathlib import Path

VOLUME_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".mha", ".mhd", ".seg.nrrd")
SUMMARY_FILE = "detections.json"


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
