"""The intensity bundle, the benchmark's non-learned floor: its two rules by hand, the rule and
statistics each contrast picks, and its workflows end to end through `python -m monai.bundle run`."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from monai.bundle import ConfigParser

from medanomaly import io
from medanomaly.bundles import bundle_scripts, find_bundle, import_bundle_scripts, run_bundle
from medanomaly.data import load_datalist

from checks import assert_same_grid, pixel_metrics

INTENSITY = find_bundle("intensity")
_SCRIPTS = import_bundle_scripts("intensity", "intensity")["scripts.intensity"]
HealthyIntensityDensity = _SCRIPTS.HealthyIntensityDensity
IntensityAnomalyMethod = _SCRIPTS.IntensityAnomalyMethod


def _slices_with_brain():
    """Three 16 x 16 slices: random intensities, a brain square in the first two, none in the third."""
    image = torch.rand(3, 1, 16, 16, generator=torch.Generator().manual_seed(0))
    mask = torch.zeros_like(image)
    mask[:2, :, 4:12, 4:12] = 1
    return image * mask, mask


def test_hyperintensity_map_is_the_normalised_image_inside_the_brain_and_zero_outside():
    image, mask = _slices_with_brain()
    out = IntensityAnomalyMethod("hyperintensity")(torch.cat([image, mask], 1))
    assert out.shape == (3, 2, 16, 16)
    torch.testing.assert_close(out[:, 0:1], image * mask)
    assert torch.all(out[:, 0][mask[:, 0] == 0] == 0) and torch.all(out[2] == 0)


def test_optional_median_smoothing_removes_a_single_bright_voxel():
    image, mask = torch.full((1, 1, 9, 9), 0.3), torch.ones(1, 1, 9, 9)
    image[0, 0, 4, 4] = 1.0
    inputs = torch.cat([image, mask], 1)
    assert IntensityAnomalyMethod("hyperintensity")(inputs)[0, 0, 4, 4] == 1.0
    smoothed = IntensityAnomalyMethod("hyperintensity", smoothing="median", smoothing_size=3)(inputs)
    torch.testing.assert_close(smoothed[0, 0, 4, 4], torch.tensor(0.3))


def test_healthy_density_scores_intensities_rare_in_healthy_brains_higher():
    density = HealthyIntensityDensity(n_bins=10)
    healthy = torch.tensor([0.45] * 80 + [0.55] * 15 + [0.85] * 5).reshape(1, 1, 10, 10)
    density.accumulate(healthy, torch.ones_like(healthy))
    density.accumulate(torch.full((1, 1, 4, 4), 0.95), torch.zeros(1, 1, 4, 4))  # outside the brain: not counted
    assert density.counts.sum() == 100 and density.counts[4] == 80
    score = density(torch.tensor([0.45, 0.55, 0.85, 0.05, 1.0]))
    assert score[0] == 0  # the most frequent healthy intensity
    assert score[0] < score[1] < score[2] < score[3]  # 80 > 15 > 5 > never seen
    assert score[3] == score[4] == 1  # never seen: the rarest, rescaled to 1
    image, mask = _slices_with_brain()
    out = IntensityAnomalyMethod("healthy_density", density)(torch.cat([image, mask], 1))
    torch.testing.assert_close(out[:, 0:1], density(image) * mask)
    assert torch.all(out[2] == 0)


def test_healthy_density_needs_its_histogram_and_rules_are_checked():
    with pytest.raises(ValueError, match="histogram"):
        IntensityAnomalyMethod("healthy_density")
    with pytest.raises(ValueError, match="Unknown rule"):
        IntensityAnomalyMethod("brightness")
    with pytest.raises(ValueError, match="empty"):
        HealthyIntensityDensity(n_bins=4).score_table()
    with pytest.raises(FileNotFoundError, match="medanomaly train intensity"):
        _SCRIPTS.load_density("/nonexistent/models")
    assert _SCRIPTS.load_density("/nonexistent/models", required=False) is None


def _inference_config(**overrides) -> ConfigParser:
    parser = ConfigParser()
    parser.read_config(str(INTENSITY.config_file("inference")))
    parser.update(overrides)
    return parser


@pytest.mark.parametrize("contrast, rule, folder", [("T1w", "healthy_density", "models"),
                                                    ("T2w", "hyperintensity", "models/T2w"),
                                                    ("flair", "hyperintensity", "models/FLAIR")])
def test_contrast_picks_the_rule_and_the_shipped_statistics(contrast, rule, folder):
    parser = _inference_config(contrast=contrast)
    with bundle_scripts("intensity"):
        assert parser.get_parsed_content("rule") == rule
        assert Path(parser.get_parsed_content("model_dir")) == INTENSITY.root / folder
    switched = _inference_config(contrast=contrast, rule="hyperintensity")
    with bundle_scripts("intensity"):
        assert switched.get_parsed_content("method").rule == "hyperintensity"


def test_metadata_names_the_floor_role():
    assert INTENSITY.metadata["medanomaly_role"] == "floor"


def test_slicer_lists_the_floor_with_its_shipped_statistics(monkeypatch):
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1] / "MedAnomalyExtension"))
    from MedAnomalyLib import inference

    method = {m.name: m for m in inference.available_methods()}["intensity"]
    assert method.has_weights and method.threshold == INTENSITY.model_info["threshold"]
    for folder in (INTENSITY.model_dir, INTENSITY.model_dir / "T2w", INTENSITY.model_dir / "FLAIR"):
        info = json.loads((folder / "model_info.json").read_text())
        assert (folder / "model.pt").is_file() and 0 < info["threshold"] < 1
        assert folder.name in ("models", info["contrast"])


def test_cli_train_counts_then_calibrates_in_the_chosen_contrast(monkeypatch, tmp_path, capsys):
    from medanomaly import cli

    calls = []
    monkeypatch.setattr(cli, "run_workflow",
                        lambda bundle, workflow, overrides, demo, **kw: calls.append((workflow, overrides)))
    cli.main(["train", "intensity", "--contrast", "T2w", "--datalist", "tiny", "--output-dir", str(tmp_path)])
    assert [workflow for workflow, _ in calls] == ["train", "calibrate"]
    assert all(overrides["contrast"] == "T2w" and overrides["datalist"] == "tiny" for _, overrides in calls)
    assert calls[1][1]["model_dir"] == str(tmp_path / "models")
    assert f"--model-dir {tmp_path / 'models'} --contrast T2w" in capsys.readouterr().out


def _brain_fraction_above(out_dir: Path, items: list[dict], threshold: float) -> float:
    """Fraction of the brain voxels of `items` whose heatmap (as detections.json lists it) exceeds `threshold`."""
    heatmaps = {Path(r["input"]).resolve(): r["heatmap"] for r in json.loads((out_dir / "detections.json").read_text())}
    above = brain = 0
    for item in items:
        heatmap = io.read_volume(heatmaps[Path(item["image"]).resolve()], allow_constant=True)
        assert_same_grid(heatmap, io.read_volume(item["image"]))
        mask = io.volume_array(io.read_volume(item["mask"])) > 0.5
        above += int((io.volume_array(heatmap)[mask] > threshold).sum())
        brain += int(mask.sum())
    return above / brain


@pytest.mark.slow  # with `e2e`: run by `make test` (and CI) after the default suite
@pytest.mark.e2e
def test_bundle_trains_calibrates_infers_and_evaluates_on_t1w(tiny, tmp_path):
    common = {"datalist": str(tiny), "device": "cpu"}
    run_bundle("intensity", "train", {**common, "output_dir": str(tmp_path / "run"), "num_workers": 0})
    model_dir = tmp_path / "run" / "models"
    info = json.loads((model_dir / "model_info.json").read_text())
    assert info["contrast"] == "T1w" and info["training_volumes"] == len(load_datalist(tiny, "training"))
    density = _SCRIPTS.load_density(model_dir)
    assert density.counts.sum() == info["training_voxels"] > 0

    run_bundle("intensity", "calibrate", {**common, "model_dir": str(model_dir), "output_dir": str(tmp_path / "cal")})
    info = json.loads((model_dir / "model_info.json").read_text())
    threshold, target = info["threshold"], info["target_fpr"]
    assert 0 < threshold < 1 and info["calibration_volumes"] == 2

    # the calibrated threshold flags about target_fpr of the healthy validation brains, on their own grids
    out = tmp_path / "healthy"
    run_bundle("intensity", "inference", {**common, "model_dir": str(model_dir), "output_dir": str(out),
                                          "datalist_keys": "validation_healthy"})
    fraction = _brain_fraction_above(out, load_datalist(tiny, "validation_healthy"), threshold)
    assert 0.2 * target < fraction <= 1.05 * target

    run_bundle("intensity", "evaluate", {**common, "model_dir": str(model_dir), "output_dir": str(tmp_path / "eval"),
                                         "n_bootstrap": 20})
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert metrics["n_lesion_volumes"] == 3 and metrics["n_healthy_volumes"] == 2
    records = json.loads((tmp_path / "eval" / "detections.json").read_text())
    assert all("pseudo_healthy" not in r and Path(r["segmentation"]).is_file() for r in records)


@pytest.mark.slow  # two bundle processes per contrast, ~1.5 min each on 2 cores
@pytest.mark.parametrize("contrast", ["T2w", "FLAIR"])
def test_hyperintensity_beats_chance_on_bright_lesion_contrasts(tiny, tmp_path, contrast):
    datalist = tiny.parent / f"datalist_{contrast}.json"
    assert datalist.is_file(), f"the tiny cohort has no {contrast} datalist"
    common = {"datalist": str(datalist), "contrast": contrast, "device": "cpu", "model_dir": str(tmp_path / "models")}
    # no training: the hyperintensity rule needs no statistics, only a calibrated threshold
    run_bundle("intensity", "calibrate", {**common, "output_dir": str(tmp_path / "cal")})
    run_bundle("intensity", "evaluate", {**common, "output_dir": str(tmp_path / "eval"), "n_bootstrap": 20})
    pixel, prevalence = pixel_metrics(tmp_path / "eval" / "metrics.json")
    assert pixel["auroc"] > 0.6 and pixel["ap"] > 2 * prevalence
