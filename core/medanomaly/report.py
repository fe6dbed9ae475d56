"""The benchmark's report: one HTML page (opens from disk, no network) with, per contrast, the
results table (floor and ceiling labelled, gap closed between them), the breakdown by lesion
family and size, ROC / PR / Dice-vs-threshold curves per method and of all methods together,
and montages of a few subjects (input, pseudo-healthy image, heatmap, ground truth) per method,
each with an interactive NiiVue page of the whole volume (`viewer_<contrast>_<subject>.html`,
volumes inlined); every figure is also a PNG in `figures/<contrast>/`. A section that cannot be
drawn says why.

`update_readme` renders the results as a markdown table, with the papers' own numbers
(`paper_results.json`) in separate columns, between two markers of the README.
"""

from __future__ import annotations

import html
import json
from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from medanomaly.bundles.outputs import SUMMARY_FILE, subject_name
from medanomaly.console import CommandError
from medanomaly.metrics import CohortEvaluator, plot_curves
from medanomaly.results import ROLES, contrast_view, display_order, method_label
from medanomaly.visualize import _display, lesion_slice

REPORT_FILE = "report.html"
PAPER_RESULTS = Path(__file__).with_name("paper_results.json")
README_START, README_END = "<!-- benchmark-results:start -->", "<!-- benchmark-results:end -->"
CURVES = (("roc", "ROC (voxels)"), ("pr", "precision-recall (voxels)"), ("dice", "Dice vs threshold"))
SYNTHETIC_VS_REAL = (
    "Synthetic and published figures are not comparable: the cohort is built from one template with "
    "drawn-in lesions, simulated contrasts and 1.5 mm slices, scored here in 3D on the scans' own grids with "
    "demo weights (short schedules, thin networks), while the papers train at full scale on real "
    "healthy cohorts and test on real BraTS / ATLAS scans (2D slice protocols). The "
    "benchmark exists to compare methods with each other on identical data and metrics."
)
REFERENCES = (
    f"The {ROLES['floor']} is a documented rule without learning; the {ROLES['ceiling']} is a segmentation "
    "network trained with lesion labels on other subjects: an upper reference on this synthetic data, not an "
    "anomaly detector, never ranked with the methods. Gap closed = (metric - floor) / (ceiling - floor) within a "
    "contrast: 0 is the floor, 1 the ceiling; n/a without a finished floor and ceiling run of that contrast, or when "
    "the ceiling does not beat the floor."
)


# ---------------------------------------------------------------------- numbers
def _number(value, digits: int = 3) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def _with_ci(value, low, high) -> str:
    if value is None:
        return "n/a"
    return _number(value) + ("" if low is None else f" [{_number(low)}, {_number(high)}]")


def _seconds(value) -> str:
    if value is None:
        return "n/a"
    return f"{value / 60:.0f} min" if value >= 600 else f"{value:.1f} s" if value < 100 else f"{value:.0f} s"


def _with_its_ci(key: str):
    """Cell of a metric with its bootstrap interval (`<key>_ci_low`, `<key>_ci_high`) in brackets."""
    return lambda r: _with_ci(r[key], r.get(f"{key}_ci_low"), r.get(f"{key}_ci_high"))


def _gap_closed(key: str):
    return lambda r: _number(r.get(f"{key}_gap_closed"), 2)


# Headline table: (header, function of a results row)
TABLE = (
    ("method", method_label),
    ("status", lambda r: r["status"] + (f" ({r['variant']} weights)" if r.get("variant") else "")),
    ("volume AUROC", _with_its_ci("volume_auroc")),
    ("volume AP", lambda r: _number(r["volume_ap"])),
    ("slice AUROC", lambda r: _number(r["slice_auroc"])),
    ("slice AP", lambda r: _number(r["slice_ap"])),
    ("pixel AP", _with_its_ci("pixel_ap")),
    ("pooled [Dice]", _with_its_ci("pooled_dice")),
    ("gap closed: pixel AP", _gap_closed("pixel_ap")),
    ("gap closed: [Dice]", _gap_closed("pooled_dice")),
    ("per-volume [Dice]", _with_its_ci("dice_per_volume")),
    ("Dice at calibrated threshold", lambda r: _number(r["dice_at_threshold"])),
    ("healthy FPR at threshold", lambda r: _number(r["healthy_fpr"], 4)),
    ("train", lambda r: _seconds(r["train_seconds"])),
    ("s / volume", lambda r: _number(r["seconds_per_volume"], 1)),
    ("peak memory (MB)", lambda r: _number(r["peak_rss_mb"], 0) + (
        f" (GPU {_number(r['cuda_max_allocated_mb'], 0)})" if r.get("cuda_max_allocated_mb") else "")),
)


