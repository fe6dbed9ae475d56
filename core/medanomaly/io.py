"""Reading and writing volumes, and moving them between SimpleITK (LPS) and MONAI (RAS).

Everything a user gives us goes through :func:`check_volume_file` / :func:`read_volume`, which
raise :class:`VolumeError` with a sentence saying which file is wrong and what to do.

Geometry conventions:

* SimpleITK images carry spacing, origin and a direction matrix in LPS physical space.
* MONAI ``MetaTensor`` s are channel-first ``(1, X, Y, Z)`` with a 4x4 RAS affine
  ``diag(-1, -1, 1, 1) @ [[direction @ diag(spacing), origin], [0, 0, 0, 1]]``,
  exactly what ``monai.transforms.LoadImage(reader="ITKReader")`` produces.
* Writers put an ``(X, Y, Z)`` array on exactly the grid of a reference (same size, spacing,
  origin, direction). Every write goes to a temporary file in the target directory first and
  is then renamed over the target, so a crash never leaves a half-written file behind.
"""

from __future__ import annotations

import gzip
import json
import logging
import os
import struct
import uuid
import zlib
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import SimpleITK as sitk
import torch
from monai.data import ImageReader, MetaTensor

logger = logging.getLogger(__name__)

__all__ = [
    "VolumeError",
    "VolumeInfo",
    "check_volume_file",
    "read_volume",
    "volume_array",
    "image_to_metatensor",
    "metatensor_to_image",
    "write_volume",
    "write_heatmap",
    "write_segmentation",
    "read_segmentation",
    "check_input_volume",
    "check_same_grid",
    "VolumeReader",
    "write_json",
    "OutputWriteError",
]

READ_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".mha", ".mhd")
WRITE_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".mha")
HEATMAP_DESCRIPTION = "MedAnomaly anomaly heatmap: float32, 0 = normal, higher = more anomalous"

_LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])
_SUPPORTED = "NIfTI (.nii, .nii.gz), NRRD (.nrrd), MetaImage (.mha, .mhd) or a directory holding one DICOM series"


class VolumeError(ValueError):
    """A volume given by the user cannot be used; the message names the file and what to do."""


class OutputWriteError(OSError):
    """An output could not be written completely (full disk, permissions); the earlier file is kept."""


# The smallest volume worth analysing: a brain is ~140 mm across; this refuses toy volumes and
# single slabs, not thick-slice clinical scans (24 slices of 5 mm pass).
MIN_VOXELS_PER_AXIS = 8
MIN_EXTENT_MM = 40.0
# Two files share a grid when their voxel-to-physical matrices agree to this (mm; same rule as Slicer's module).
GRID_TOLERANCE_MM = 1e-3


@dataclass(frozen=True)
class VolumeInfo:
    """Header information of a 3D volume (SimpleITK conventions: LPS, (x, y, z) order)."""

    path: str
    size: tuple[int, int, int]
    spacing: tuple[float, float, float]
    origin: tuple[float, float, float]
    direction: tuple[float, ...]  # 9 values, row-major, as SimpleITK's GetDirection()
    pixel_type: str

    @property
    def ijk_to_lps(self) -> np.ndarray:
        """4x4 matrix from voxel index (i, j, k) to LPS millimetres."""
        return _ijk_to_lps(self.spacing, self.origin, self.direction)

    @property
    def affine(self) -> np.ndarray:
        """4x4 RAS affine as MONAI uses it."""
        return _LPS_TO_RAS @ self.ijk_to_lps


# --------------------------------------------------------------------------- geometry helpers
def _ijk_to_lps(spacing, origin, direction) -> np.ndarray:
    m = np.eye(4)
    m[:3, :3] = np.reshape(np.asarray(direction, dtype=np.float64), (3, 3)) @ np.diag(spacing)
    m[:3, 3] = origin
    return m


