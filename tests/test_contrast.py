"""MR contrasts: names, which contrast an input is, what the weights were trained on, and the
warning (or, strict, the error) when they differ."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import yaml
from ignite.engine import Engine
from monai.bundle import ConfigParser

from medanomaly.bundles import bundle_scripts, list_bundles
from medanomaly.bundles.contrast import check_input_contrasts, contrast_record, inputs_contrast, training_contrast
from medanomaly.bundles.handlers import ModelInfoHandler
from medanomaly.bundles.inputs import resolve_inputs
from medanomaly.bundles.model_info import shipped_contrasts, shipped_model_dir, update_model_info, weights_contrasts
from medanomaly.bundles.registry import repository_bundles
from medanomaly.data.contrast import CONTRASTS, check_contrast, check_contrasts, contrast_of_file, contrast_of_item

REPOSITORY_BUNDLES = repository_bundles()
REPOSITORY = sorted((b for b in list_bundles() if b.root.parent == REPOSITORY_BUNDLES), key=lambda b: b.name)
# the literature bundles, trained on one contrast through the `contrast` key (`supervised` trains on several)
SINGLE_CONTRAST = [b for b in REPOSITORY if b.name in ("cddpm", "dae", "phanes", "sagan", "scrps")]
LOGGER = "medanomaly.bundles.contrast"


def _volume(path: Path) -> Path:
    image = sitk.GetImageFromArray(np.random.default_rng(0).random((16, 24, 24), dtype=np.float32))
    image.SetSpacing((3.0, 3.0, 3.0))  # large enough to analyse (io.check_input_volume)
    sitk.WriteImage(image, str(path))
    return path


def _datalist(path: Path, **content) -> Path:
    path.write_text(json.dumps(content))
    return path


def _weights(folder: Path, contrast) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    update_model_info(folder, bundle="dae", contrast=contrast)
    return folder


def _mismatch_records(caplog) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name == LOGGER and r.levelno == logging.WARNING]


# --------------------------------------------------------------------------- names
def test_contrast_names_are_canonical_and_unknown_ones_refused():
    assert [check_contrast(n) for n in ("t1w", "T1", "t2", "FLAIR", "t2-flair", " flair ")] == \
        ["T1w", "T1w", "T2w", "FLAIR", "FLAIR", "FLAIR"]
    with pytest.raises(ValueError, match="Unknown contrast 'PD'.*T1w, T2w, FLAIR"):
        check_contrast("PD")
    assert check_contrasts("flair, t1w") == ("T1w", "FLAIR")  # canonical order, as CONTRASTS
    assert check_contrasts(["T2w", "t2", "T2W"]) == ("T2w",)
    assert check_contrasts("all") == CONTRASTS
    with pytest.raises(ValueError, match="at least one"):
        check_contrasts([])


def test_a_file_says_its_contrast_by_its_bids_suffix_only():
    assert contrast_of_file("/data/sub-01_T2w.nii.gz") == "T2w"
    assert contrast_of_file("sub-01_ses-1_flair.nrrd") == "FLAIR"
    assert contrast_of_file(Path("x/sub-01_T1w.mha")) == "T1w"
    assert contrast_of_file("/data/sub-01_T2w/scan.nii.gz") is None  # a folder's name says nothing
    assert contrast_of_file("brain_T2w_masked.nii.gz") is None
    assert contrast_of_file("scan.nii.gz") is None


def test_an_input_is_its_own_key_else_its_datalists_else_its_file_name():
    named = {"image": "/d/sub-01_T2w.nii.gz"}
    assert contrast_of_item(named) == "T2w"
    assert contrast_of_item(named, "flair") == "FLAIR"
    assert contrast_of_item({**named, "contrast": "t1"}, "FLAIR") == "T1w"
    assert contrast_of_item({"image": "/d/scan.nii.gz"}) is None


# --------------------------------------------------------------------------- inputs
def test_resolve_inputs_passes_the_contrast_to_resolve_datalist(tmp_path, monkeypatch):
    datalist = tmp_path / "datalist_T2w.json"
    _datalist(datalist, contrast="T2w", test_lesion=[{"image": "a.nii.gz"}, {"image": "b.nii.gz", "contrast": "FLAIR"}])
    for name in ("a.nii.gz", "b.nii.gz"):
        (tmp_path / name).write_bytes(b"")  # entries must name existing files
    calls = []
    from medanomaly.data import synth

    monkeypatch.setattr(synth, "resolve_datalist",
                        lambda name, contrast=None: calls.append((name, contrast)) or datalist)
    items = resolve_inputs(None, "demo", "test_lesion", contrast="T2w")
    assert calls == [("demo", "T2w")]
    # the datalist's top-level contrast goes into its entries; an entry's own wins
    assert [i["contrast"] for i in items] == ["T2w", "FLAIR"]


def test_file_inputs_carry_the_declared_contrast_only_when_given(tmp_path):
    scan = _volume(tmp_path / "scan.nii.gz")
    assert resolve_inputs(str(scan)) == [{"image": str(scan), "subject": "scan"}]
    assert resolve_inputs(str(scan), input_contrast="FLAIR") == [
        {"image": str(scan), "subject": "scan", "contrast": "FLAIR"}]


# --------------------------------------------------------------------------- shipped weights per contrast
def _shipped(folder: Path, contrast) -> Path:
    (_weights(folder, contrast) / "model.pt").write_bytes(b"")
    return folder


def test_the_shipped_weights_of_a_contrast_are_its_subfolder_else_the_default(tmp_path):
    root = _shipped(tmp_path / "models", "T2w")
    _shipped(root / "FLAIR", "FLAIR")
    _shipped(root / "brainomaly", "T2w")  # a variant's weights, not a contrast's
    _weights(root / "T1w", "T1w")  # no model.pt: nothing shipped for T1w
    assert shipped_model_dir(root, "FLAIR") == root / "FLAIR"
    assert shipped_model_dir(root, "T1w") == shipped_model_dir(root, None) == shipped_model_dir(root, "T2w") == root
    assert shipped_contrasts(root) == ("T2w", "FLAIR")
    assert shipped_contrasts(tmp_path / "absent") == ()


def test_the_inputs_contrast_is_theirs_when_they_agree_else_the_default():
    flair = [{"image": "/d/a_FLAIR.nii.gz"}, {"image": "/d/b.nii.gz", "contrast": "flair"}]
    assert inputs_contrast(flair, "T1w") == "FLAIR"
    assert inputs_contrast([*flair, {"image": "/d/c_T2w.nii.gz"}], "T1w") == "T1w"  # mixed
    assert inputs_contrast([*flair, {"image": "/d/scan.nii.gz"}], "T2w") == "T2w"  # one unknown
    assert inputs_contrast([], None) is None


@pytest.mark.parametrize("bundle", REPOSITORY, ids=lambda b: b.name)
def test_every_inference_config_picks_the_shipped_weights_of_the_inputs_contrast(bundle, tmp_path):
    """A FLAIR scan gets models/FLAIR/ where the bundle ships it (intensity: and the FLAIR rule); a
    scan of a contrast without its own weights gets models/."""
    root = _shipped(tmp_path / "models", "T2w")
    _shipped(root / "FLAIR", "FLAIR")
    for scan, expected in (("sub-01_FLAIR.nii.gz", root / "FLAIR"), ("sub-01_T1w.nii.gz", root)):
        parser = ConfigParser()
        parser.read_config(str(bundle.config_file("inference")))
        parser.update({"bundle_root": str(tmp_path), "inputs": [{"image": f"/d/{scan}"}]})
        with bundle_scripts(bundle):
            assert parser.get_parsed_content("model_dir") == str(expected)
            if bundle.name == "intensity":
                assert parser.get_parsed_content("rule") == ("hyperintensity" if "FLAIR" in scan else "healthy_density")


# --------------------------------------------------------------------------- the check
def test_one_warning_for_mismatching_inputs_naming_both_contrasts_and_the_file(tmp_path, caplog):
    weights = _weights(tmp_path / "models", "T1w")
    items = [{"image": "/d/sub-01_T1w.nii.gz"}, {"image": "/d/sub-02_T2w.nii.gz"},
             {"image": "/d/sub-03.nii.gz", "contrast": "FLAIR"}, {"image": "/d/unknown.nii.gz"}]
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        assert check_input_contrasts(items, weights) is items  # warns and goes on
    (record,) = _mismatch_records(caplog)
    message = record.getMessage()
    assert "trained on T1w" in message and "sub-02_T2w.nii.gz is T2w" in message
    assert "1 more input" in message and "dae" in message


def test_no_warning_for_matching_unknown_or_unrecorded_contrasts(tmp_path, caplog):
    t1 = _weights(tmp_path / "t1", "T1w")
    several = _weights(tmp_path / "several", ["T1w", "FLAIR"])
    unrecorded = tmp_path / "unrecorded"
    unrecorded.mkdir()
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        check_input_contrasts([{"image": "/d/sub-01_T1w.nii.gz"}, {"image": "/d/scan.nii.gz"}], t1)
        check_input_contrasts([{"image": "/d/a_FLAIR.nii.gz"}, {"image": "/d/b_T1w.nii.gz"}], several)
        check_input_contrasts([{"image": "/d/a_T2w.nii.gz"}], unrecorded)
    assert _mismatch_records(caplog) == []
    assert weights_contrasts(several) == ("T1w", "FLAIR") and weights_contrasts(unrecorded) == ()


def test_strict_raises_before_anything_runs(tmp_path):
    weights = _weights(tmp_path / "models", ["T1w", "T2w"])
    with pytest.raises(ValueError, match=r"trained on T1w/T2w, but input /d/x_FLAIR.nii.gz is FLAIR.*strict"):
        check_input_contrasts([{"image": "/d/x_FLAIR.nii.gz"}], weights, strict=True)
    check_input_contrasts([{"image": "/d/x_T2w.nii.gz"}], weights, strict=True)


@pytest.mark.parametrize("bundle", REPOSITORY, ids=lambda b: b.name)
def test_every_inference_config_checks_its_inputs_against_the_weights(bundle, tmp_path):
    """`data` of inference.yaml: a FLAIR input with T1w weights is an error with strict_contrast,
    raised while the config resolves its inputs (no network is built)."""
    scan = _volume(tmp_path / "sub-01_FLAIR.nii.gz")
    parser = ConfigParser()
    parser.read_config(str(bundle.config_file("inference")))
    parser.update({"input": str(scan), "model_dir": str(_weights(tmp_path / "models", "T1w")),
                   "strict_contrast": True})
    with bundle_scripts(bundle), pytest.raises(RuntimeError) as failure:  # MONAI wraps the expression's error
        parser.get_parsed_content("data")
    cause = failure.value
    while cause is not None and not isinstance(cause, ValueError):
        cause = cause.__cause__
    assert cause is not None and "input " in str(cause) and "sub-01_FLAIR.nii.gz is FLAIR" in str(cause)


# --------------------------------------------------------------------------- training records it
def _recorded_contrast(bundle, datalist: Path, contrast: str | None = None):
    """The "contrast" a bundle's train.yaml records in model_info.json (in its ModelInfoHandler's
    `fields`, or the trainer's `info`), resolved for `datalist`."""
    parser = ConfigParser()
    parser.read_config(str(bundle.config_file("train")))
    parser.update({"datalist": str(datalist), **({"contrast": contrast} if contrast else {})})
    path = _find_fields(parser.get())
    assert path, f"{bundle.name}'s train.yaml records no contrast next to its datalist"
    with bundle_scripts(bundle):
        return parser.get_parsed_content(f"{path}#contrast")