# ---------------------------------------------------------------------- figures
def _evaluators(results: dict) -> dict[str, CohortEvaluator]:
    """Every successful bundle's per-volume histograms, read back from its evaluation."""
    out = {}
    for entry in results["bundles"]:
        path = Path(entry.get("run_dir") or "") / "histograms.npz"
        if entry["row"]["status"] == "ok" and path.is_file():
            out[entry["row"]["bundle"]] = CohortEvaluator.load(path)
    return out


def _group_figure(results: dict, path: Path) -> Path | None:
    """Mean per-volume [Dice] per lesion family and per size group, one bar per method."""
    groups = [(kind, g) for kind in ("family", "size") for g in dict.fromkeys(
        row["group"] for e in results["bundles"] for row in e.get("groups", []) if row["kind"] == kind)]
    methods = [e for e in results["bundles"] if e.get("groups")]
    if not groups or not methods:
        return None
    figure = Figure(figsize=(max(6.0, 1.3 * len(groups) + 2), 3.8))
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    width = 0.8 / len(methods)
    for i, entry in enumerate(methods):
        values = {(g["kind"], g["group"]): g["max_dice_per_volume"] for g in entry["groups"]}
        heights = [values.get(key) or 0.0 for key in groups]
        axes.bar(np.arange(len(groups)) + (i - (len(methods) - 1) / 2) * width, heights, width,
                 label=entry["row"]["bundle"])
    axes.set_xticks(np.arange(len(groups)), [g for _, g in groups], fontsize=8)
    axes.set_ylabel("per-volume [Dice] (mean)")
    axes.set_title("[Dice] by lesion family and size")
    axes.legend(fontsize="small")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    return path


def subjects_of(datalist: Path) -> dict[str, dict]:
    """The datalist's test entries by subject name (`outputs.subject_name`: the entry's `subject`,
    else its image file's name, as the per-volume records and detections are named)."""
    from medanomaly.data import load_datalist

    items = {}
    for key in ("test_lesion", "test_healthy"):
        try:
            entries = load_datalist(datalist, key)
        except (KeyError, ValueError, FileNotFoundError):
            continue
        items.update({subject_name(i.get("subject"), i["image"]): i for i in entries})
    return items


def pick_subjects(results: dict, datalist: Path) -> list[dict]:
    """Montage subjects: the largest lesion of each family, and one healthy volume; each with
    its `subject` name as the per-volume records give it."""
    items = subjects_of(datalist)
    records = next((e["per_volume"] for e in results["bundles"] if e.get("per_volume")), [])
    chosen: dict[str, dict] = {}
    for record in sorted(records, key=lambda r: -(r.get("lesion_ml") or 0.0)):
        family = record.get("family") or ("lesion" if record.get("n_lesion_voxels") else "healthy")
        if family not in chosen and record["subject"] in items:
            chosen[family] = {**items[record["subject"]], "subject": record["subject"], "family": family}
    healthy = chosen.pop("healthy", None)
    return list(chosen.values()) + ([healthy] if healthy else [])


def _no_subjects_reason(results: dict, datalist: Path) -> str:
    records = next((e["per_volume"] for e in results["bundles"] if e.get("per_volume")), [])
    if not records:
        return "no method wrote per-volume records (per_volume.json)"
    names = sorted(subjects_of(datalist))
    return (f"none of the {len(records)} per-volume records (e.g. '{records[0]['subject']}') names a test entry of "
            f"{datalist} ({len(names)} entries{f', e.g. {names[0]!r}' if names else ''}); subjects are named by "
            "their datalist `subject` key, else by their image file's name")