def _geometry_from_affine(affine) -> tuple[tuple, tuple, tuple]:
    """(spacing, origin, direction) in LPS from a 4x4 RAS affine."""
    a = np.asarray(affine.detach().cpu() if isinstance(affine, torch.Tensor) else affine, dtype=np.float64)
    if a.shape != (4, 4):
        raise ValueError(f"Expected a 4x4 affine for a 3D volume, got shape {a.shape}.")
    lps = _LPS_TO_RAS @ a
    columns = lps[:3, :3]
    spacing = np.linalg.norm(columns, axis=0)
    if np.any(spacing <= 0) or not np.all(np.isfinite(lps)):
        raise ValueError(f"The affine is degenerate (zero spacing or non-finite values):\n{a}")
    direction = columns / spacing
    return tuple(spacing.tolist()), tuple(lps[:3, 3].tolist()), tuple(direction.ravel().tolist())


def _info_from_image(image: sitk.Image, path: str = "<image>") -> VolumeInfo:
    return VolumeInfo(
        path=path,
        size=tuple(int(s) for s in image.GetSize()),
        spacing=tuple(image.GetSpacing()),
        origin=tuple(image.GetOrigin()),
        direction=tuple(image.GetDirection()),
        pixel_type=image.GetPixelIDTypeAsString(),
    )


def _as_numpy(array) -> np.ndarray:
    if isinstance(array, torch.Tensor):
        array = array.detach().cpu()
        if isinstance(array, MetaTensor):
            array = array.as_tensor()
        return array.numpy()
    return np.asarray(array)


# --------------------------------------------------------------------------- checking and reading
def _dicom_series_files(directory: Path) -> list[str]:
    """File names of the DICOM series with the most files in ``directory`` (sorted by ITK/GDCM)."""
    series_ids = sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(directory))
    if not series_ids:
        raise VolumeError(
            f"'{directory}' is a directory but holds no DICOM series. Give a directory containing the "
            f"DICOM files of one series (not its parent), or a volume file: {_SUPPORTED}."
        )
    files = {sid: sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(directory), sid) for sid in series_ids}
    best = max(series_ids, key=lambda sid: len(files[sid]))
    if len(series_ids) > 1:
        logger.info(
            "'%s' holds %d DICOM series (%s); using series %s, which has the most files (%d). "
            "Put each series in its own directory to choose another one.",
            directory, len(series_ids),
            ", ".join(f"{sid}: {len(files[sid])} files" for sid in series_ids), best, len(files[best]),
        )
    return list(files[best])


def _nifti_expected_bytes(head: bytes) -> int | None:
    """Bytes a NIfTI-1/2 file needs (header, extensions up to vox_offset, voxels); None if not NIfTI."""
    for endian in "<>":
        header_size = struct.unpack(endian + "i", head[:4])[0]
        if header_size == 348 and len(head) >= 348:
            dims = struct.unpack(endian + "8h", head[40:56])
            bitpix = struct.unpack(endian + "h", head[72:74])[0]
            offset = int(struct.unpack(endian + "f", head[108:112])[0])
        elif header_size == 540 and len(head) >= 540:
            bitpix = struct.unpack(endian + "h", head[14:16])[0]
            dims = struct.unpack(endian + "8q", head[16:80])
            offset = struct.unpack(endian + "q", head[168:176])[0]
        else:
            continue
        n_voxels = int(np.prod([max(int(d), 1) for d in dims[1:1 + max(0, min(int(dims[0]), 7))]], dtype=np.int64))
        return max(offset, header_size) + n_voxels * max(int(bitpix), 8) // 8
    return None


