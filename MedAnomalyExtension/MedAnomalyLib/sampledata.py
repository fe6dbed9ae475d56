"""The module's sample volume: a small synthetic brain with a tumour-like lesion.

The file is committed under ``Resources/SampleData`` (Slicer installs it with the module) and
registered in the Sample Data module with its SHA256 checksum and a ``file://`` URI. It is
not patient data: it is subject ``sub-0012`` (T2w) of MedAnomaly's seeded synthetic ``tiny``
cohort (its tumour test subject), resampled to 2 mm with its own oblique axes and cropped to
the brain, so it is small (< 1 MB) and the same on every machine.

Regenerate it (and its ground-truth lesion used by the pytest end-to-end check) with::

    python -m MedAnomalyLib.sampledata            # from MedAnomalyExtension/, repository venv
    python -m MedAnomalyLib.sampledata --check    # compares a fresh copy with the committed one

then update ``SAMPLE_SHA256`` if the bytes changed. Importing this module is cheap (stdlib
only); generating needs the repository's ``medanomaly`` package (numpy, scipy, nilearn).
"""

from __future__ import annotations

import gzip
import hashlib
from pathlib import Path

MODULE_DIR = Path(__file__).resolve().parents[1]
SAMPLE_DIR = MODULE_DIR / "Resources" / "SampleData"
TESTING_DATA_DIR = MODULE_DIR / "Testing" / "Data"
ICONS_DIR = MODULE_DIR / "Resources" / "Icons"

SAMPLE_CATEGORY = "MedAnomaly"
SAMPLE_NAME = "MedAnomalyTumour"
SAMPLE_FILE = "MedAnomalyTumour2mm.nrrd"
SAMPLE_LESION_FILE = "MedAnomalyTumour2mm_lesion.nrrd"
SAMPLE_THUMBNAIL = "MedAnomalyTumour.png"
SAMPLE_SHA256 = "a743e572233902c14add4f4ce3ea0f2eb881a81fa02fed837822f44f57a796b4"

# Which synthetic subject, and how it is made small.
COHORT_PRESET, COHORT_SEED, SUBJECT_SPLIT, SUBJECT_FAMILY = "tiny", 0, "test_lesion", "tumour"
SPACING_MM = 2.0
MARGIN_VOXELS = 2
# The contrast of the shipped dae weights, so the module's self test finds the lesion.
SAMPLE_CONTRAST = "T2w"
DESCRIPTION = ("MedAnomaly sample: synthetic T2w skull-stripped brain with a tumour-like lesion "
               "(medanomaly synthetic cohort 'tiny', seed 0, subject sub-0012; not patient data)")


def sample_path() -> Path:
    return SAMPLE_DIR / SAMPLE_FILE


def lesion_path() -> Path:
    return TESTING_DATA_DIR / SAMPLE_LESION_FILE


def thumbnail_path() -> Path:
    return ICONS_DIR / SAMPLE_THUMBNAIL


def file_uri(path: str | Path) -> str:
    """``file://`` URI of a local file, as Slicer's Sample Data downloader reads it."""
    return Path(path).resolve().as_uri()


def sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def checksum() -> str:
    """The checksum string Slicer's SampleDataLogic expects (``<algorithm>:<digest>``)."""
    return f"SHA256:{SAMPLE_SHA256}"


# ---------------------------------------------------------------------------------------------
# NRRD without third-party writers: the bytes depend only on the array and the geometry.


def _vector(values) -> str:
    return "(" + ",".join(f"{float(v):.6f}".rstrip("0").rstrip(".") if float(v) != 0 else "0" for v in values) + ")"


def nrrd_bytes(array, ijk_to_ras, description: str = "") -> bytes:
    """A gzip-encoded NRRD (LPS space, little endian) of an ``(I, J, K)`` integer array whose
    voxel (i, j, k) lies at ``ijk_to_ras @ (i, j, k, 1)`` (RAS mm). gzip's time stamp is 0."""
    import numpy as np

    array = np.asarray(array)
    types = {np.dtype(np.int16): "int16", np.dtype(np.uint8): "uint8"}
    if array.ndim != 3 or array.dtype not in types:
        raise ValueError(f"Expected a 3D int16 or uint8 array, got {array.dtype} {array.shape}.")
    lps = np.diag([-1.0, -1.0, 1.0]) @ np.asarray(ijk_to_ras, dtype=float)[:3]
    header = ["NRRD0004"]
    if description:
        header.append(f"# {description}")
    header += [
        f"type: {types[array.dtype]}",
        "dimension: 3",
        "space: left-posterior-superior",
        "sizes: " + " ".join(str(s) for s in array.shape),
        "space directions: " + " ".join(_vector(lps[:, axis]) for axis in range(3)),
        "kinds: domain domain domain",
        "endian: little",
        "encoding: gzip",
        "space origin: " + _vector(lps[:, 3]),
    ]
    data = np.asarray(array, dtype=array.dtype.newbyteorder("<")).ravel(order="F").tobytes()
    return ("\n".join(header) + "\n\n").encode("ascii") + gzip.compress(data, compresslevel=9, mtime=0)