def _detections(run_dir: str) -> dict[str, dict]:
    path = Path(run_dir) / SUMMARY_FILE
    return {r["subject"]: r for r in json.loads(path.read_text())} if path.is_file() else {}


def save_subject_montage(subject: dict, runs: dict[str, str], path: Path) -> Path | None:
    """One row per method: input | pseudo-healthy | heatmap over the input | ground truth
    (red) and the method's segmentation at its calibrated threshold (yellow)."""
    from medanomaly import io
    from medanomaly.data import axial_axis

    rows = [(name, _detections(run_dir).get(str(subject.get("subject")))) for name, run_dir in runs.items()]
    rows = [(name, record) for name, record in rows if record]
    if not rows:
        return None
    image_file = io.read_volume(subject["image"])
    image = io.volume_array(image_file)
    axis = axial_axis(io.image_to_metatensor(image_file).affine)
    label = io.volume_array(io.read_volume(subject["label"], allow_constant=True)) > 0 if subject.get("label") else None
    index = lesion_slice(label if label is not None else np.zeros(image.shape), axis)
    vmax = float(np.percentile(image[image > 0], 99.5)) if np.any(image > 0) else 1.0
    figure = Figure(figsize=(12.0, 3.0 * len(rows) + 0.4), dpi=90)
    FigureCanvasAgg(figure)
    for r, (name, record) in enumerate(rows):
        heatmap = io.volume_array(io.read_volume(record["heatmap"], allow_constant=True))
        pseudo = (io.volume_array(io.read_volume(record["pseudo_healthy"], allow_constant=True))
                  if record.get("pseudo_healthy") else None)
        threshold = record.get("threshold")
        brain = heatmap[image > 0]
        hmax = max(float(np.percentile(brain, 99.9)) if brain.size else 1.0, threshold or 0.0, 1e-6)
        panels = (("input", image, None), ("pseudo-healthy", pseudo, None), ("heatmap", image, heatmap),
                  ("truth (red) / segmentation (yellow)", image, None))
        for c, (title, background, overlay) in enumerate(panels):
            ax = figure.add_subplot(len(rows), 4, 4 * r + c + 1)
            ax.axis("off")
            if background is None:
                ax.set_title(f"{title}: none", fontsize=8)
                continue
            ax.imshow(_display(background, axis, index), cmap="gray", vmin=0, vmax=vmax)
            if overlay is not None:
                # scores below half the calibrated threshold are left out, so the anatomy shows
                floor = 0.5 * threshold if threshold is not None else 0.0
                heat = ax.imshow(np.ma.masked_less_equal(_display(overlay, axis, index), floor), cmap="hot",
                                 vmin=floor, vmax=hmax, alpha=0.8)
                figure.colorbar(heat, ax=ax, fraction=0.046, pad=0.02)
            if c == 3:
                outlines = [(label, "red")]
                if threshold is not None:
                    outlines.append((heatmap > threshold, "yellow"))
                for mask, colour in outlines:
                    if mask is not None and np.any(_display(mask, axis, index)):
                        ax.contour(_display(mask, axis, index), levels=[0.5], colors=colour, linewidths=1.0)
            ax.set_title(f"{name}: {title}" if c == 0 else title, fontsize=8)
    lesion = f"{subject.get('lesion_ml', 0) or 0:.1f} ml " if subject.get("label") and label.any() else ""
    figure.suptitle(f"{subject.get('subject')} ({lesion}{subject.get('family')}), axial slice {index}", fontsize=10)
    figure.tight_layout()
    figure.savefig(path)
    return path