def _check_complete(path: Path) -> None:
    """Refuses a truncated or corrupt NIfTI file: ITK fills what is missing with zeros and reads
    on, so the gzip stream (CRC, end) is read to its end and the voxel bytes are counted."""
    name = path.name.lower()
    if not name.endswith((".nii", ".nii.gz")):
        return  # NRRD and MetaImage readers fail on missing data themselves
    try:
        if name.endswith(".gz"):
            with gzip.open(path, "rb") as stream:
                head = stream.read(544)
                length = len(head)
                while chunk := stream.read(1 << 22):
                    length += len(chunk)
        else:
            with open(path, "rb") as stream:
                head = stream.read(544)
            length = path.stat().st_size
    except (OSError, EOFError, zlib.error) as err:
        raise VolumeError(f"'{path}' is damaged: its compressed data cannot be read to the end ({err}). "
                          "Copy or export the file again.") from None
    expected = _nifti_expected_bytes(head)
    if expected is not None and length < expected:
        raise VolumeError(f"'{path}' is truncated: it holds {length} bytes of image data where its header "
                          f"needs {expected}. Copy or export the file again.")


def _check_even_slices(folder: Path, files: list[str], normal, tolerance: float = 0.01) -> None:
    """Refuses a DICOM series whose slices are not evenly spaced (a missing or doubled slice):
    ITK would stack them at the mean spacing, silently distorting the volume."""
    reader = sitk.ImageFileReader()
    positions = []
    for name in files:
        reader.SetFileName(name)
        reader.ReadImageInformation()
        positions.append(float(np.dot(reader.GetOrigin()[:3], normal)))
    steps = np.abs(np.diff(positions))
    typical = max(float(np.median(steps)), 1e-6) if steps.size else 0.0
    if steps.size and (steps.max() - steps.min()) > tolerance * typical:
        gaps = [i + 1 for i, step in enumerate(steps) if abs(step - typical) > tolerance * typical]
        raise VolumeError(
            f"The DICOM series in '{folder}' has uneven slice spacing ({steps.min():.3g} to {steps.max():.3g} mm; "
            f"irregular after slice(s) {gaps[:5]}): a slice is probably missing. Re-export the complete series, "
            "or resample it to a regular grid first."
        )


def _inspect(path) -> tuple[VolumeInfo, list[str] | None, bool]:
    """Header check shared by check_volume_file and read_volume.

    Returns the 3D info, the DICOM file list (None for a single file), and whether the file is a
    4D image with a single 4th component that has to be collapsed after reading.
    """
    path = Path(path)
    if not path.exists():
        raise VolumeError(f"'{path}' does not exist. Check the path (it must be {_SUPPORTED}).")

    reader = sitk.ImageFileReader()
    dicom_files = None
    if path.is_dir():
        dicom_files = _dicom_series_files(path)
        reader.SetFileName(dicom_files[0])
    else:
        if not os.access(path, os.R_OK):
            raise VolumeError(f"'{path}' is not readable (permission denied). Fix the file permissions.")
        reader.SetFileName(str(path))
    try:
        reader.ReadImageInformation()
    except RuntimeError as err:
        raise VolumeError(
            f"'{path}' could not be read as an image ({str(err).strip().splitlines()[-1]}). "
            f"It may be damaged or in an unsupported format; supported: {_SUPPORTED}."
        ) from None

    size = list(reader.GetSize())
    dim = reader.GetDimension()
    if reader.GetNumberOfComponents() != 1:
        raise VolumeError(
            f"'{path}' has {reader.GetNumberOfComponents()} components per voxel (colour or vector image); "
            "a single-channel (grayscale) 3D volume is needed. Export one channel/sequence per file."
        )
    collapse_4d = False
    if dim == 4:
        if size[3] != 1:
            raise VolumeError(
                f"'{path}' is a 4D image of size {tuple(size)} ({size[3]} volumes, e.g. a time series or "
                "multiple sequences). Give one 3D volume: split it (e.g. with fslsplit) and pass one file."
            )
        collapse_4d = True
    elif dim != 3:
        raise VolumeError(
            f"'{path}' is a {dim}D image of size {tuple(size)}; a 3D volume is needed. "
            "For DICOM give the directory holding the whole series, not one file."
        )
    spacing = list(reader.GetSpacing())[:3]
    origin = list(reader.GetOrigin())[:3]
    direction = np.reshape(reader.GetDirection(), (dim, dim))[:3, :3]
    size = size[:3]

    if dicom_files is not None and len(dicom_files) > 1:  # (one file: a multi-frame DICOM, size as read)
        # ITK's series reader takes the slice spacing from the first and last slice positions.
        size[2] = len(dicom_files)
        last = sitk.ImageFileReader()
        last.SetFileName(dicom_files[-1])
        try:
            last.ReadImageInformation()
        except RuntimeError:
            raise VolumeError(f"'{dicom_files[-1]}' in the DICOM series '{path}' cannot be read; "
                              "the series is damaged, re-export it.") from None
        spacing[2] = float(np.linalg.norm(np.subtract(last.GetOrigin(), origin)) / (len(dicom_files) - 1))

    if min(size) < 2:
        raise VolumeError(
            f"'{path}' has size {tuple(size)}: it is a single slice, not a volume. Give a 3D volume "
            "(for DICOM: the directory holding all slices of the series)."
        )
    info = VolumeInfo(
        path=str(path),
        size=tuple(int(s) for s in size),
        spacing=tuple(float(s) for s in spacing),
        origin=tuple(float(o) for o in origin),
        direction=tuple(float(d) for d in direction.ravel()),
        pixel_type=sitk.GetPixelIDValueAsString(reader.GetPixelID()),
    )
    return info, dicom_files, collapse_4d