def read_nrrd(path: str | Path):
    """(array (I, J, K), 4x4 IJK-to-RAS matrix) of a file written by `nrrd_bytes`."""
    import numpy as np

    raw = Path(path).read_bytes()
    head, _, body = raw.partition(b"\n\n")
    fields = dict(line.split(": ", 1) for line in head.decode("ascii").splitlines()[1:] if not line.startswith("#"))
    if fields.get("encoding") != "gzip" or fields.get("space") != "left-posterior-superior":
        raise ValueError(f"{path}: not a file written by nrrd_bytes.")
    shape = tuple(int(s) for s in fields["sizes"].split())
    dtype = np.dtype({"int16": "<i2", "uint8": "u1"}[fields["type"]])
    array = np.frombuffer(gzip.decompress(body), dtype=dtype).reshape(shape, order="F")

    def vec(text):
        return [float(v) for v in text.strip("()").split(",")]

    matrix = np.eye(4)
    matrix[:3, :3] = np.array([vec(t) for t in fields["space directions"].split()]).T
    matrix[:3, 3] = vec(fields["space origin"])
    return array, np.diag([-1.0, -1.0, 1.0, 1.0]) @ matrix


# ---------------------------------------------------------------------------------------------
# generation (needs the repository's medanomaly package)


def _tumour_plan() -> dict:
    from medanomaly.data.synth import plan_cohort

    plans = [p for p in plan_cohort(COHORT_PRESET, seed=COHORT_SEED)
             if p["split"] == SUBJECT_SPLIT and p["family"] == SUBJECT_FAMILY]
    if not plans:
        raise RuntimeError(f"The '{COHORT_PRESET}' cohort has no {SUBJECT_FAMILY} subject in {SUBJECT_SPLIT}.")
    return plans[0]


def make_sample(spacing_mm: float = SPACING_MM, margin: int = MARGIN_VOXELS) -> dict:
    """The sample volume, its brain mask and lesion as arrays on the 2 mm grid, with the grid.

    Returns ``{"image": int16, "brain": uint8, "lesion": uint8, "ijk_to_ras": 4x4, "plan": dict}``.
    The new grid keeps the subject's own (oblique) axis directions; voxel centres are sampled
    with linear interpolation (image) and nearest neighbour (masks) and the image is zero
    outside the brain, like every skull-stripped subject of the cohort.
    """
    import numpy as np
    from scipy import ndimage

    from medanomaly.data.synth import synthesize_subject

    plan = _tumour_plan()
    subject = synthesize_subject(plan["seed"], plan["family"], plan["size_u"], contrasts=[SAMPLE_CONTRAST])
    affine = np.asarray(subject.affine, dtype=float)
    old_spacing = np.sqrt((affine[:3, :3] ** 2).sum(axis=0))
    directions = affine[:3, :3] / old_spacing
    scale = spacing_mm / old_spacing  # old voxel index per new voxel index, per axis

    brain_index = np.argwhere(subject.brain_mask > 0)
    low = np.floor(brain_index.min(axis=0) / scale).astype(int) - margin
    high = np.ceil(brain_index.max(axis=0) / scale).astype(int) + margin
    shape = tuple(int(s) for s in high - low + 1)
    grid = np.stack(np.meshgrid(*[np.arange(n, dtype=np.float64) for n in shape], indexing="ij"))
    old_index = (grid + low[:, None, None, None]) * scale[:, None, None, None]

    image = ndimage.map_coordinates(subject.images[SAMPLE_CONTRAST], old_index, order=1, mode="constant", cval=0.0)
    brain = ndimage.map_coordinates(subject.brain_mask, old_index, order=0, mode="constant", cval=0)
    lesion = ndimage.map_coordinates(subject.lesion, old_index, order=0, mode="constant", cval=0)
    image = np.where(brain > 0, np.rint(image), 0).clip(0, np.iinfo(np.int16).max).astype(np.int16)

    ijk_to_ras = np.eye(4)
    ijk_to_ras[:3, :3] = directions * spacing_mm
    ijk_to_ras[:3, 3] = affine[:3, 3] + directions @ (low * spacing_mm)
    return {"image": image, "brain": (brain > 0).astype(np.uint8), "lesion": (lesion > 0).astype(np.uint8),
            "ijk_to_ras": ijk_to_ras, "plan": plan}