def write_figures(results: dict, output_dir: Path) -> dict:
    """All PNGs of one contrast's report (`results`: a `results.contrast_view`) under
    `output_dir/figures/<contrast>`, and its viewer pages; returns their paths by role, with
    `notes`: per section, why something could not be drawn."""
    contrast = results["contrast"]
    figures = output_dir / "figures" / contrast
    figures.mkdir(parents=True, exist_ok=True)
    evaluators = _evaluators(results)
    out: dict = {"methods": {}, "subjects": [], "notes": {"curves": [], "groups": [], "subjects": []}}
    runs = {e["row"]["bundle"]: e["run_dir"] for e in results["bundles"] if e["row"]["status"] == "ok"}
    if evaluators:
        out["compare"] = plot_curves({name: ev.pooled_histogram() for name, ev in evaluators.items()}, figures,
                                     title=f"all methods, {contrast}", prefix="compare_", relative_thresholds=True)
    else:
        out["notes"]["curves"].append("no curves: " + ("no method finished" if not runs else
                                                       "no finished method left its histograms.npz"))
    for name, evaluator in evaluators.items():
        out["methods"][name] = plot_curves(evaluator, figures, title=f"{name}, {contrast}", prefix=f"{name}_")
    out["groups"] = _group_figure(results, figures / "groups.png")
    if out["groups"] is None:
        out["notes"]["groups"].append("no breakdown: no finished method has lesion volumes with a family or size group")
    subjects = pick_subjects(results, Path(results["datalist"])) if runs else []
    if not subjects:
        out["notes"]["subjects"].append("no subject montages or viewers: " + (
            "no method finished" if not runs else _no_subjects_reason(results, Path(results["datalist"]))))
    for subject in subjects:
        name = subject["subject"]
        montage = save_subject_montage(subject, runs, figures / f"montage_{name}.png")
        if montage is None:
            out["notes"]["subjects"].append(f"no montage of {name}: no finished method's detections.json names it")
            continue
        viewer = save_subject_viewer(subject, runs, output_dir / f"viewer_{contrast}_{name}.html")
        out["subjects"].append({"name": name, "montage": montage, "viewer": viewer,
                                "viewer_note": None if viewer else _viewer_unavailable(subject, runs)})
    return out


# ---------------------------------------------------------------------- interactive viewer
NIIVUE_JS = "niivue.umd.js"


def _niivue_source() -> Path | None:
    """NiiVue's JavaScript as nilearn ships it (no network: the page loads it from beside itself)."""
    try:
        import nilearn
    except ImportError:
        return None
    path = Path(nilearn.__file__).parent / "_assets" / "js" / NIIVUE_JS
    return path if path.is_file() else None


def _nifti_data_url(image) -> str:
    import base64
    import gzip

    return "data:application/octet-stream;base64," + base64.b64encode(gzip.compress(image.to_bytes(), 6)).decode()


def _nifti(path) -> bool:
    return str(path).endswith((".nii", ".nii.gz"))


def _viewer_unavailable(subject: dict, runs: dict[str, str]) -> str | None:
    """Why no interactive viewer of `subject` can be written, or None when one can."""
    if _niivue_source() is None:
        return "NiiVue's JavaScript was not found (it ships with nilearn)"
    if not _nifti(subject["image"]):
        return f"the viewer reads NIfTI volumes and the input is {Path(subject['image']).name}"
    if not any(_nifti(r["heatmap"]) for r in (_detections(d).get(str(subject.get("subject"))) for d in runs.values())
               if r):
        return "no method wrote a NIfTI heatmap of it"
    return None