def check_volume_file(path) -> VolumeInfo:
    """Fast header-only check that ``path`` is a readable 3D volume; returns its geometry.

    ``path`` is a NIfTI / NRRD / MetaImage file or a directory holding a DICOM series.
    Raises :class:`VolumeError` (missing, unreadable, 2D, real 4D, multi-component).
    """
    return _inspect(path)[0]


def read_volume(path, allow_constant: bool = False) -> sitk.Image:
    """Read a 3D volume as a float32 SimpleITK image (LPS geometry of the file).

    A directory is read as a DICOM series (the one with the most files if there are several).
    Raises :class:`VolumeError` for anything unusable, including NaN/Inf values and constant
    images (``allow_constant=True`` accepts those, e.g. for an empty label or mask).
    """
    info, dicom_files, collapse_4d = _inspect(path)
    if dicom_files is None:
        _check_complete(Path(path))
    elif len(dicom_files) > 1:  # here, not in every header check: it reads every slice's header
        _check_even_slices(path, dicom_files, np.reshape(info.direction, (3, 3))[:, 2])
    try:
        if dicom_files is not None and len(dicom_files) > 1:
            reader = sitk.ImageSeriesReader()
            reader.SetFileNames(dicom_files)
            image = reader.Execute()
        else:
            image = sitk.ReadImage(dicom_files[0] if dicom_files else str(path))
    except RuntimeError as err:
        raise VolumeError(
            f"'{path}' has a valid header but its voxel data could not be read "
            f"({str(err).strip().splitlines()[-1]}). The file is probably truncated or damaged; re-export it."
        ) from None
    if collapse_4d:
        size = list(image.GetSize())
        image = sitk.Extract(image, size[:3] + [0], [0, 0, 0, 0],
                             sitk.ExtractImageFilter.DIRECTIONCOLLAPSETOSUBMATRIX)

    image = sitk.Cast(image, sitk.sitkFloat32)
    values = sitk.GetArrayViewFromImage(image)
    if values.size == 0:
        raise VolumeError(f"'{path}' contains no voxels. Give a non-empty 3D volume.")
    finite = bool(np.isfinite(np.sum(values, dtype=np.float64)))  # NaN / Inf propagate; no voxel-sized mask
    n_bad = 0 if finite else int(np.count_nonzero(~np.isfinite(values)))
    if n_bad:
        raise VolumeError(
            f"'{path}' contains {n_bad} NaN or infinite voxel values (as float32). "
            "Fix the volume (e.g. replace them with 0 in the exporting tool) and try again."
        )
    if not allow_constant and float(values.min()) == float(values.max()):
        raise VolumeError(
            f"'{path}' is constant (every voxel is {float(values.min())}): there is no image content. "
            "Check that the right file was exported."
        )
    logger.debug("Read '%s': size %s, spacing %s", path, info.size, info.spacing)
    return image


