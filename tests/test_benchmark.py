"""`medanomaly benchmark`: two bundles on a small cohort, the tables, the report, the README table."""

from __future__ import annotations

import csv
import importlib.util
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from sklearn.metrics import average_precision_score, roc_auc_score

from medanomaly import benchmark, report
from medanomaly.bundles import BundleRunError, find_bundle
from medanomaly.cli import main
from medanomaly.console import CommandError
from medanomaly.data import load_datalist
from medanomaly.metrics import CohortEvaluator

HAS_WEIGHTS = find_bundle("dae").has_weights
CHROMIUM = next((shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome") if shutil.which(n)), None)


@pytest.fixture(scope="module")
def run(tiny, tmp_path_factory):
    """dae, a cheaper copy of it (3 mm voxels, 64 px slices: a second bundle, found through its
    folder, playing the floor) and a bundle without weights, on two lesion volumes and one
    healthy volume of the tiny cohort's T2w datalist, listed without `subject` keys (named by their files)."""
    if not HAS_WEIGHTS:
        pytest.skip("the dae demo weights are not committed")
    tmp = tmp_path_factory.mktemp("benchmark")
    t2w = tiny.parent / "datalist_T2w.json"  # the contrast of dae's demo weights
    items = {key: load_datalist(t2w, key) for key in ("test_lesion", "test_healthy")}
    anonymous = lambda entries: [{k: v for k, v in i.items() if k != "subject"} for i in entries]  # noqa: E731
    lesion = anonymous(i for i in items["test_lesion"] if i["family"] in ("tumour", "stroke"))
    datalist = tmp / "cohort.json"
    datalist.write_text(json.dumps({"contrast": "T2w", "test_lesion": lesion,
                                    "test_healthy": anonymous(items["test_healthy"][:1])}))
    copy = shutil.copytree(find_bundle("dae").root, tmp / "bundles" / "dae_copy",
                           ignore=shutil.ignore_patterns("__pycache__"))
    with open(copy / "configs" / "demo.yaml", "a") as f:
        f.write("pixdim: [3.0, 3.0, 3.0]\nimage_size: [64, 64]\n")
    metadata = json.loads((copy / "configs" / "metadata.json").read_text())
    (copy / "configs" / "metadata.json").write_text(json.dumps({**metadata, "medanomaly_role": "floor"}))
    unweighted = shutil.copytree(find_bundle("dae").root, tmp / "bundles" / "unweighted",
                                 ignore=shutil.ignore_patterns("__pycache__", "models"))
    out = tmp / "out"
    main(["benchmark", "--bundles", "dae", str(copy), str(unweighted), "--cohort", str(datalist),
          "--output-dir", str(out), "--device", "cpu", "--n-bootstrap", "50"])
    return out, datalist


def test_results_cover_every_bundle_and_match_sklearn(run):
    out, datalist = run
    results = json.loads((out / "results.json").read_text())
    assert list(results["contrasts"]) == ["T2w"]  # the contrast the datalist declares
    entries = {e["row"]["bundle"]: e for e in results["contrasts"]["T2w"]["bundles"]}
    assert list(entries) == ["dae", "dae_copy", "unweighted"]
    missing = entries["unweighted"]["row"]
    assert missing["status"] == "no weights" and "model.pt" in missing["error"]
    assert results["command"].startswith("medanomaly benchmark --bundles dae")
    assert entries["dae_copy"]["row"]["role"] == "floor" and entries["dae"]["row"]["role"] is None
    assert entries["dae"]["row"]["pixel_ap_gap_closed"] is None  # no ceiling ran

    with open(out / "results.csv") as f:
        rows = {r["bundle"]: r for r in csv.DictReader(f)}
    assert set(rows) == set(entries) and rows["unweighted"]["status"] == "no weights"
    assert {r["contrast"] for r in rows.values()} == {"T2w"}
    assert float(rows["dae"]["pixel_ap"]) == pytest.approx(entries["dae"]["row"]["pixel_ap"])
    with open(out / "results_by_group.csv") as f:
        assert {r["contrast"] for r in csv.DictReader(f)} == {"T2w"}

    for name in ("dae", "dae_copy"):
        entry, row = entries[name], entries[name]["row"]
        assert row["status"] == "ok" and row["error"] is None
        volumes = entry["per_volume"]
        assert len(volumes) == 3
        is_lesion = [v["n_lesion_voxels"] > 0 for v in volumes]
        scores = [v["volume_score"] for v in volumes]
        assert row["volume_auroc"] == pytest.approx(roc_auc_score(is_lesion, scores))
        assert row["volume_ap"] == pytest.approx(average_precision_score(is_lesion, scores))
        slice_labels = np.concatenate([v["slice_labels"] for v in volumes])
        slice_scores = np.concatenate([v["slice_scores"] for v in volumes])
        assert row["slice_auroc"] == pytest.approx(roc_auc_score(slice_labels, slice_scores))
        assert row["slice_ap"] == pytest.approx(average_precision_score(slice_labels, slice_scores))
        dice = [v["max_dice"] for v in volumes if v["n_lesion_voxels"]]
        assert row["dice_per_volume"] == pytest.approx(np.mean(dice))
        assert row["dice_per_volume_ci_low"] <= row["dice_per_volume"] <= row["dice_per_volume_ci_high"]
        assert row["pixel_ap_ci_low"] <= row["pixel_ap"] <= row["pixel_ap_ci_high"]
        assert row["volume_auroc_ci_low"] <= row["volume_auroc"] <= row["volume_auroc_ci_high"]
        assert 0 <= row["healthy_fpr"] <= 1 and row["dice_at_threshold"] is not None
        assert row["train_seconds"] > 0 and row["seconds_per_volume"] > 0 and row["peak_rss_mb"] > 100
        assert {v["size_group"] for v in volumes if v["n_lesion_voxels"]} <= {"small (<1 ml)", "medium (1-10 ml)",
                                                                              "large (>=10 ml)"}
        families = {g["group"] for g in entry["groups"] if g["kind"] == "family"}
        assert families == {"tumour", "stroke"}
        assert any(g["kind"] == "size" for g in entry["groups"])

    assert entries["dae"]["row"]["pixel_ap"] != entries["dae_copy"]["row"]["pixel_ap"]  # two runs, not one
    assert entries["dae"]["row"]["healthy_fpr"] <= 0.05  # its threshold flags ~1 % of healthy voxels

    # pooled pixel AP against sklearn on the voxels (the histogram ties scores within 1e-4 bins)
    record = {r["subject"]: r for r in json.loads((out / "T2w" / "dae" / "detections.json").read_text())}
    from medanomaly import io
    from medanomaly.bundles.outputs import subject_name

    names = {subject_name(v.get("subject"), v["image"]) for v in load_datalist(datalist, "test_lesion")}
    assert names <= set(record) and names <= {v["subject"] for v in entries["dae"]["per_volume"]}

    labels, heat = [], []
    for item in load_datalist(datalist, "test_lesion"):
        brain = io.volume_array(io.read_volume(item["mask"])) > 0
        labels.append(io.volume_array(io.read_volume(item["label"]))[brain] > 0)
        heat.append(io.volume_array(io.read_volume(record[subject_name(None, item["image"])]["heatmap"],
                                                   allow_constant=True))[brain])
    sklearn_ap = average_precision_score(np.concatenate(labels), np.concatenate(heat))
    assert entries["dae"]["row"]["pixel_ap"] == pytest.approx(sklearn_ap, abs=0.02)
    pooled = CohortEvaluator.load(out / "T2w" / "dae" / "histograms.npz").pooled_histogram()
    assert pooled.average_precision() == pytest.approx(entries["dae"]["row"]["pixel_ap"])


def test_every_bundle_is_scored_on_the_same_voxels(run):
    """dae works on 1.5 mm / 128 px slices, its copy on 3 mm / 64 px: their masks after the round
    trip through the model grid differ, yet both are scored on the supplied mask and label."""
    from medanomaly import io
    from medanomaly.bundles.outputs import subject_name

    out, datalist = run
    results = json.loads((out / "results.json").read_text())
    entries = {e["row"]["bundle"]: e for e in results["contrasts"]["T2w"]["bundles"]}
    supplied = {}
    for item in load_datalist(datalist, "test_lesion") + load_datalist(datalist, "test_healthy"):
        brain = io.volume_array(io.read_volume(item["mask"])) > 0.5
        label = io.volume_array(io.read_volume(item["label"], allow_constant=True)) > 0.5
        supplied[subject_name(item.get("subject"), item["image"])] = (int(brain.sum()), int((label & brain).sum()))
    for name in ("dae", "dae_copy"):
        counts = {v["subject"]: (v["n_brain_voxels"], v["n_lesion_voxels"]) for v in entries[name]["per_volume"]}
        assert counts == supplied, name


def test_report_references_its_figures(run):
    out, _ = run
    page = (out / "report.html").read_text()
    assert "<table>" in page and "no weights" in page and "http" not in page
    assert "<h2 id='T2w'>T2w</h2>" in page and "dae_copy: floor (non-learned)" in page
    assert "Not drawn" not in page  # subjects without `subject` keys are found by their file names
    images = re.findall(r"<img [^>]*src='([^']+)'", page)
    for name in ("compare_roc.png", "compare_pr.png", "compare_dice.png", "dae_roc.png", "dae_copy_dice.png",
                 "groups.png"):
        assert f"figures/T2w/{name}" in images
    montages = [i for i in images if "montage_" in i]
    assert len(montages) == 3  # tumour, stroke, healthy
    for image in images:
        assert (out / image).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    viewers = re.findall(r"<a href='(viewer_[^']+)'", page)
    assert len(viewers) == 3 and all(v.startswith("viewer_T2w_") for v in viewers)
    assert (out / "niivue.umd.js").is_file()
    assert "data:application/octet-stream;base64," in (out / viewers[0]).read_text()  # opens from disk


def screenshot(page: Path, png: Path, size: str, *flags: str) -> np.ndarray:
    from PIL import Image

    subprocess.run([CHROMIUM, "--headless", "--no-sandbox", "--disable-background-networking",
                    "--disable-component-update", "--disable-sync", "--no-first-run", *flags,
                    f"--user-data-dir={png.parent / (png.stem + '_profile')}", f"--screenshot={png}",
                    f"--window-size={size}", page.as_uri()], check=True, capture_output=True, timeout=120)
    return np.asarray(Image.open(png).convert("RGB"))


@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (apt-get install chromium; .ci/run does)")
def test_report_opens_in_headless_chromium(run, tmp_path):
    out, _ = run
    picture = screenshot(out / "report.html", tmp_path / "report.png", "1400,2000", "--disable-gpu").mean(axis=2)
    assert picture.shape == (2000, 1400)
    # not a blank page: text, table lines and plots give many dark pixels across the page
    dark = picture < 128
    assert dark.mean() > 0.01 and dark[:1000].any(axis=1).mean() > 0.2 and dark[1000:].any(axis=1).mean() > 0.2

    # the NiiVue viewer draws the volume and the heatmap with WebGL (SwiftShader: no GPU needed)
    viewer = next(out.glob("viewer_*.html"))
    picture = screenshot(viewer, tmp_path / "viewer.png", "1200,800", "--use-angle=swiftshader",
                         "--enable-unsafe-swiftshader", "--virtual-time-budget=15000")
    view = picture[100:700].astype(int)
    assert (view.mean(axis=2) > 60).mean() > 0.05  # brain slices drawn
    assert ((view[..., 0] - view[..., 2]) > 80).mean() > 0.001  # warm heatmap colours over them


def test_a_failing_bundle_is_reported_with_its_root_cause(tiny, tmp_path, monkeypatch):
    class Failing:
        cancelled = False

        def cancel(self):
            pass

        def wait(self, **kwargs):
            raise BundleRunError("The bundle failed (exit code 1)", 1,
                                 "Traceback (most recent call last):\nRuntimeError: Failed to evaluate x\n"
                                 "torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(benchmark, "start_bundle", lambda *args, **kwargs: Failing())
    if HAS_WEIGHTS:
        entry = benchmark.evaluate_bundle("dae", tiny, tmp_path / "dae")
        assert entry["row"]["status"] == "failed"
        assert entry["row"]["error"] == "OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB"

    class Hanging:
        cancelled = False

        def wait(self, **kwargs):
            time.sleep(1.0)

        def cancel(self):
            self.cancelled = True

    monkeypatch.setattr(benchmark, "start_bundle", lambda *args, **kwargs: Hanging())
    if HAS_WEIGHTS:
        entry = benchmark.evaluate_bundle("dae", tiny, tmp_path / "slow", timeout_minutes=0.1 / 60)
        assert entry["row"]["status"] == "failed" and "stopped after" in entry["row"]["error"]
    results = benchmark.run_benchmark(["no_such_bundle"], cohort=str(tiny), output_dir=tmp_path / "out", report=True)
    row = benchmark.entries(results)[0]["row"]
    assert row["status"] == "failed" and "No bundle named" in row["error"] and row["contrast"] == "T1w"
    page = (tmp_path / "out" / "report.html").read_text()
    assert "Not drawn: no curves: no method finished" in page
    assert "Not drawn: no subject montages or viewers: no method finished" in page
    merged = benchmark.run_benchmark(["another_one"], cohort=str(tiny), output_dir=tmp_path / "out", merge=True)
    assert [e["row"]["bundle"] for e in benchmark.entries(merged)] == ["no_such_bundle", "another_one"]
    saved = json.loads((tmp_path / "out" / "results.json").read_text())
    assert benchmark.entries(saved)[0]["row"]["bundle"] == "no_such_bundle"


def test_train_seconds_from_model_info():
    assert benchmark.train_seconds({"train_seconds": 12.5, "stage1_seconds": 3}) == 12.5
    assert benchmark.train_seconds({"stage1_seconds": 3.0, "stage2_seconds": 4.5}) == 7.5
    assert benchmark.train_seconds({"variant": "demo"}) is None


def test_readme_table_between_markers(tmp_path):
    metrics = {"pixel": {"ap": 0.2, "auroc": 0.8, "ap_ci": [0.1, 0.3], "max_dice": {"dice": 0.3, "ci": [0.2, 0.4]}},
               "max_dice_per_volume": {"mean": 0.25, "std": 0.1, "ci": [0.15, 0.35]},
               "volume": {"auroc": 0.7, "ap": 0.9}, "slice": {"auroc": 0.6, "ap": 0.2},
               "at_threshold": {"threshold": 0.1, "dice": 0.28, "fpr_healthy": 0.009},
               "timing": {"seconds_per_volume": 3.0, "peak_rss_mb": 900.0, "device": "cpu"},
               "n_lesion_volumes": 12, "n_healthy_volumes": 4}
    results = {"cohort": "demo", "device": "auto", "command": "medanomaly benchmark", "date": "2026-11-22 23:00 UTC",
               "wall_seconds": 600.0, "ci_method": benchmark.CI_METHOD,
               "contrasts": {"T1w": {"datalist": "datalist_T1w.json", "bundles": [
                   {"row": benchmark.summary_row("phanes", metrics, 60.0, {"variant": "demo"}), "metrics": metrics},
                   {"row": benchmark.failed_row("newmethod", benchmark.FAILED, "ValueError: broken")}]}}}
    readme = tmp_path / "README.md"
    readme.write_text(f"# x\n\n{report.README_START}\nold table\n{report.README_END}\n\nafter\n")
    report.update_readme(readme, results)
    text = readme.read_text()
    assert "old table" not in text and text.endswith("\n\nafter\n") and text.count(report.README_START) == 1
    assert "| phanes | ok (demo weights) | 0.700 | 0.200 [0.100, 0.300] |" in text
    assert "0.200 (ATLAS)" in text and "0.322 (ATLAS)" in text  # the paper's AUPRC and [Dice]
    assert "| newmethod | failed: ValueError: broken |" in text
    assert "medanomaly benchmark" in text and "2026-11-22" in text and "not comparable" in text
    report.update_readme(readme, results)  # idempotent
    assert readme.read_text() == text


def test_bundle_metadata_gets_the_readme_numbers_per_contrast(tmp_path, monkeypatch):
    """`--update-readme` also writes each bundle's metadata.json eval_metrics from the same rows;
    variants and failed rows are left out, and a bundle is found on the bundle search path."""
    def metrics(ap, dice, auroc):
        return {"pixel": {"ap": ap, "auroc": 0.9, "max_dice": {"dice": dice}}, "volume": {"auroc": auroc, "ap": 0.9},
                "max_dice_per_volume": {"mean": 0.2}}

    def entry(bundle, ap, dice, auroc):
        return {"row": benchmark.summary_row(bundle, metrics(ap, dice, auroc))}

    results = {"cohort": "demo", "command": "medanomaly benchmark --contrast all", "date": "2026-12-02 03:00 UTC",
               "contrasts": {
                   "T2w": {"bundles": [entry("dae", 0.35312, 0.4471, 0.6667),
                                       entry("dae[smoothing=null]", 0.1, 0.1, 0.1),
                                       {"row": benchmark.failed_row("cddpm", benchmark.FAILED, "boom")}]},
                   "FLAIR": {"bundles": [entry("dae", 0.2, 0.3, None)]}}}
    expected = {"demo_cohort": {"T2w": {"volume_auroc": 0.667, "pixel_ap": 0.353, "max_dice": 0.447},
                                "FLAIR": {"volume_auroc": None, "pixel_ap": 0.2, "max_dice": 0.3}},
                "source": "medanomaly benchmark --contrast all (2026-12-02 03:00 UTC)"}
    assert report.bundle_eval_metrics(results) == {"dae": expected}
    copy = tmp_path / "bundles" / "dae" / "configs"
    copy.mkdir(parents=True)
    metadata = json.loads((find_bundle("dae").configs_dir / "metadata.json").read_text())
    (copy / "metadata.json").write_text(json.dumps(metadata))
    monkeypatch.setenv("MEDANOMALY_BUNDLE_PATH", str(tmp_path / "bundles"))
    assert report.update_bundle_metadata(results) == [copy / "metadata.json"]
    written = json.loads((copy / "metadata.json").read_text())
    assert written["eval_metrics"] == expected and written["version"] == metadata["version"]
    assert report.update_bundle_metadata(results) == []  # unchanged: not rewritten


def test_models_root_weights_are_used_and_paper_scale_refuses_demo_weights(tiny, tmp_path, monkeypatch):
    started = []

    def record_and_stop(bundle, overrides, demo, *args):
        started.append((overrides, demo))
        raise RuntimeError("not run in this test")

    monkeypatch.setattr(benchmark, "_run_evaluation", record_and_stop)
    dae = find_bundle("dae")
    own = tmp_path / "runs" / "dae" / "models"
    own.mkdir(parents=True)
    (own / "model.pt").write_bytes(b"weights")
    (own / "model_info.json").write_text(json.dumps({"variant": "demo"}))
    # paper scale with demo-variant weights: a clear 'no weights' row, nothing started
    refused = benchmark.evaluate_bundle("dae", tiny, tmp_path / "out", demo=False, models_root=tmp_path / "runs")
    assert refused["row"]["status"] == benchmark.NO_WEIGHTS and "--paper-scale" in refused["row"]["error"]
    assert str(own) in refused["row"]["error"] and not started
    (own / "model_info.json").write_text(json.dumps({"variant": "paper"}))
    benchmark.evaluate_bundle("dae", tiny, tmp_path / "out", demo=False, models_root=tmp_path / "runs")
    assert started[-1][0]["model_dir"] == str(own) and started[-1][1] is False
    if HAS_WEIGHTS and dae.weights_need_demo_config:  # a bundle not under --models-root: its own weights
        refused = benchmark.evaluate_bundle("dae", tiny, tmp_path / "out", demo=False, models_root=tmp_path / "none")
        assert refused["row"]["status"] == benchmark.NO_WEIGHTS and "its own models/" in refused["row"]["error"]



# ---------------------------------------------------------------------- contrasts, floor and ceiling
def fake_metrics(ap: float, dice: float, volume_auroc: float = 0.7, volume_ci=None) -> dict:
    return {"pixel": {"ap": ap, "auroc": 0.8, "ap_ci": [ap / 2, ap * 1.5], "max_dice": {"dice": dice, "ci": None}},
            "max_dice_per_volume": {"mean": dice, "std": 0.1, "ci": None},
            "volume": {"auroc": volume_auroc, "ap": 0.9, **({"auroc_ci": volume_ci} if volume_ci else {})},
            "slice": {"auroc": 0.6, "ap": 0.2}, "at_threshold": {"threshold": 0.1, "dice": 0.2, "fpr_healthy": 0.01},
            "timing": {"seconds_per_volume": 1.0, "device": "cpu"}, "n_lesion_volumes": 2, "n_healthy_volumes": 1}


def fake_entry(bundle: str, ap: float, dice: float, role: str | None = None, contrast: str = "T1w", **kwargs) -> dict:
    row = benchmark.summary_row(bundle, fake_metrics(ap, dice, **kwargs), 10.0)
    row.update(role=role, contrast=contrast)
    return {"row": row, "metrics": fake_metrics(ap, dice, **kwargs), "run_dir": f"no_such_run_{bundle}"}


def test_gap_closed_by_hand():
    assert benchmark.gap_closed(0.3, 0.1, 0.5) == pytest.approx(0.5)
    assert benchmark.gap_closed(0.05, 0.1, 0.5) == pytest.approx(-0.125)  # below the floor
    assert benchmark.gap_closed(0.3, 0.2, 0.2) is None  # floor == ceiling: no gap to close
    assert benchmark.gap_closed(0.3, 0.2, 0.1) is None  # a ceiling below the floor is no reference
    assert benchmark.gap_closed(0.3, None, 0.5) is None and benchmark.gap_closed(0.3, 0.1, None) is None
    assert benchmark.gap_closed(None, 0.1, 0.5) is None

    floor, method, ceiling = (fake_entry("intensity", 0.1, 0.2, "floor")["row"], fake_entry("dae", 0.3, 0.2)["row"],
                              fake_entry("supervised", 0.5, 0.6, "ceiling")["row"])
    broken = benchmark.failed_row("broken", benchmark.FAILED, "ValueError: x")
    benchmark.add_gap_closed([floor, method, ceiling, broken])
    assert method["pixel_ap_gap_closed"] == pytest.approx(0.5)
    assert method["pooled_dice_gap_closed"] == pytest.approx(0.0)
    assert floor["pixel_ap_gap_closed"] == 0.0 and ceiling["pooled_dice_gap_closed"] == pytest.approx(1.0)
    assert broken["pixel_ap_gap_closed"] is None
    failed_ceiling = {**ceiling, "status": benchmark.FAILED}
    for rows in ([floor, method], [method, ceiling], [floor, method, failed_ceiling]):  # no floor or no ceiling
        benchmark.add_gap_closed(rows)
        assert method["pixel_ap_gap_closed"] is None and method["pooled_dice_gap_closed"] is None


def test_results_are_keyed_by_contrast_with_floor_and_ceiling_labelled(tmp_path):
    results = {"cohort": "demo", "device": "auto", "command": "medanomaly benchmark --contrast all",
               "date": "2026-12-01 17:00 UTC", "wall_seconds": 60.0, "ci_method": benchmark.CI_METHOD,
               "n_bootstrap": 10, "machine": "test",
               "contrasts": {
                   "T1w": {"datalist": str(tmp_path / "none_T1w.json"), "bundles": [
                       fake_entry("supervised", 0.5, 0.6, "ceiling"),
                       fake_entry("dae", 0.3, 0.2, volume_ci=[0.55, 0.85]),
                       fake_entry("intensity", 0.1, 0.2, "floor")]},
                   "FLAIR": {"datalist": str(tmp_path / "none_FLAIR.json"), "bundles": [
                       fake_entry("intensity", 0.4, 0.5, "floor", "FLAIR"), fake_entry("dae", 0.45, 0.5, None, "FLAIR"),
                       fake_entry("supervised", 0.4, 0.5, "ceiling", "FLAIR")]}}}
    benchmark.finish(results)
    table = report.markdown_table(results)
    t1w, flair = table.split("**T1w**")[1].split("**FLAIR**")
    lines = [line for line in t1w.splitlines() if line.startswith("| ") and "---" not in line][1:]
    assert [line.split(" | ")[0] for line in lines] == [
        "| intensity: floor (non-learned)", "| dae", "| supervised: ceiling (supervised, not anomaly detection)"]
    assert "| dae | ok | 0.700 [0.550, 0.850] | 0.300 [0.150, 0.450] | 0.200 | 0.50 | 0.00 |" in t1w
    assert "| dae | ok | 0.700 | 0.450 [0.225, 0.675] | 0.500 | n/a | n/a |" in flair  # floor == ceiling
    assert report.REFERENCES in table

    benchmark.write_tables(results, tmp_path)
    with open(tmp_path / benchmark.RESULTS_CSV) as f:
        rows = {(r["contrast"], r["bundle"]): r for r in csv.DictReader(f)}
    assert float(rows["T1w", "dae"]["pixel_ap_gap_closed"]) == pytest.approx(0.5)
    assert rows["FLAIR", "dae"]["pixel_ap_gap_closed"] == "" and rows["T1w", "dae"]["volume_auroc_ci_low"] == "0.55"
    reloaded = benchmark.load_results(tmp_path)["contrasts"]["T1w"]["bundles"][1]["row"]
    assert reloaded["pixel_ap_gap_closed"] == pytest.approx(0.5)

    page = report.write_report(results, tmp_path).read_text()
    assert page.index("<h2 id='T1w'>") < page.index("<h2 id='FLAIR'>")
    assert "0.700 [0.550, 0.850]" in page and "supervised: ceiling (supervised, not anomaly detection)" in page
    assert page.count("Not drawn: no curves: no finished method left its histograms.npz") == 2
    assert "Not drawn: no subject montages or viewers: no method wrote per-volume records" in page


def test_results_of_the_single_contrast_era_still_load(tmp_path):
    entry = fake_entry("dae", 0.3, 0.2)
    del entry["row"]["contrast"], entry["row"]["role"]
    (tmp_path / benchmark.RESULTS_JSON).write_text(json.dumps({"cohort": "demo", "datalist": "d.json",
                                                               "bundles": [entry]}))
    results = benchmark.load_results(tmp_path)
    assert results["contrasts"]["T1w"]["datalist"] == "d.json"
    assert benchmark.entries(results)[0]["row"]["contrast"] == "T1w"


def test_cohort_datalists_per_contrast(tmp_path, monkeypatch):
    real = benchmark.resolve_datalist
    monkeypatch.setattr(benchmark, "resolve_datalist",
                        lambda d, c=None: Path(f"/cohorts/{d}_{c}.json") if d in benchmark.PRESETS else real(d, c))
    assert benchmark.cohort_datalists("demo") == {"T1w": Path("/cohorts/demo_T1w.json")}
    assert list(benchmark.cohort_datalists("demo", "all")) == ["T1w", "T2w", "FLAIR"]
    assert benchmark.cohort_datalists("tiny", "flair") == {"FLAIR": Path("/cohorts/tiny_FLAIR.json")}
    with pytest.raises(CommandError, match="Unknown contrast 'T3'"):
        benchmark.cohort_datalists("demo", "T3")
    own = tmp_path / "mine.json"
    own.write_text(json.dumps({"contrast": "FLAIR", "test_lesion": []}))
    assert benchmark.cohort_datalists(own) == {"FLAIR": own.resolve()}
    for wrong in ("T1w", "all"):
        with pytest.raises(CommandError, match="one datalist of FLAIR scans"):
            benchmark.cohort_datalists(own, wrong)
    plain = tmp_path / "plain.json"
    plain.write_text(json.dumps({"test_lesion": []}))
    assert benchmark.cohort_datalists(plain) == {"T1w": plain.resolve()}
    assert benchmark.cohort_datalists(plain, "T2w") == {"T2w": plain.resolve()}


def stub_bundle(root: Path, role: str | None = None) -> Path:
    """A bundle folder with weights and an evaluate config (never run through MONAI here)."""
    (root / "configs").mkdir(parents=True)
    (root / "models").mkdir()
    (root / "models" / "model.pt").write_bytes(b"weights")
    (root / "configs" / "evaluate.yaml").write_text("run: []\n")
    (root / "configs" / "metadata.json").write_text(json.dumps({"version": "0.1.0", "medanomaly_role": role}))
    return root


def _record_evaluations(tmp_path, monkeypatch) -> list[dict]:
    """The overrides of every evaluation the benchmark starts (none really runs); preset datalists
    resolve to `<preset>_<contrast>.json` in tmp_path."""
    started = []

    def record_and_stop(bundle, overrides, *args):
        started.append(overrides)
        raise RuntimeError("not run in this test")

    monkeypatch.setattr(benchmark, "_run_evaluation", record_and_stop)
    monkeypatch.setattr(benchmark, "resolve_datalist", lambda d, c=None: tmp_path / f"{d}_{c}.json")
    return started


def test_each_contrast_evaluates_its_own_datalist(tmp_path, monkeypatch):
    started = _record_evaluations(tmp_path, monkeypatch)
    stub = stub_bundle(tmp_path / "supervised", role="ceiling")
    results = benchmark.run_benchmark([str(stub)], cohort="demo", output_dir=tmp_path / "out", contrast="all",
                                      report=False)
    assert [(o["contrast"], Path(o["datalist"]).name, Path(o["output_dir"]).parent.name) for o in started] == [
        ("T1w", "demo_T1w.json", "T1w"), ("T2w", "demo_T2w.json", "T2w"), ("FLAIR", "demo_FLAIR.json", "FLAIR")]
    assert {c: [e["row"]["role"] for e in run["bundles"]] for c, run in results["contrasts"].items()} == {
        "T1w": ["ceiling"], "T2w": ["ceiling"], "FLAIR": ["ceiling"]}
    with open(tmp_path / "out" / benchmark.RESULTS_CSV) as f:
        assert [r["contrast"] for r in csv.DictReader(f)] == ["T1w", "T2w", "FLAIR"]


def test_a_variant_row_runs_its_bundle_with_its_overrides(tmp_path, monkeypatch):
    """`bundle[key=value,...]`: the same bundle's evaluation with the overrides (JSON values parsed),
    a row labelled with the whole spec and a run folder of its own; a malformed spec is a failed row."""
    started = _record_evaluations(tmp_path, monkeypatch)
    stub = stub_bundle(tmp_path / "phanes")
    assert benchmark.parse_variant("phanes[mode=ra, mask_fpr=0.02,ensemble=true,map_range=(0, 0.05)]") == (
        "phanes", {"mode": "ra", "mask_fpr": 0.02, "ensemble": True, "map_range": [0, 0.05]})
    assert benchmark.parse_variant("dae") == ("dae", {})
    results = benchmark.run_benchmark([str(stub), f"{stub}[mode=ra]", f"{stub}[mode"], cohort="demo",
                                      output_dir=tmp_path / "out", contrast="T2w", report=False)
    assert "mode" not in started[0] and started[1]["mode"] == "ra"
    assert started[0]["output_dir"] != started[1]["output_dir"]
    rows = [entry["row"] for entry in results["contrasts"]["T2w"]["bundles"]]
    assert rows[1]["bundle"].endswith("phanes[mode=ra]") and "name[key=value" in rows[2]["error"]


# ---------------------------------------------------------------------- subjects named one way
def test_subjects_are_named_by_their_subject_key_else_their_file(tmp_path):
    datalist = tmp_path / "cohort.json"
    datalist.write_text(json.dumps({
        "test_lesion": [{"image": "a/s-a.nii.gz", "subject": "A", "family": "tumour"},
                        {"image": "b/sub-0002_T1w.nii.gz", "family": "stroke"}],
        "test_healthy": ["c/sub-0003_T1w.nii.gz"]}))
    records = [{"subject": "A", "family": "tumour", "lesion_ml": 5.0, "n_lesion_voxels": 9},
               {"subject": "sub-0002_T1w", "family": "stroke", "lesion_ml": 2.0, "n_lesion_voxels": 4},
               {"subject": "sub-0003_T1w", "family": None, "lesion_ml": 0.0, "n_lesion_voxels": 0}]
    picked = report.pick_subjects({"bundles": [{"per_volume": records}]}, datalist)
    assert [(s["subject"], s["family"], Path(s["image"]).name) for s in picked] == [
        ("A", "tumour", "s-a.nii.gz"), ("sub-0002_T1w", "stroke", "sub-0002_T1w.nii.gz"),
        ("sub-0003_T1w", "healthy", "sub-0003_T1w.nii.gz")]


def test_a_section_that_cannot_be_drawn_says_why(tmp_path):
    datalist = tmp_path / "cohort.json"
    datalist.write_text(json.dumps({"test_lesion": [{"image": "a/s-a.nii.gz", "family": "tumour"}]}))
    entry = fake_entry("dae", 0.3, 0.2)
    entry.update(run_dir=str(tmp_path / "dae"), per_volume=[
        {"subject": "elsewhere", "family": "tumour", "lesion_ml": 1.0, "n_lesion_voxels": 3}])
    results = {"cohort": str(datalist), "date": "today", "ci_method": "", "n_bootstrap": 0,
               "contrasts": {"T1w": {"datalist": str(datalist), "bundles": [entry]}}}
    page = report.write_report(results, tmp_path).read_text()
    assert ("Not drawn: no subject montages or viewers: none of the 1 per-volume records (e.g. &#x27;elsewhere&#x27;)"
            " names a test entry") in page
    entry["per_volume"][0]["subject"] = "s-a"  # found, but no detections.json names it
    page = report.write_report(results, tmp_path).read_text()
    assert "Not drawn: no montage of s-a: no finished method&#x27;s detections.json names it." in page


# ---------------------------------------------------------------------- stopping
STOPPABLE = """
import sys
from medanomaly import benchmark
from medanomaly.bundles import BundleProcess
from medanomaly.cli import main

CHILD = '''
import subprocess, sys, time, os
grandchild = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
open(sys.argv[1], "w").write(f"{os.getpid()} {grandchild.pid}")
time.sleep(120)
'''
pids, stub, cohort, out = sys.argv[1:]
benchmark.start_bundle = lambda *args, **kwargs: BundleProcess([sys.executable, "-c", CHILD, pids])
main(["benchmark", "--bundles", stub, "--cohort", cohort, "--output-dir", out])
"""


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state not in ("Z", "X")


@pytest.mark.skipif(not Path("/proc").is_dir(), reason="reads process states from /proc")
def test_sigterm_ends_the_running_bundle_and_its_children(tmp_path):
    cohort = tmp_path / "cohort.json"
    cohort.write_text(json.dumps({"test_lesion": []}))
    pids = tmp_path / "pids.txt"
    parent = subprocess.Popen([sys.executable, "-c", STOPPABLE, str(pids), str(stub_bundle(tmp_path / "stub")),
                               str(cohort), str(tmp_path / "out")], stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 180  # imports are slow on a loaded machine
        while not (pids.is_file() and len(pids.read_text().split()) == 2) and time.monotonic() < deadline:
            assert parent.poll() is None, parent.stderr.read()
            time.sleep(0.2)
        children = [int(p) for p in pids.read_text().split()]
        assert all(map(_alive, children))
        parent.send_signal(signal.SIGTERM)
        returncode = parent.wait(timeout=30)
        deadline = time.monotonic() + 10
        while any(map(_alive, children)) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not any(map(_alive, children)), "the bundle's processes outlived the benchmark"
        assert returncode == 128 + signal.SIGTERM and "Stopped by SIGTERM" in parent.stderr.read()
    finally:
        parent.kill()
        for pid in [int(p) for p in pids.read_text().split()] if pids.is_file() else []:
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)


def test_make_benchmark_runs_what_the_readme_says():
    root = Path(__file__).resolve().parents[1]
    makefile = (root / "Makefile").read_text()
    args = re.search(r"^BENCHMARK_ARGS \?= (.*)$", makefile, re.M)[1]
    assert "$(VENV)/bin/medanomaly benchmark $(BENCHMARK_ARGS)" in makefile
    assert f"`make benchmark` runs `medanomaly benchmark {args}`" in (root / "README.md").read_text()


def _load_script(name: str):
    path = Path(__file__).resolve().parents[1] / "benchmarks" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_volume_reductions_rescore_saved_heatmaps(tmp_path):
    """benchmarks/volume_reductions.py: each reduction of a saved heatmap over the brain, by hand.
    Lesion maps are low overall with a hot spot of 2 % of the brain, healthy maps higher overall
    without one: the mean mixes them, the top 1 % and the maximum separate them."""
    script = _load_script("volume_reductions")
    row, volumes, affine = tmp_path / "row", [], np.eye(4)
    row.mkdir()
    brain = np.zeros((10, 10, 12), np.uint8)
    brain[:, :, 1:11] = 1  # 1,000 brain voxels; the two slices outside score 9 and must not count
    for i, (level, lesion) in enumerate([(0.4, 1), (0.5, 1), (0.55, 1), (0.5, 0), (0.6, 0), (0.7, 0)]):
        heatmap = np.full(brain.shape, level, np.float32)
        heatmap[brain == 0] = 9.0
        if lesion:
            heatmap[:2, :, 1:2] = 5.0  # 20 voxels
        nib.save(nib.Nifti1Image(heatmap, affine), row / f"s{i}_heatmap.nii.gz")
        nib.save(nib.Nifti1Image(brain, affine), tmp_path / f"s{i}_mask.nii.gz")
        volumes.append({"subject": f"s{i}", "mask": tmp_path / f"s{i}_mask.nii.gz", "lesion_voxels": 20 * lesion})
    scores = script.row_scores(row, volumes)
    assert list(scores) == ["mean", "top 1 %", "top 0.1 %", "max"]
    np.testing.assert_allclose(scores["mean"], [0.492, 0.59, 0.639, 0.5, 0.6, 0.7], rtol=1e-6)
    np.testing.assert_allclose(scores["top 1 %"][:3], 5.0)
    np.testing.assert_allclose(scores["max"], [5, 5, 5, 0.5, 0.6, 0.7])
    labels = [v["lesion_voxels"] > 0 for v in volumes]
    assert roc_auc_score(labels, scores["mean"]) == pytest.approx(3 / 9)
    assert roc_auc_score(labels, scores["top 1 %"]) == 1.0
    (row / "s5_heatmap.nii.gz").unlink()
    assert script.row_scores(row, volumes) is None  # a row without every heatmap is skipped