def save_subject_viewer(subject: dict, runs: dict[str, str], path: Path) -> Path | None:
    """An interactive NiiVue page of one subject: the input with each method's heatmap (8-bit,
    from half the calibrated threshold up) and the ground truth as switchable layers. The
    volumes are inlined, so the page opens from disk; None when NiiVue or NIfTI files are missing."""
    import nibabel as nib

    if _viewer_unavailable(subject, runs):
        return None
    source = _niivue_source()
    image = nib.load(subject["image"])
    layers = [{"name": "input.nii.gz", "url": _nifti_data_url(image), "colormap": "gray", "opacity": 1.0}]
    if subject.get("label") and _nifti(subject["label"]):
        label = nib.load(subject["label"])
        truth = nib.Nifti1Image((np.asanyarray(label.dataobj) > 0).astype(np.uint8), label.affine)
        layers.append({"name": "truth.nii.gz", "url": _nifti_data_url(truth), "colormap": "red", "opacity": 0.0,
                       "cal_min": 0.5, "cal_max": 1.0, "method": "ground truth"})
    for name, run_dir in runs.items():
        record = _detections(run_dir).get(str(subject.get("subject")))
        if not record or not _nifti(record["heatmap"]):
            continue
        heat = nib.load(record["heatmap"])
        values = np.asarray(heat.dataobj, dtype=np.float32)
        threshold = record.get("threshold") or 0.0
        top = max(float(np.percentile(values[values > 0], 99.9)) if np.any(values > 0) else 1.0, threshold, 1e-6)
        scaled = np.clip(values / top * 255.0, 0, 255).astype(np.uint8)
        layers.append({"name": f"{name}.nii.gz", "url": _nifti_data_url(nib.Nifti1Image(scaled, heat.affine)),
                       "colormap": "warm", "opacity": 0.0, "cal_min": max(1.0, 127.5 * threshold / top),
                       "cal_max": 255.0, "method": name})
    methods = [layer for layer in layers if layer.get("method") and layer["method"] != "ground truth"]
    if methods:
        methods[0]["opacity"] = 0.7
    buttons = "".join(f"<button onclick='show({i})'>{html.escape(layer['method'])}</button>"
                      for i, layer in enumerate(layers) if layer.get("method"))
    volumes = json.dumps([{k: v for k, v in layer.items() if k != "method"} for layer in layers])
    title = html.escape(str(subject.get("subject")))
    page = f"""<!DOCTYPE html><html><head><meta charset='utf-8'><title>{title}</title>
<script src='{NIIVUE_JS}'></script><style>body {{ background: #111; color: #eee; font-family: sans-serif; }}
#view {{ width: 100%; height: 85vh; }} canvas {{ width: 100%; height: 100%; }} button {{ margin: 4px; }}
</style></head><body>
<div>{html.escape(str(subject.get('subject')))} ({html.escape(str(subject.get('family')))}): {buttons}
<span id='status'>loading</span></div><div id='view'><canvas id='gl'></canvas></div>
<script>
const nv = new niivue.Niivue({{backColor: [0, 0, 0, 1], show3Dcrosshair: true}});
function show(index) {{
  for (let i = 1; i < nv.volumes.length; i++) nv.setOpacity(i, i === index ? 0.7 : 0.0);
}}
(async () => {{
  try {{
    await nv.attachTo('gl');
    await nv.loadVolumes({volumes});
    nv.setSliceType(nv.sliceTypeMultiplanar);
    document.getElementById('status').textContent = 'drag to move, scroll to change slice';
  }} catch (error) {{ document.getElementById('status').textContent = 'could not load: ' + error; }}
}})();
</script></body></html>"""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(page, encoding="utf-8")
    if not (path.parent / NIIVUE_JS).is_file():
        (path.parent / NIIVUE_JS).write_bytes(source.read_bytes())
    return path


# ---------------------------------------------------------------------- HTML
_CSS = """
body { font-family: sans-serif; margin: 24px; color: #222; max-width: 1400px; }
table { border-collapse: collapse; margin: 8px 0 20px; font-size: 13px; }
th, td { border: 1px solid #ccc; padding: 4px 8px; text-align: right; }
th { background: #eef; } td:first-child, th:first-child { text-align: left; }
tr.failed td { background: #fee; }
tr.floor td, tr.ceiling td { background: #f4f4f4; font-style: italic; }
.missing { color: #a40; font-size: 13px; }
.figures img { width: 32%; margin: 0.5%; border: 1px solid #ddd; }
.montage img { max-width: 100%; margin: 8px 0; border: 1px solid #ddd; }
.figures img.wide { width: 60%; }
.note { color: #555; font-size: 13px; max-width: 1100px; }
"""


def _html_table(headers: list[str], rows: list[list[str]], classes: list[str] | None = None) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in headers)
    body = "".join(f"<tr class='{c}'>" + "".join(f"<td>{html.escape(v)}</td>" for v in row) + "</tr>"
                   for row, c in zip(rows, classes or [""] * len(rows)))
    return f"<table><tr>{head}</tr>{body}</table>"