def check_input_volume(path) -> VolumeInfo:
    """Header check of a scan to analyse, with the size rule: at least MIN_VOXELS_PER_AXIS voxels
    and MIN_EXTENT_MM along every axis (a toy or single-slab volume has no brain to compare)."""
    info = check_volume_file(path)
    extent = [n * s for n, s in zip(info.size, info.spacing)]
    if min(info.size) < MIN_VOXELS_PER_AXIS or min(extent) < MIN_EXTENT_MM:
        raise VolumeError(
            f"'{path}' is too small to analyse: {info.size} voxels covering "
            f"{' x '.join(f'{e:.0f}' for e in extent)} mm; a brain scan needs at least {MIN_VOXELS_PER_AXIS} "
            f"voxels and {MIN_EXTENT_MM:.0f} mm along every axis."
        )
    return info


def check_same_grid(reference, other, what: str = "The mask", tolerance: float = GRID_TOLERANCE_MM) -> None:
    """Raises `VolumeError` unless `other` lies on exactly `reference`'s voxel grid: the same size and
    voxel-to-physical matrix (spacing, origin, axes) within `tolerance` mm. Both are files or VolumeInfo."""
    a = reference if isinstance(reference, VolumeInfo) else check_volume_file(reference)
    b = other if isinstance(other, VolumeInfo) else check_volume_file(other)
    offset = float(np.max(np.abs(a.ijk_to_lps - b.ijk_to_lps)))
    if a.size != b.size or offset > tolerance:
        raise VolumeError(
            f"{what} '{b.path}' is not on the grid of '{a.path}' (size {b.size} vs {a.size}, spacing "
            f"{_round(b.spacing)} vs {_round(a.spacing)} mm, origin {_round(b.origin)} vs {_round(a.origin)} mm; "
            f"largest difference of the voxel-to-physical matrices {offset:.3g} mm, tolerance {tolerance} mm). "
            "Resample it onto the image's grid first."
        )


def _round(values) -> tuple:
    return tuple(round(float(v), 3) for v in values)


# --------------------------------------------------------------------------- SimpleITK <-> MONAI
def volume_array(image: sitk.Image) -> np.ndarray:
    """Voxel values of a 3D SimpleITK image as a numpy array in (X, Y, Z) order (one copy)."""
    return np.ascontiguousarray(sitk.GetArrayViewFromImage(image).transpose(2, 1, 0))


def image_to_metatensor(image: sitk.Image, source: str | None = None) -> MetaTensor:
    """SimpleITK 3D image -> MetaTensor ``(1, X, Y, Z)`` with the RAS affine (as MONAI's ITKReader).

    ``source`` (optional) is stored as ``meta["filename_or_obj"]``.
    """
    if image.GetDimension() != 3 or image.GetNumberOfComponentsPerPixel() != 1:
        raise ValueError(
            f"Expected a single-channel 3D image, got a {image.GetDimension()}D image with "
            f"{image.GetNumberOfComponentsPerPixel()} component(s)."
        )
    info = _info_from_image(image)
    array = volume_array(image)
    affine = info.affine
    meta: dict[str, Any] = {
        "original_affine": affine.copy(),
        "spacing": np.asarray(info.spacing),
        "spatial_shape": np.asarray(info.size),
        "space": "RAS",
        "original_channel_dim": float("nan"),
    }
    if source is not None:
        meta["filename_or_obj"] = str(source)
    return MetaTensor(torch.from_numpy(array)[None], affine=torch.as_tensor(affine, dtype=torch.float64), meta=meta)


