"""`medanomaly demo`: the shipped demo weights on a synthetic scan, end to end, in minutes."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from medanomaly import io
from medanomaly.bundles import find_bundle
from medanomaly.bundles.model_info import weights_contrasts
from medanomaly.bundles.outputs import SUMMARY_FILE
from medanomaly.data import DEFAULT_CONTRAST, axial_axis, check_contrast, ensure_cohort, load_datalist
from medanomaly.metrics import ScoreHistogram
from medanomaly.visualize import save_detection_panels


def pick_demo_subject(datalist: Path) -> dict:
    """The tumour-like test subject with the largest lesion: easy to see in a picture."""
    items = load_datalist(datalist, "test_lesion")
    tumours = [item for item in items if item.get("family") == "tumour"] or items
    return max(tumours, key=lambda item: item.get("lesion_voxels", 0))


def volume_metrics(heatmap: np.ndarray, label: np.ndarray, brain: np.ndarray, threshold: float | None) -> dict:
    histogram = ScoreHistogram(value_range=(0.0, max(1.0, float(heatmap.max())))).update(heatmap, label, brain)
    best = histogram.max_dice()
    metrics = {"pixel_ap": histogram.average_precision(), "pixel_auroc": histogram.auroc(),
               "max_dice": best.dice, "max_dice_threshold": best.threshold,
               "lesion_fraction": histogram.n_pos / max(histogram.n_pos + histogram.n_neg, 1)}
    if threshold is not None:
        metrics.update({f"{k}_at_threshold": v for k, v in histogram.dice_at(threshold).items()
                        if k in ("dice", "precision", "recall")})
    return metrics


def run_demo(bundle: str = "dae", output_dir: Path = Path("outputs/demo"), device: str | None = None,
             cohort: str = "demo", contrast: str | None = None) -> dict:
    """Runs `bundle` on one scan of the synthetic `cohort` and on its test split, in `contrast`
    (default: the contrast the shipped weights were trained on, else T1w)."""
    from medanomaly.console import CommandError, format_metrics, run_workflow

    bundle_info = find_bundle(bundle)
    if not bundle_info.has_weights:
        raise CommandError(f"Bundle '{bundle}' has no weights in {bundle_info.model_dir}: train it first.")
    contrast = check_contrast(contrast or next(iter(weights_contrasts(bundle_info.model_dir)), DEFAULT_CONTRAST))
    output_dir = Path(output_dir).resolve()
    datalist = ensure_cohort(cohort, contrast=contrast)
    subject = pick_demo_subject(datalist)
    print(f"Demo subject {subject['subject']} ({subject.get('family')}, {contrast}, "
          f"{subject.get('lesion_ml', 0):.1f} ml lesion): {subject['image']}")

    detection_dir = output_dir / "detection"
    run_workflow(bundle, "inference", {"input": subject["image"], "mask": subject["mask"], "contrast": contrast,
                                       "output_dir": str(detection_dir), "device": device}, demo=None, quiet=True)
    record = json.loads((detection_dir / SUMMARY_FILE).read_text())[0]
    image = io.read_volume(subject["image"])
    arrays = {key: io.volume_array(io.read_volume(path, allow_constant=True)) for key, path in
              (("heatmap", record["heatmap"]), ("pseudo_healthy", record["pseudo_healthy"]),
               ("label", subject["label"]), ("brain", subject["mask"]))}
    segmentation, _ = io.read_segmentation(record["segmentation"])
    metrics = volume_metrics(arrays["heatmap"], arrays["label"] > 0, arrays["brain"] > 0, record["threshold"])
    picture = save_detection_panels(
        output_dir / "demo_overlay.png", io.volume_array(image), arrays["heatmap"],
        axis=axial_axis(io.image_to_metatensor(image).affine), pseudo_healthy=arrays["pseudo_healthy"],
        label=arrays["label"], segmentation=segmentation, title=f"{bundle}: {subject['subject']}")
    print(f"\n{subject['subject']}: pixel AP {metrics['pixel_ap']:.3f} (chance {metrics['lesion_fraction']:.3f}), "
          f"[Dice] {metrics['max_dice']:.3f}, Dice at the calibrated threshold "
          f"{metrics.get('dice_at_threshold', float('nan')):.3f}")
    print(f"Outputs: {detection_dir}\nPicture: {picture}")

    evaluation_dir = output_dir / "evaluation"
    run_workflow(bundle, "evaluate", {"datalist": str(datalist), "contrast": contrast, "device": device,
                                      "output_dir": str(evaluation_dir), "n_bootstrap": 200}, demo=None, quiet=True)
    cohort_metrics = json.loads((evaluation_dir / "metrics.json").read_text())
    print(f"\nThe '{cohort}' cohort's test split:\n" + format_metrics(bundle, cohort_metrics))
    print(f"Metrics and plots: {evaluation_dir}")
    summary = {"subject": subject["subject"], "contrast": contrast, "volume": metrics, "cohort": cohort_metrics}
    (output_dir / "demo_summary.json").write_text(json.dumps(summary, indent=2, default=float))
    return summary
