"""A PNG montage of a cohort's lesion subjects, to check the synthetic data by eye."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from medanomaly.data.datalist import load_datalist
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


def save_montage(datalist_path, out_png, n: int = 6, key: str = "test_lesion") -> Path:
    """Saves a PNG of `n` subjects of split `key`: for each, an axial slice through the lesion
    (the slice where it is largest), plain on top and with the lesion outlined below; family
    and lesion size in the title. Healthy subjects show their middle brain slice."""
    import nibabel as nib
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    entries = _pick_round_robin(load_datalist(datalist_path, key), max(1, int(n)))
    if not entries:
        raise ValueError(f"Split '{key}' of {datalist_path} is empty: nothing to draw.")
    cols = len(entries)
    fig = Figure(figsize=(2.4 * cols, 5.6), facecolor="black")
    FigureCanvasAgg(fig)
    for col, entry in enumerate(entries):
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
        sl = data[:, :, z]
        xs, ys = np.flatnonzero(brain.any((1, 2))), np.flatnonzero(brain.any((0, 2)))
        x0, x1 = (max(xs[0] - 2, 0), min(xs[-1] + 3, data.shape[0])) if len(xs) else (0, data.shape[0])
        y0, y1 = (max(ys[0] - 2, 0), min(ys[-1] + 3, data.shape[1])) if len(ys) else (0, data.shape[1])
        vmax = float(np.percentile(data[brain], 99.5)) if brain.any() else 1.0
        family = entry.get("family", HEALTHY)
        colour = _FAMILY_COLOURS.get(family, "#ff00ff")
        ml = entry.get("lesion_ml")
        if ml is None and lesion is not None:
            ml = float(lesion.sum() * np.prod(zooms) / 1000.0)
        size = f"{ml:.2f} ml, {entry.get('lesion_voxels', int(lesion.sum()) if lesion is not None else 0)} vox"
        title = f"{entry.get('subject', Path(entry['image']).name.split('_')[0])}  {family}\n{size}"
        for row in range(2):
            ax = fig.add_subplot(2, cols, row * cols + col + 1)
            ax.imshow(sl[x0:x1, y0:y1].T, origin="lower", cmap="gray", vmin=0.0, vmax=vmax,
                      aspect=zooms[1] / zooms[0], interpolation="antialiased")  # fmt: skip
            if row == 1 and lesion is not None and lesion[:, :, z].any():
                ax.contour(lesion[x0:x1, y0:y1, z].T.astype(float), levels=[0.5], colors=[colour], linewidths=0.9)
            ax.set_axis_off()
            if row == 0:
                ax.set_title(title, color="white", fontsize=8)
    fig.suptitle(f"{Path(datalist_path).parent.name}: {key} (axial, RAS: patient right on the right)",
                 color="white", fontsize=9)  # fmt: skip
    fig.subplots_adjust(left=0.01, right=0.99, bottom=0.01, top=0.86, wspace=0.04, hspace=0.04)
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