def metatensor_to_image(tensor, affine=None) -> sitk.Image:
    """``(X, Y, Z)`` or ``(1, X, Y, Z)`` tensor/array + RAS affine -> SimpleITK image (LPS).

    ``affine`` defaults to ``tensor.affine`` (MetaTensor). Spacing, origin and direction are
    recovered exactly (to float precision), including oblique directions.
    """
    if affine is None:
        affine = getattr(tensor, "affine", None)
        if affine is None:
            raise ValueError("metatensor_to_image needs an affine: pass a MetaTensor or affine=...")
    array = _as_numpy(tensor)
    if array.ndim == 4 and array.shape[0] == 1:
        array = array[0]
    if array.ndim != 3:
        raise ValueError(f"Expected an (X, Y, Z) or (1, X, Y, Z) array, got shape {tuple(array.shape)}.")
    spacing, origin, direction = _geometry_from_affine(affine)
    image = sitk.GetImageFromArray(array.transpose(2, 1, 0))  # strided view: SimpleITK copies it once
    image.SetSpacing(spacing)
    image.SetOrigin(origin)
    image.SetDirection(direction)
    return image


class VolumeReader(ImageReader):
    """MONAI reader (for `LoadImage` / `LoadImaged`) that reads through `read_volume`: the same
    DICOM series, geometry and checks (damaged files, NaN / Inf, constant images) as every other
    read of a user's file, so the volume analysed is the volume the outputs are written onto.
    Arrays and affines are ITKReader's (X, Y, Z; RAS). `allow_constant` for label and mask files."""

    def __init__(self, allow_constant: bool = False):
        super().__init__()
        self.allow_constant = allow_constant

    def verify_suffix(self, filename) -> bool:
        names = [filename] if isinstance(filename, (str, os.PathLike)) else list(filename)
        return len(names) == 1 and (Path(names[0]).is_dir() or str(names[0]).lower().endswith(READ_SUFFIXES))

    def read(self, data, **kwargs):
        # MONAI's LoadImage swallows a reader's exception and tries its other readers, which would
        # read the refused file after all: the error travels to `get_data` and is raised there.
        names = [data] if isinstance(data, (str, os.PathLike)) else list(data)
        try:
            if len(names) != 1:
                raise VolumeError(f"One volume per entry is expected, got {len(names)} files: {names}.")
            return read_volume(names[0], allow_constant=self.allow_constant)
        except VolumeError as err:
            return err

    def get_data(self, img: sitk.Image | VolumeError) -> tuple[np.ndarray, dict]:
        if isinstance(img, VolumeError):
            raise img
        tensor = image_to_metatensor(img)
        meta = dict(tensor.meta)
        meta["affine"] = tensor.affine.numpy()
        return tensor.as_tensor()[0].numpy(), meta


# --------------------------------------------------------------------------- writing
def _reference_grid(reference) -> VolumeInfo:
    if isinstance(reference, sitk.Image):
        if reference.GetDimension() != 3:
            raise ValueError(f"The reference image must be 3D, got {reference.GetDimension()}D.")
        return _info_from_image(reference)
    if isinstance(reference, MetaTensor):
        spacing, origin, direction = _geometry_from_affine(reference.affine)
        size = tuple(int(s) for s in reference.shape[-3:])
        return VolumeInfo("<MetaTensor>", size, spacing, origin, direction, str(reference.dtype))
    if isinstance(reference, (str, os.PathLike)):
        return check_volume_file(reference)
    raise TypeError(
        f"reference must be a SimpleITK image, a file path or a MetaTensor with an affine, got {type(reference)}."
    )


def _on_grid(array, reference, dtype) -> sitk.Image:
    grid = _reference_grid(reference)
    array = _as_numpy(array)
    if array.ndim == 4 and array.shape[0] == 1:
        array = array[0]
    if tuple(array.shape) != grid.size:
        raise ValueError(
            f"The array has shape {tuple(array.shape)} but the reference grid ({grid.path}) has size "
            f"{grid.size}; arrays must be (X, Y, Z) on the reference grid."
        )
    # SimpleITK copies the strided (Z, Y, X) view straight into the image: no contiguous copy first
    image = sitk.GetImageFromArray(array.astype(dtype, copy=False).transpose(2, 1, 0))
    image.SetSpacing(grid.spacing)
    image.SetOrigin(grid.origin)
    image.SetDirection(grid.direction)
    return image