def _group_tables(results: dict) -> str:
    parts = []
    for kind, title in (("family", "By lesion family"), ("size", "By lesion size")):
        groups = list(dict.fromkeys(g["group"] for e in results["bundles"] for g in e.get("groups", [])
                                    if g["kind"] == kind))
        if not groups:
            continue
        headers = ["method"] + [f"{g}: {m}" for g in groups for m in ("pixel AP", "[Dice]", "per-vol [Dice]")]
        rows = []
        for entry in results["bundles"]:
            values = {g["group"]: g for g in entry.get("groups", []) if g["kind"] == kind}
            if values:
                rows.append([method_label(entry["row"])] + [_number(values.get(g, {}).get(m)) for g in groups
                                                        for m in ("pixel_ap", "max_dice", "max_dice_per_volume")])
        counts = next((e["metrics"].get("families" if kind == "family" else "sizes") for e in results["bundles"]
                       if e.get("metrics")), {})
        n = ", ".join(f"{g}: {counts.get(g, {}).get('n_lesion_volumes', '?')}" for g in groups)
        parts.append(f"<h3>{title}</h3><p class='note'>Lesion volumes per group: {html.escape(n)}.</p>"
                     + _html_table(headers, rows))
    return "".join(parts)


def _missing(notes: list[str]) -> str:
    return "".join(f"<p class='missing'>Not drawn: {html.escape(n)}.</p>" for n in notes)


def _contrast_sections(results: dict, output_dir: Path) -> list[str]:
    """The report of one contrast (`results`: a `results.contrast_view`)."""
    figures = write_figures(results, output_dir)
    rows = display_order([entry["row"] for entry in results["bundles"]])
    contrast = html.escape(results["contrast"])

    def rel(path) -> str:
        return html.escape(Path(path).relative_to(output_dir).as_posix())

    errors = "".join(f"<li><b>{html.escape(r['bundle'])}</b> ({html.escape(r['status'])}): "
                     f"{html.escape(r['error'] or '')}</li>" for r in rows if r["status"] != "ok")
    sections = [
        f"<h2 id='{contrast}'>{contrast}</h2><p class='note'>Datalist {html.escape(str(results['datalist']))}.</p>",
        _html_table([h for h, _ in TABLE], [[f(r) for _, f in TABLE] for r in rows],
                    ["failed" if r["status"] != "ok" else r.get("role") or "" for r in rows]),
        f"<ul>{errors}</ul>" if errors else "",
        f"<h3>Breakdown ({contrast})</h3>" + _group_tables(results) + _missing(figures["notes"]["groups"])
        + (f"<div class='figures'><img class='wide' src='{rel(figures['groups'])}' alt='groups'></div>"
           if figures.get("groups") else ""),
        f"<h3>All methods ({contrast})</h3>" + _missing(figures["notes"]["curves"]),
    ]
    if figures.get("compare"):
        sections.append("<p class='note'>Pooled lesion-volume voxels; Dice against the threshold's position in "
                        "each method's score range.</p><div class='figures'>"
                        + "".join(f"<img src='{rel(figures['compare'][k])}' alt='{k}'>" for k, _ in CURVES)
                        + "</div>")
    for name, paths in figures["methods"].items():
        sections.append(f"<h3>{html.escape(name)} ({contrast})</h3><div class='figures'>"
                        + "".join(f"<img src='{rel(paths[k])}' alt='{name} {title}'>" for k, title in CURVES)
                        + "</div>")
    sections.append(f"<h3>Subjects ({contrast})</h3>" + _missing(figures["notes"]["subjects"]))
    if figures["subjects"]:
        sections.append("<p class='note'>Each subject's slice with the largest lesion; the interactive viewer "
                        "(NiiVue, runs from disk) shows the whole volume with each method's heatmap.</p>"
                        "<div class='montage'>" + "".join(
                            f"<img src='{rel(s['montage'])}' alt='{rel(s['montage'])}'>"
                            + (f"<p><a href='{rel(s['viewer'])}'>interactive viewer of {html.escape(s['name'])}</a></p>"
                               if s["viewer"] else _missing([f"viewer of {s['name']}: {s['viewer_note']}"]))
                            for s in figures["subjects"]) + "</div>")
    return sections