def _find_fields(config, path: str = "") -> str:
    """The id of the mapping in a config that records `datalist` and `contrast` for model_info.json."""
    if isinstance(config, dict) and {"datalist", "contrast"} <= set(config) and path.endswith(("fields", "info")):
        return path
    children = config.items() if isinstance(config, dict) else enumerate(config) if isinstance(config, list) else ()
    for key, value in children:
        found = _find_fields(value, f"{path}#{key}" if path else str(key))
        if found:
            return found
    return ""


@pytest.mark.parametrize("bundle", SINGLE_CONTRAST, ids=lambda b: b.name)
def test_training_records_the_datalists_contrast(bundle, tmp_path):
    flair = _datalist(tmp_path / "flair.json", contrast="FLAIR", training=[{"image": "a.nii.gz"}])
    assert _recorded_contrast(bundle, flair) == "FLAIR"
    assert _recorded_contrast(bundle, flair, contrast="T1w") == "FLAIR"  # what the datalist declares wins
    unnamed = _datalist(tmp_path / "unnamed.json", training=[{"image": "a.nii.gz"}])
    assert _recorded_contrast(bundle, unnamed, contrast="t2") == "T2w"  # else the config's contrast


def test_a_datalist_of_several_contrasts_records_them_all(tmp_path):
    mixed = _datalist(tmp_path / "mixed.json", training=[{"image": "a_FLAIR.nii.gz"}, {"image": "b_T1w.nii.gz"},
                                                          {"image": "c.nii.gz", "contrast": "T1w"}])
    assert training_contrast(mixed, "T2w") == ["T1w", "FLAIR"]
    assert contrast_record("t2") == "T2w"


