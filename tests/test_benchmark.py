"""`medanomaly benchmark`: two bundles on a small cohort, the tables, the report, the README table."""

from __future__ import annotations

import csv
import json
import re
import shutil
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
from sklearn.metrics import average_precision_score, roc_auc_score

from medanomaly import benchmark, report
from medanomaly.bundles import BundleRunError, find_bundle
from medanomaly.cli import main
from medanomaly.data import load_datalist
from medanomaly.metrics import CohortEvaluator

HAS_WEIGHTS = find_bundle("dae").has_weights
CHROMIUM = next((shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome") if shutil.which(n)), None)


@pytest.fixture(scope="module")
def run(tiny, tmp_path_factory):
    """dae, a cheaper copy of it (3 mm voxels, 64 px slices: a second bundle, found through its
    folder) and a bundle without weights, on two lesion volumes and one healthy volume of the
    tiny cohort."""
    if not HAS_WEIGHTS:
        pytest.skip("the dae demo weights are not committed")
    tmp = tmp_path_factory.mktemp("benchmark")
    items = {key: load_datalist(tiny, key) for key in ("test_lesion", "test_healthy")}
    lesion = [i for i in items["test_lesion"] if i["family"] in ("tumour", "stroke")]
    datalist = tmp / "cohort.json"
    datalist.write_text(json.dumps({"test_lesion": lesion, "test_healthy": items["test_healthy"][:1]}))
    copy = shutil.copytree(find_bundle("dae").root, tmp / "bundles" / "dae_copy",
                           ignore=shutil.ignore_patterns("__pycache__"))
    with open(copy / "configs" / "demo.yaml", "a") as f:
        f.write("pixdim: [3.0, 3.0, 3.0]\nimage_size: [64, 64]\n")
    unweighted = shutil.copytree(find_bundle("dae").root, tmp / "bundles" / "unweighted",
                                 ignore=shutil.ignore_patterns("__pycache__", "models"))
    out = tmp / "out"
    main(["benchmark", "--bundles", "dae", str(copy), str(unweighted), "--cohort", str(datalist),
          "--output-dir", str(out), "--device", "cpu", "--n-bootstrap", "50"])
    return out, datalist


def test_results_cover_every_bundle_and_match_sklearn(run):
    out, datalist = run
    results = json.loads((out / "results.json").read_text())
    entries = {e["row"]["bundle"]: e for e in results["bundles"]}
    assert list(entries) == ["dae", "dae_copy", "unweighted"]
    missing = entries["unweighted"]["row"]
    assert missing["status"] == "no weights" and "model.pt" in missing["error"]
    assert results["command"].startswith("medanomaly benchmark --bundles dae")

    with open(out / "results.csv") as f:
        rows = {r["bundle"]: r for r in csv.DictReader(f)}
    assert set(rows) == set(entries) and rows["unweighted"]["status"] == "no weights"
    assert float(rows["dae"]["pixel_ap"]) == pytest.approx(entries["dae"]["row"]["pixel_ap"])

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
    record = {r["subject"]: r for r in json.loads((out / "dae" / "detections.json").read_text())}
    from medanomaly import io

    labels, heat = [], []
    for item in load_datalist(datalist, "test_lesion"):
        brain = io.volume_array(io.read_volume(item["mask"])) > 0
        labels.append(io.volume_array(io.read_volume(item["label"]))[brain] > 0)
        heat.append(io.volume_array(io.read_volume(record[item["subject"]]["heatmap"], allow_constant=True))[brain])
    sklearn_ap = average_precision_score(np.concatenate(labels), np.concatenate(heat))
    assert entries["dae"]["row"]["pixel_ap"] == pytest.approx(sklearn_ap, abs=0.02)
    pooled = CohortEvaluator.load(out / "dae" / "histograms.npz").pooled_histogram()
    assert pooled.average_precision() == pytest.approx(entries["dae"]["row"]["pixel_ap"])


def test_report_references_its_figures(run):
    out, _ = run
    page = (out / "report.html").read_text()
    assert "<table>" in page and "no weights" in page and "http" not in page
    images = re.findall(r"<img [^>]*src='([^']+)'", page)
    for name in ("compare_roc.png", "compare_pr.png", "compare_dice.png", "dae_roc.png", "dae_copy_dice.png",
                 "groups.png"):
        assert f"figures/{name}" in images
    montages = [i for i in images if "montage_" in i]
    assert len(montages) == 3  # tumour, stroke, healthy
    for image in images:
        assert (out / image).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    viewers = re.findall(r"<a href='(viewer_[^']+)'", page)
    assert len(viewers) == 3 and (out / "niivue.umd.js").is_file()
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
    assert results["bundles"][0]["row"]["status"] == "failed" and "No bundle named" in results["bundles"][0]["row"]["error"]
    assert (tmp_path / "out" / "report.html").is_file()
    merged = benchmark.run_benchmark(["another_one"], cohort=str(tiny), output_dir=tmp_path / "out", merge=True)
    assert [e["row"]["bundle"] for e in merged["bundles"]] == ["no_such_bundle", "another_one"]
    assert json.loads((tmp_path / "out" / "results.json").read_text())["bundles"][0]["row"]["bundle"] == "no_such_bundle"


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
               "bundles": [{"row": benchmark.summary_row("phanes", metrics, 60.0, {"variant": "demo"}),
                            "metrics": metrics},
                           {"row": benchmark.failed_row("newmethod", benchmark.FAILED, "ValueError: broken")}]}
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