def write_report(results: dict, output_dir: Path) -> Path:
    """Writes `report.html` (a section per contrast) and its figures; returns the page's path."""
    output_dir = Path(output_dir)
    contrasts = list(results["contrasts"])
    rows = [entry["row"] for run in results["contrasts"].values() for entry in run["bundles"]]
    sections = [
        f"<h1>MedAnomaly benchmark</h1><p class='note'>{html.escape(results['date'])} &middot; cohort "
        f"<code>{html.escape(results['cohort'])}</code> &middot; contrasts "
        + ", ".join(f"<a href='#{html.escape(c)}'>{html.escape(c)}</a>" for c in contrasts)
        + f" &middot; <code>{html.escape(str(results.get('command')))}</code> &middot; total "
        f"{_seconds(results.get('wall_seconds'))} &middot; {html.escape(results.get('machine', ''))}</p>",
        f"<p class='note'>Brackets: {html.escape(results.get('ci_method', ''))}, "
        f"{results.get('n_bootstrap')} resamples. Pixel metrics pool the voxels of all lesion volumes inside the "
        "brain; [Dice] is the best Dice over all thresholds (pooled, or each volume at its own best); the "
        "calibrated threshold is the bundle's (healthy validation voxels, 1 % FPR), and the healthy FPR is the "
        "fraction of healthy test-volume brain voxels above it. Volume and slice AUROC / AP separate lesion "
        "from healthy volumes and lesion from lesion-free slices.</p>",
        f"<p class='note'>{html.escape(REFERENCES)}</p>" if any(r.get("role") for r in rows) else "",
    ]
    for contrast in contrasts:
        sections += _contrast_sections(contrast_view(results, contrast), output_dir)
    page = (f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>MedAnomaly benchmark</title>"
            f"<style>{_CSS}</style></head><body>{''.join(sections)}</body></html>")
    path = output_dir / REPORT_FILE
    path.write_text(page, encoding="utf-8")
    return path


# ---------------------------------------------------------------------- README
def paper_results(bundles) -> dict[str, list[dict]]:
    """Published numbers per bundle: the bundle's metadata `paper_results`, else the table file."""
    from medanomaly.bundles import find_bundle

    stored = json.loads(PAPER_RESULTS.read_text()) if PAPER_RESULTS.is_file() else {}
    table = {k: v for k, v in stored.items() if not k.startswith("_")}
    out = {}
    for name in bundles:
        try:
            own = find_bundle(name).metadata.get("paper_results")
        except Exception:
            own = None
        out[name] = own or table.get(name, [])
    return out


def _paper_cell(entries: list[dict], key: str) -> str:
    values = [f"{e[key]:.3f} ({e['dataset']})" for e in entries if e.get(key) is not None]
    return "; ".join(values) or "–"


MARKDOWN = (
    ("method", method_label),
    ("status", lambda r: (r["status"] + (f" ({r['variant']} weights)" if r.get("variant") else "")
                          + ("" if r["status"] == "ok" else f": {r['error']}")).replace("|", "/")),
    ("volume AUROC", _with_its_ci("volume_auroc")),
    ("pixel AP", _with_its_ci("pixel_ap")),
    ("pooled [Dice]", _with_its_ci("pooled_dice")),
    ("gap closed: pixel AP", _gap_closed("pixel_ap")),
    ("gap closed: [Dice]", _gap_closed("pooled_dice")),
    ("per-volume [Dice]", _with_its_ci("dice_per_volume")),
    ("Dice at threshold", lambda r: _number(r["dice_at_threshold"])),
    ("healthy FPR", lambda r: _number(r["healthy_fpr"], 4)),
    ("s / volume", lambda r: _number(r["seconds_per_volume"], 1)),
    ("train", lambda r: _seconds(r["train_seconds"])),
)
PAPER_COLUMNS = (("paper: volume AUROC", "volume_auroc"), ("paper: pixel AP", "pixel_ap"),
                 ("paper: [Dice]", "pooled_dice"))