def test_model_info_handler_writes_the_contrast(tmp_path):
    handler = ModelInfoHandler(str(tmp_path), {"bundle": "dae", "contrast": "T2w"})
    trainer = Engine(lambda engine, batch: [{"loss": 0.5}])
    handler.attach(trainer)
    trainer.run([0, 1], max_epochs=1)
    info = json.loads((tmp_path / "model_info.json").read_text())
    assert info["contrast"] == "T2w" and info["iterations_done"] == 2
    assert weights_contrasts(tmp_path) == ("T2w",)


# --------------------------------------------------------------------------- what the repository ships
@pytest.mark.parametrize("bundle", REPOSITORY, ids=lambda b: b.name)
def test_every_bundle_config_has_the_contrast_keys(bundle):
    inference = yaml.safe_load(bundle.config_file("inference").read_text())
    assert check_contrast(inference["contrast"]) and inference["strict_contrast"] is False
    assert "input_contrast" in inference
    if bundle in SINGLE_CONTRAST:
        assert check_contrast(yaml.safe_load(bundle.config_file("train").read_text())["contrast"])


def test_every_committed_model_info_records_a_contrast():
    infos = sorted(REPOSITORY_BUNDLES.glob("*/models/**/model_info.json"))
    assert len(infos) >= 5
    for path in infos:
        recorded = json.loads(path.read_text()).get("contrast")
        assert recorded, f"{path} has no \"contrast\""
        assert all(check_contrast(c) for c in ([recorded] if isinstance(recorded, str) else recorded))


