"""The `medanomaly` command, run as a user runs it."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from medanomaly import io
from medanomaly.bundles import find_bundle
from medanomaly.cli import format_metrics, parse_overrides
from medanomaly.data import load_datalist

HAS_WEIGHTS = find_bundle("dae").has_weights


def medanomaly(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "medanomaly.cli", *args], capture_output=True, text=True, cwd=cwd)


def test_list_shows_the_dae_bundle_and_its_demo_weights():
    result = medanomaly("list", "--json")
    assert result.returncode == 0, result.stderr
    dae = next(b for b in json.loads(result.stdout) if b["name"] == "dae")
    assert dae["has_weights"] == HAS_WEIGHTS and dae["demo_weights"] == HAS_WEIGHTS


def test_unknown_bundle_names_the_available_ones():
    result = medanomaly("detect", "nope", "scan.nii.gz")
    assert result.returncode != 0 and "available: " in result.stderr and "dae" in result.stderr


def test_overrides_need_key_value_pairs():
    assert parse_overrides(["threshold=0.2", "input=a=b.nii"]) == {"threshold": "0.2", "input": "a=b.nii"}
    with pytest.raises(ValueError, match="key=value"):
        parse_overrides(["threshold"])
    result = medanomaly("detect", "dae", "x.nii.gz", "--set", "threshold")  # the command turns it into an exit
    assert result.returncode != 0 and "--set expects key=value" in result.stderr and "Traceback" not in result.stderr


def test_synth_reuses_a_cached_cohort(tiny):
    result = medanomaly("synth", "--preset", "tiny", "--root", str(tiny.parent))
    assert result.returncode == 0, result.stderr
    assert str(tiny) in result.stdout


@pytest.mark.skipif(not HAS_WEIGHTS, reason="the dae demo weights are not committed")
def test_detect_writes_outputs_on_the_input_grid(tiny, tmp_path):
    subject = load_datalist(tiny, "test_lesion")[0]
    result = medanomaly("detect", "dae", subject["image"], "--device", "cpu", "--format", "nrrd",
                        "--output-dir", str(tmp_path / "out"), cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    name = Path(subject["image"]).name.replace(".nii.gz", "")
    heatmap = io.check_volume_file(tmp_path / "out" / f"{name}_heatmap.nrrd")
    scan = io.check_volume_file(subject["image"])  # an oblique, anisotropic grid
    assert heatmap.size == scan.size
    np.testing.assert_allclose(heatmap.ijk_to_lps, scan.ijk_to_lps, atol=1e-4)  # spacing, origin, direction
    assert (tmp_path / "out" / f"{name}_anomaly.seg.nrrd").is_file()
    assert f"{name}: volume score" in result.stdout


@pytest.mark.skipif(not HAS_WEIGHTS, reason="the dae demo weights are not committed")
def test_demo_finds_lesions_far_better_than_chance(tmp_path, capsys):
    """`medanomaly demo` on the tiny cohort: one scan with a picture, then the test split
    (3 lesion + 2 healthy scans) evaluated with the committed demo weights."""
    from medanomaly.demo import run_demo

    summary = run_demo("dae", output_dir=tmp_path, device="cpu", cohort="tiny")
    assert (tmp_path / "demo_overlay.png").stat().st_size > 10_000
    assert summary["volume"]["pixel_ap"] > 3 * summary["volume"]["lesion_fraction"]
    printed = capsys.readouterr().out
    assert "pooled [Dice]" in printed and "demo_overlay.png" in printed

    cohort = summary["cohort"]
    assert cohort["n_lesion_volumes"] == 3 and cohort["n_healthy_volumes"] == 2
    pixel = cohort["pixel"]
    prevalence = pixel["n_pos"] / (pixel["n_pos"] + pixel["n_neg"])
    # measured (weights fine-tuned on T2w, so the demo runs on the T2w cohort): AUROC 0.94, AP 0.47 =
    # 26 x the lesion prevalence, [Dice] 0.54 (chance: 0.5, 1 x, ~0.04); the limits keep a wide margin
    assert summary["contrast"] == "T2w"
    assert pixel["auroc"] > 0.75
    assert pixel["ap"] > 5 * prevalence
    assert pixel["max_dice"]["dice"] > 0.2


def test_metrics_summary_prints_missing_values_as_na():
    metrics = {"n_lesion_volumes": 0, "n_healthy_volumes": 2,
               "pixel": {"max_dice": {"dice": None, "threshold": None}, "ap": None, "auroc": None},
               "max_dice_per_volume": {"mean": None, "std": None}, "volume": {"auroc": None, "ap": None}}
    text = format_metrics("dae", metrics)
    assert "n/a" in text and "0 lesion + 2 healthy" in text


def test_benchmark_contrast_option(tmp_path, monkeypatch):
    from medanomaly import benchmark
    from medanomaly.cli import build_parser, main

    assert build_parser().parse_args(["benchmark", "--contrast", "all"]).contrast == "all"
    assert build_parser().parse_args(["benchmark"]).contrast is None  # T1w, or a datalist's own contrast
    with pytest.raises(SystemExit, match="Unknown contrast 'T3'"):
        main(["benchmark", "--contrast", "T3", "--cohort", "tiny", "--output-dir", str(tmp_path)])
    seen = {}
    monkeypatch.setattr(benchmark, "run_benchmark", lambda **kwargs: seen.update(kwargs) or {})
    main(["benchmark", "--contrast", "FLAIR", "--bundles", "dae", "--output-dir", str(tmp_path)])
    assert seen["contrast"] == "FLAIR" and seen["bundles"] == ["dae"]