def write_thumbnail(image, lesion, path: str | Path, size: tuple[int, int] = (260, 280)) -> Path:
    """Sample Data thumbnail: the axial slice through the lesion centre, grey, centred on black."""
    import numpy as np
    from PIL import Image

    k = int(np.round(np.argwhere(lesion > 0)[:, 2].mean())) if lesion.any() else image.shape[2] // 2
    plane = image[:, :, k].astype(np.float32)
    high = np.percentile(plane[plane > 0], 99.5) if (plane > 0).any() else 1.0
    grey = (np.clip(plane / high, 0, 1) * 255).astype(np.uint8)
    picture = Image.fromarray(np.flipud(grey.T))  # anterior at the top, patient right on the left
    factor = min(size[0] / picture.width, size[1] / picture.height)
    picture = picture.resize((round(picture.width * factor), round(picture.height * factor)), Image.Resampling.LANCZOS)
    canvas = Image.new("RGB", size, (0, 0, 0))
    canvas.paste(picture.convert("RGB"), ((size[0] - picture.width) // 2, (size[1] - picture.height) // 2))
    path = Path(path)
    canvas.save(path, optimize=True)
    return path


def write_icon(image, lesion, path: str | Path, size: int = 128) -> Path:
    """Module and extension icon: the thumbnail's slice with a heat overlay on the (smoothed)
    lesion, standing for an anomaly heatmap; square, transparent outside the brain."""
    import numpy as np
    from matplotlib import colormaps
    from PIL import Image
    from scipy import ndimage

    k = int(np.round(np.argwhere(lesion > 0)[:, 2].mean())) if lesion.any() else image.shape[2] // 2
    plane = image[:, :, k].astype(np.float32)
    brain = plane > 0
    grey = np.clip(plane / np.percentile(plane[brain], 99.5), 0, 1) if brain.any() else plane
    heat = ndimage.gaussian_filter(lesion[:, :, k].astype(np.float32), 2.0)
    heat = heat / heat.max() if heat.max() > 0 else heat
    rgba = np.zeros(plane.shape + (4,), dtype=np.float32)
    rgba[..., :3] = grey[..., None]
    colours = colormaps["inferno"](heat)[..., :3]
    alpha = np.clip(heat * 1.6, 0, 0.85)[..., None]
    rgba[..., :3] = rgba[..., :3] * (1 - alpha) + colours * alpha
    rgba[..., 3] = ndimage.binary_dilation(brain, iterations=1)
    picture = Image.fromarray((np.flipud(np.transpose(rgba, (1, 0, 2))) * 255).astype(np.uint8), "RGBA")
    factor = (size - 4) / max(picture.width, picture.height)
    picture = picture.resize((round(picture.width * factor), round(picture.height * factor)), Image.Resampling.LANCZOS)
    canvas = Image.new("RGBA", (size, size), (0, 0, 0, 0))
    canvas.paste(picture, ((size - picture.width) // 2, (size - picture.height) // 2))
    path = Path(path)
    canvas.save(path, optimize=True)
    return path


def write_sample(sample_dir: str | Path = SAMPLE_DIR, testing_dir: str | Path = TESTING_DATA_DIR,
                 thumbnail: str | Path | None = None, icons: tuple[str | Path, ...] = ()) -> dict[str, Path]:
    """Writes the sample volume and the lesion mask for the tests; optionally the Sample Data
    thumbnail and the module / extension icons."""
    sample = make_sample()
    paths = {"image": Path(sample_dir) / SAMPLE_FILE, "lesion": Path(testing_dir) / SAMPLE_LESION_FILE}
    for path in paths.values():
        path.parent.mkdir(parents=True, exist_ok=True)
    paths["image"].write_bytes(nrrd_bytes(sample["image"], sample["ijk_to_ras"], DESCRIPTION))
    lesion_description = "ground-truth lesion of " + SAMPLE_FILE
    paths["lesion"].write_bytes(nrrd_bytes(sample["lesion"], sample["ijk_to_ras"], lesion_description))
    if thumbnail is not None:
        paths["thumbnail"] = write_thumbnail(sample["image"], sample["lesion"], thumbnail)
    for index, icon in enumerate(icons):
        paths[f"icon{index}"] = write_icon(sample["image"], sample["lesion"], icon)
    return paths


def main(argv=None) -> int:
    import argparse
    import tempfile

    import numpy as np

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="regenerate into a temporary folder and compare")
    parser.add_argument("--pictures", action="store_true",
                        help="also rewrite the Sample Data thumbnail and the module icon (also the extension icon)")
    args = parser.parse_args(argv)
    if args.check:
        with tempfile.TemporaryDirectory() as tmp:
            fresh = write_sample(tmp, tmp)
            same = all(np.array_equal(read_nrrd(fresh[k])[0], read_nrrd(p)[0])
                       and np.allclose(read_nrrd(fresh[k])[1], read_nrrd(p)[1], atol=1e-5)
                       for k, p in (("image", sample_path()), ("lesion", lesion_path())))
            print("identical voxels and geometry" if same else "DIFFERENT: regenerate and update SAMPLE_SHA256")
            print(f"committed sha256 {sha256(sample_path())}, fresh {sha256(fresh['image'])}")
            return 0 if same else 1
    pictures = {"thumbnail": thumbnail_path(), "icons": (ICONS_DIR / "MedAnomaly.png",)} \
        if args.pictures else {}
    paths = write_sample(**pictures)
    for key, path in paths.items():
        print(f"{key}: {path} ({path.stat().st_size} bytes, sha256 {sha256(path)})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