# --------------------------------------------------------------------------- command line
def test_list_shows_the_weights_contrast():
    result = subprocess.run([sys.executable, "-m", "medanomaly.cli", "list"], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    dae = next(line for line in result.stdout.splitlines() if line.startswith("dae "))
    assert " T2w/FLAIR " in dae  # the shipped dae weights: T2w (models/) and FLAIR (models/FLAIR/)


def test_cli_passes_contrast_and_strict(monkeypatch, tmp_path):
    from medanomaly import cli

    calls = []
    monkeypatch.setattr(cli, "run_workflow",
                        lambda bundle, workflow, overrides, **kw: calls.append((workflow, overrides)) or time.time())
    scan = tmp_path / "scan.nii.gz"
    scan.write_bytes(b"")  # the command line checks that inputs exist; the bundle (not run here) reads them
    with pytest.raises(SystemExit, match="without writing"):  # detections.json: the workflow was not run
        cli.main(["detect", "dae", str(scan), "--contrast", "flair", "--strict", "--output-dir", str(tmp_path)])
    overrides = calls[-1][1]
    assert overrides["contrast"] == overrides["input_contrast"] == "FLAIR" and overrides["strict_contrast"] is True
    with pytest.raises(SystemExit, match="without writing"):  # metrics.json: the workflow was not run
        cli.main(["evaluate", "dae", "--contrast", "T2w", "--output-dir", str(tmp_path)])
    assert calls[-1][1]["contrast"] == "T2w" and "strict_contrast" not in calls[-1][1]
    cli.main(["train", "dae", "--contrast", "t2", "--datalist", "tiny", "--output-dir", str(tmp_path)])
    assert [(w, o["contrast"]) for w, o in calls[-2:]] == [("train", "T2w"), ("calibrate", "T2w")]
    with pytest.raises(SystemExit):
        cli.main(["detect", "dae", "scan.nii.gz", "--contrast", "PD"])


def test_train_passes_the_network_settings_on_to_calibration(monkeypatch, tmp_path):
    """A network changed with --set is calibrated as trained; training-only settings stay with training."""
    from medanomaly import cli

    calls = []
    monkeypatch.setattr(cli, "run_workflow",
                        lambda bundle, workflow, overrides, **kw: calls.append((workflow, overrides)) or time.time())
    cli.main(["train", "dae", "--datalist", "tiny", "--output-dir", str(tmp_path), "--set",
              "network_def#channels=[8, 16, 32, 64]", "--set", "init_from=/elsewhere", "--set", "num_iterations=5"])
    (_, train), (_, calibrate) = calls
    assert train["init_from"] == "/elsewhere" and train["num_iterations"] == "5"  # as given: MONAI parses it
    assert calibrate["network_def#channels"] == "[8, 16, 32, 64]" and "init_from" not in calibrate
    assert calibrate["model_dir"] == str(tmp_path / "models")


def test_slicer_method_shows_the_weights_contrast(monkeypatch):
    monkeypatch.syspath_prepend(str(REPOSITORY_BUNDLES.parent / "MedAnomalyExtension"))
    from MedAnomalyLib import inference

    dae = inference.method_by_name("dae")
    assert dae.contrast == "T2w/FLAIR" and "Trained on: T2w/FLAIR scans" in dae.tooltip


@pytest.mark.slow  # ~30 s on 2 busy cores: a bundle process starts
def test_detect_strict_stops_on_another_contrast_before_the_model_runs(tmp_path):
    """The whole path: `medanomaly detect --strict` on a T1w-named scan: dae ships T2w (models/) and
    FLAIR (models/FLAIR/) weights, none for T1w, so the default T2w weights are picked and refused."""
    scan = _volume(tmp_path / "sub-01_T1w.nii.gz")
    result = subprocess.run([sys.executable, "-m", "medanomaly.cli", "detect", "dae", str(scan), "--strict",
                             "--device", "cpu", "--output-dir", str(tmp_path / "out")],
                            capture_output=True, text=True, cwd=tmp_path)
    assert result.returncode != 0
    assert "trained on T2w" in result.stderr and "is T1w" in result.stderr
    assert not (tmp_path / "out" / "detections.json").exists()
