"""A PNG montage of a cohort's lesion subjects, to check the synthetic data by eye."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from medanomaly.data.contrast import CONTRASTS
from medanomaly.data.datalist import load_datalist, read_datalist
from medanomaly.data.synth_lesions import FAMILIES, HEALTHY

_FAMILY_COLOURS = {"tumour": "#ff3b30", "stroke": "#30b0ff", "wmh": "#ffcc00", HEALTHY: "#34c759"}


def _pick_round_robin(entries: list[dict], n: int) -> list[dict]:
    groups: dict[str, list[dict]] = {}
    for e in entries:
        groups.setdefault(e.get("family", HEALTHY), []).append(e)
    order = [f for f in (*FAMILIES, HEALTHY) if f in groups] + [f for f in groups if f not in (*FAMILIES, HEALTHY)]
    chosen: list[dict] = []
    while len(chosen) < n and any(groups[f] for f in order):
        for f in order:
            if groups[f] and len(chosen) < n:
                chosen.append(groups[f].pop(0))
    return chosen


def _contrast_datalists(datalist_path: Path) -> list[tuple[str, Path]]:
    """(contrast, datalist) of each per-contrast datalist beside `datalist_path`, or the file itself."""
    found = [(c, datalist_path.parent / f"datalist_{c}.json") for c in CONTRASTS]
    found = [(c, p) for c, p in found if p.is_file()]
    return found or [(read_datalist(datalist_path).get("contrast", ""), datalist_path)]


def _axial_view(entry: dict):
    """(slice, lesion slice or None, crop, aspect, vmax, z) of an entry, through its largest lesion section."""
    import nibabel as nib

    img = nib.as_closest_canonical(nib.load(entry["image"]))
    data = np.asarray(img.dataobj, dtype=np.float32)
    zooms = img.header.get_zooms()[:3]
    lesion = None
    if entry.get("label"):
        lesion = np.asarray(nib.as_closest_canonical(nib.load(entry["label"])).dataobj) > 0
    brain = data > 0
    if lesion is not None and lesion.any():
        z = int(np.argmax(lesion.sum((0, 1))))
    else:
        zs = np.flatnonzero(brain.any((0, 1)))
        z = int(zs[len(zs) * 3 // 5]) if len(zs) else data.shape[2] // 2
    xs, ys = np.flatnonzero(brain.any((1, 2))), np.flatnonzero(brain.any((0, 2)))
    x0, x1 = (max(xs[0] - 2, 0), min(xs[-1] + 3, data.shape[0])) if len(xs) else (0, data.shape[0])
    y0, y1 = (max(ys[0] - 2, 0), min(ys[-1] + 3, data.shape[1])) if len(ys) else (0, data.shape[1])
    vmax = float(np.percentile(data[brain], 99.5)) if brain.any() else 1.0
    crop = (slice(x0, x1), slice(y0, y1))
    lesion_slice = lesion[:, :, z][crop] if lesion is not None else None
    return data[:, :, z][crop], lesion_slice, zooms[1] / zooms[0], vmax, lesion


def save_montage(datalist_path, out_png, n: int = 6, key: str = "test_lesion") -> Path:
    """Saves a PNG of `n` subjects of split `key`: for each, an axial slice through the lesion
    (the slice where it is largest) in every contrast the cohort has (one row each, from the
    ``datalist_<C>.json`` files beside `datalist_path`), and a last row with the lesion outlined;
    family and lesion size in the title. Healthy subjects show a slice above the middle."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    datalist_path = Path(datalist_path)
    sources = _contrast_datalists(datalist_path)
    entries = _pick_round_robin(load_datalist(sources[0][1], key), max(1, int(n)))
    if not entries:
        raise ValueError(f"Split '{key}' of {datalist_path} is empty: nothing to draw.")
    by_subject = {c: {e.get("subject"): e for e in load_datalist(p, key)} for c, p in sources}
    cols, rows = len(entries), len(sources) + 1
    fig = Figure(figsize=(2.4 * cols, 2.5 * rows + 0.6), facecolor="black")
    FigureCanvasAgg(fig)
    for col, entry in enumerate(entries):
        family = entry.get("family", HEALTHY)
        colour = _FAMILY_COLOURS.get(family, "#ff00ff")
        for row, (contrast, _) in enumerate(sources):
            shown = by_subject[contrast].get(entry.get("subject"), entry)
            sl, lesion_sl, aspect, vmax, lesion = _axial_view(shown)
            ax = fig.add_subplot(rows, cols, row * cols + col + 1)
            ax.imshow(sl.T, origin="lower", cmap="gray", vmin=0.0, vmax=vmax, aspect=aspect,
                      interpolation="antialiased")  # fmt: skip
            ax.set_axis_off()
            if col == 0:
                ax.text(-0.02, 0.5, contrast, color="white", fontsize=9, rotation=90, ha="right", va="center",
                        transform=ax.transAxes)  # fmt: skip
            if row == 0:
                ml = entry.get("lesion_ml")
                voxels = entry.get("lesion_voxels", int(lesion.sum()) if lesion is not None else 0)
                size = f"{ml:.2f} ml, {voxels} vox" if ml is not None else f"{voxels} vox"
                title = f"{entry.get('subject', Path(entry['image']).name.split('_')[0])}  {family}\n{size}"
                ax.set_title(title, color="white", fontsize=8)
            if row == len(sources) - 1:  # the last contrast again, with the ground truth outlined
                ax = fig.add_subplot(rows, cols, (row + 1) * cols + col + 1)
                ax.imshow(sl.T, origin="lower", cmap="gray", vmin=0.0, vmax=vmax, aspect=aspect,
                          interpolation="antialiased")  # fmt: skip
                if lesion_sl is not None and lesion_sl.any():
                    ax.contour(lesion_sl.T.astype(float), levels=[0.5], colors=[colour], linewidths=0.9)
                ax.set_axis_off()
    fig.suptitle(f"{datalist_path.parent.name}: {key} (axial, RAS: patient right on the right; last row: "
                 "ground truth)", color="white", fontsize=9, y=1 - 0.12 / (2.5 * rows + 0.6))  # fmt: skip
    fig.subplots_adjust(left=0.03, right=0.99, bottom=0.01, top=1 - 0.95 / (2.5 * rows + 0.6), wspace=0.04,
                        hspace=0.04)  # fmt: skip
    out_png = Path(out_png)
    out_png.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_png.with_name(f".{out_png.stem}.{os.getpid()}.tmp.png")
    try:
        fig.savefig(tmp, dpi=110, facecolor="black")
        os.replace(tmp, out_png)
    finally:
        if tmp.exists():
            tmp.unlink()
    return out_png