def _suffix(path: Path, allowed) -> str:
    name = path.name.lower()
    for suffix in allowed:
        if name.endswith(suffix):
            return suffix
    raise ValueError(f"Cannot write '{path}': the file name must end with one of {', '.join(allowed)}.")


def _fsync(path: Path) -> None:
    """Flushes a file (or a folder's entries) to the disk: a full disk often shows only here."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError:
        if not path.is_dir():  # some file systems cannot sync folders; files must sync
            raise
    finally:
        os.close(fd)


@contextmanager
def _atomic_path(path: Path, suffix: str):
    """Yield a temporary path next to ``path``; when the block succeeds, sync it to the disk and
    rename it onto ``path``. Any failure (full disk, permissions, a failed check in the block)
    raises `OutputWriteError` and leaves an earlier ``path`` untouched."""
    tmp = path.parent / f".{path.name}.{uuid.uuid4().hex[:8]}.tmp{suffix}"
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        yield tmp
        _fsync(tmp)
        os.replace(tmp, path)
        _fsync(path.parent)
    except (OSError, RuntimeError, VolumeError) as err:
        kept = " The earlier file is kept." if path.exists() else ""
        raise OutputWriteError(f"Could not write '{path}' ({str(err).strip().splitlines()[-1]}); is the disk full "
                               f"or the folder read-only?{kept}") from None
    finally:
        if tmp.exists():
            tmp.unlink()


def _check_written(size: tuple, path: Path) -> None:
    """Reads a just-written image file back (a writer can fail silently on a full disk): its header,
    and its data to the end (NIfTI: streamed; NRRD / MetaImage: read, their readers fail on missing data)."""
    written = check_volume_file(path)
    if written.size != tuple(size):
        raise VolumeError(f"the written file holds size {written.size}, not {tuple(size)}")
    if path.name.lower().endswith((".nii", ".nii.gz")):
        _check_complete(path)
    else:
        sitk.ReadImage(str(path))


def _write_image(image: sitk.Image, path) -> Path:
    path = Path(path)
    suffix = _suffix(path, WRITE_SUFFIXES)
    with _atomic_path(path, suffix) as tmp:
        sitk.WriteImage(image, str(tmp), useCompression=True)
        _check_written(image.GetSize()[:3], tmp)
    return path


def _finite_or_none(value, where: str, replaced: list):
    if isinstance(value, float) and not np.isfinite(value):
        replaced.append(where)
        return None
    if isinstance(value, dict):
        return {k: _finite_or_none(v, f"{where}.{k}", replaced) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite_or_none(v, f"{where}[{i}]", replaced) for i, v in enumerate(value)]
    return value


def write_json(path, data, **dump_kwargs) -> Path:
    """Writes strict JSON atomically (temporary file, sync, rename): a NaN or infinite number,
    which strict JSON readers reject, is written as null with a warning naming it."""
    path, replaced = Path(path), []
    text = json.dumps(_finite_or_none(data, path.name, replaced), allow_nan=False, **dump_kwargs)
    if replaced:
        logger.warning("%s: non-finite values written as null: %s", path, ", ".join(replaced[:10]))
    with _atomic_path(path, ".json") as tmp:
        tmp.write_text(text)
    return path


def write_volume(array_xyz, reference, path) -> Path:
    """Write an ``(X, Y, Z)`` array as float32 on exactly the grid of ``reference``.

    ``reference``: SimpleITK image, file path, or MetaTensor with an affine. The format follows the
    suffix of ``path`` (.nii.gz, .nii, .nrrd, .mha).
    """
    return _write_image(_on_grid(array_xyz, reference, np.float32), path)


def write_heatmap(map_xyz, reference, path, description: str = HEATMAP_DESCRIPTION) -> Path:
    """Like :func:`write_volume`, with a description stored in the header (NIfTI: ``descrip``, max 80 chars)."""
    image = _on_grid(map_xyz, reference, np.float32)
    image.SetMetaData("ITK_FileNotes", description)
    return _write_image(image, path)


def write_segmentation(mask_xyz, reference, path, name: str = "Anomaly",
                       color=(0.95, 0.25, 0.2), label_value: int = 1) -> Path:
    """Write a binary mask as a 3D Slicer segmentation (``.seg.nrrd``) with one named, coloured segment.

    Voxels where ``mask_xyz`` is non-zero get ``label_value``; the geometry is the reference grid.
    """
    import slicerio

    path = Path(path)
    if not path.name.lower().endswith(".seg.nrrd"):
        raise ValueError(f"Cannot write '{path}': a segmentation file name must end with .seg.nrrd.")
    if not 1 <= int(label_value) <= 65535:
        raise ValueError(f"label_value must be in 1..65535, got {label_value}.")
    grid = _reference_grid(reference)
    mask = _as_numpy(mask_xyz)
    if mask.ndim == 4 and mask.shape[0] == 1:
        mask = mask[0]
    if tuple(mask.shape) != grid.size:
        raise ValueError(
            f"The mask has shape {tuple(mask.shape)} but the reference grid ({grid.path}) has size {grid.size}."
        )
    dtype = np.uint8 if label_value <= 255 else np.uint16
    voxels = np.zeros(mask.shape, dtype=dtype)  # (np.where would build an int64 volume first)
    voxels[mask != 0] = label_value
    segmentation = {
        "voxels": voxels,
        "ijkToLPS": grid.ijk_to_lps,
        "containedRepresentationNames": ["Binary labelmap"],
        "segments": [{
            "id": "Segment_1",
            "name": name,
            "nameAutoGenerated": False,
            "color": [float(c) for c in color],
            "colorAutoGenerated": False,
            "labelValue": int(label_value),
            "layer": 0,
            # The full extent, as slicerio recommends for compatibility with older Slicer versions.
            "extent": [0, grid.size[0] - 1, 0, grid.size[1] - 1, 0, grid.size[2] - 1],
        }],
    }
    with _atomic_path(path, ".seg.nrrd") as tmp:
        slicerio.write_segmentation(str(tmp), segmentation)
        _check_written(grid.size, tmp)
    return path


def read_segmentation(path) -> tuple[np.ndarray, list[dict]]:
    """Read a ``.seg.nrrd`` (or a label-map NIfTI) -> (label array ``(X, Y, Z)``, slicerio segment dicts).

    Segments stored in several layers (overlapping segments) are merged into one label array,
    relabelled 1..N in file order; where they overlap the later segment wins.
    """
    import slicerio

    path = Path(path)
    if not path.is_file():
        raise VolumeError(f"'{path}' does not exist or is not a file. Give a .seg.nrrd segmentation file.")
    try:
        segmentation = slicerio.read_segmentation(str(path))
    except Exception as err:  # slicerio raises IOError, nrrd errors, ...
        raise VolumeError(f"'{path}' could not be read as a segmentation ({err}). Save it from 3D Slicer as "
                          ".seg.nrrd.") from None
    voxels = np.asarray(segmentation["voxels"])
    segments = [dict(s) for s in segmentation.get("segments", [])]
    if voxels.ndim == 4:
        merged = np.zeros(voxels.shape[1:], dtype=np.uint16)
        for index, segment in enumerate(segments, start=1):
            merged[voxels[segment.get("layer", 0)] == segment.get("labelValue", 1)] = index
            segment.update(labelValue=index, layer=0)
        logger.warning("'%s' has overlapping segments (%d layers); merged, later segments win.", path, voxels.shape[0])
        voxels = merged
    if voxels.ndim != 3:
        raise VolumeError(f"'{path}' holds a {voxels.ndim}D array; a 3D segmentation is needed.")
    return voxels, segments