def _markdown_rows(rows: list[dict]) -> list[str]:
    papers = paper_results([r["bundle"] for r in rows])
    headers = [h for h, _ in MARKDOWN] + [h for h, _ in PAPER_COLUMNS]
    lines = ["| " + " | ".join(headers) + " |", "|" + " --- |" * len(headers)]
    for r in display_order(rows):
        cells = [f(r) for _, f in MARKDOWN] + [_paper_cell(papers[r["bundle"]], k) for _, k in PAPER_COLUMNS]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def markdown_table(results: dict) -> str:
    """The README's results: a header, one table per contrast, the notes."""
    runs = results["contrasts"]
    rows = [entry["row"] for run in runs.values() for entry in run["bundles"]]
    counts = next((e["metrics"] for run in runs.values() for e in run["bundles"] if e.get("metrics")), {})
    cohort = (f"{counts.get('n_lesion_volumes', '?')} lesion + {counts.get('n_healthy_volumes', '?')} healthy test "
              f"volumes" if counts else "")
    devices = ", ".join(sorted({str(r["device"]) for r in rows if r.get("device")})) or "no"
    header = (f"Results on the `{results['cohort']}` cohort ({cohort}; {devices} device, {results.get('machine')}), "
              f"`{results.get('command')}`, {results['date']}, {_seconds(results.get('wall_seconds'))} in all. "
              f"Brackets: {results.get('ci_method')}. The full report (curves, breakdown by lesion family and "
              "size, subject montages): `outputs/benchmark/report.html`.")
    lines = [header]
    for contrast, run in runs.items():
        lines += ["", f"**{contrast}**", "", *_markdown_rows([entry["row"] for entry in run["bundles"]])]
    if any(r.get("role") for r in rows):
        lines += ["", REFERENCES]
    return "\n".join([*lines, "", SYNTHETIC_VS_REAL])


EVAL_METRICS = {"volume_auroc": "volume_auroc", "pixel_ap": "pixel_ap", "max_dice": "pooled_dice"}


def bundle_eval_metrics(results: dict) -> dict[str, dict]:
    """Each benchmarked bundle's metadata.json `eval_metrics`, from the same rows as the README table:
    volume AUROC, pixel AP and pooled [Dice] per contrast on the benchmark's cohort, with the command
    that made them. Variant rows (`bundle[key=value]`) and rows that did not finish are left out."""
    found: dict[str, dict] = {}
    for contrast, run in results["contrasts"].items():
        for entry in run["bundles"]:
            row = entry["row"]
            if "[" in row["bundle"] or row.get("status") != "ok":
                continue
            metrics = found.setdefault(row["bundle"], {
                f"{results['cohort']}_cohort": {}, "source": f"{results.get('command')} ({results['date']})"})
            metrics[f"{results['cohort']}_cohort"][contrast] = {
                key: None if row.get(column) is None else round(float(row[column]), 3)
                for key, column in EVAL_METRICS.items()}
    return found


def update_bundle_metadata(results: dict) -> list[Path]:
    """Writes `bundle_eval_metrics` into each bundle's configs/metadata.json; returns the files."""
    from medanomaly.bundles import find_bundle

    written = []
    for name, metrics in bundle_eval_metrics(results).items():
        path = find_bundle(name).configs_dir / "metadata.json"
        metadata = json.loads(path.read_text(encoding="utf-8"))
        if metadata.get("eval_metrics") != metrics:
            metadata["eval_metrics"] = metrics
            path.write_text(json.dumps(metadata, indent=4, ensure_ascii=False) + "\n", encoding="utf-8")
            written.append(path)
    return written


def update_readme(readme: Path, results: dict) -> Path:
    """Replaces the text between the README's benchmark markers with `markdown_table`."""
    text = readme.read_text(encoding="utf-8")
    if README_START not in text or README_END not in text:
        raise CommandError(f"{readme} has no '{README_START}' ... '{README_END}' markers.")
    before, rest = text.split(README_START, 1)
    _, after = rest.split(README_END, 1)
    readme.write_text(f"{before}{README_START}\n{markdown_table(results)}\n{README_END}{after}", encoding="utf-8")
    return readme
