"""The shared inference plumbing's small pieces: inputs, weights, thresholds, checkpoints."""

from __future__ import annotations

import json

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from medanomaly.bundles import engine
from medanomaly.bundles.outputs import output_paths, volume_name


def _write_volume(path):
    sitk.WriteImage(sitk.GetImageFromArray(np.random.rand(8, 9, 10).astype(np.float32)), str(path))
    return path


def test_inputs_from_a_file_a_folder_and_a_glob(tmp_path):
    a = _write_volume(tmp_path / "a.nii.gz")
    b = _write_volume(tmp_path / "b.nrrd")
    (tmp_path / "b_anomaly.seg.nrrd").write_text("not an input")
    assert engine.resolve_inputs(str(a)) == [{"image": str(a)}]
    assert [i["image"] for i in engine.resolve_inputs(str(tmp_path))] == [str(a), str(b)]
    assert [i["image"] for i in engine.resolve_inputs(str(tmp_path / "*.nrrd"))] == [str(b)]
    assert engine.resolve_inputs(str(a), mask=str(b)) == [{"image": str(a), "mask": str(b)}]
    with pytest.raises(ValueError, match="single input"):
        engine.resolve_inputs(str(tmp_path), mask=str(b))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        engine.resolve_inputs(str(tmp_path / "missing.nii.gz"))
    with pytest.raises(ValueError, match="Nothing to run on"):
        engine.resolve_inputs(None, None)


def test_inputs_from_a_datalist(tiny):
    items = engine.resolve_inputs(None, str(tiny), ["test_lesion", "test_healthy"])
    assert len(items) == 5 and all("label" in item for item in items)


def test_weights_load_with_errors_that_say_what_to_do(tmp_path):
    network = torch.nn.Linear(3, 2)
    with pytest.raises(FileNotFoundError, match="train the bundle first"):
        engine.load_weights(network, tmp_path)
    torch.save(torch.nn.Linear(3, 4).state_dict(), tmp_path / "model.pt")
    with pytest.raises(RuntimeError, match="demo.yaml"):
        engine.load_weights(network, tmp_path)
    trained = torch.nn.Linear(3, 2)
    torch.save({"model": trained.state_dict()}, tmp_path / "model.pt")  # CheckpointSaver's layout
    engine.load_weights(network, tmp_path)
    torch.testing.assert_close(network.weight, trained.weight)


def test_model_info_merges_and_threshold_falls_back_loudly(tmp_path, caplog):
    assert engine.load_threshold(tmp_path, default=0.3) == 0.3
    assert "No calibrated threshold" in caplog.text
    engine.update_model_info(tmp_path, variant="demo")
    engine.update_model_info(tmp_path, threshold=0.125)
    assert json.loads((tmp_path / "model_info.json").read_text()) == {"variant": "demo", "threshold": 0.125}
    assert engine.load_threshold(tmp_path) == 0.125


def test_resume_takes_the_final_then_the_newest_periodic_checkpoint(tmp_path):
    assert engine.latest_checkpoint(tmp_path) is None
    for epoch in (2, 10, 9):
        (tmp_path / f"checkpoint_epoch={epoch}.pt").write_bytes(b"")
    assert engine.latest_checkpoint(tmp_path).endswith("checkpoint_epoch=10.pt")
    (tmp_path / "checkpoint.pt").write_bytes(b"")
    assert engine.latest_checkpoint(tmp_path).endswith("checkpoint.pt")


def test_output_names_follow_the_input_name(tmp_path):
    assert volume_name("/x/sub-01_T1w.nii.gz") == "sub-01_T1w"
    assert volume_name("scan.seg.nrrd") == "scan"
    paths = output_paths(tmp_path, "scan", ".nrrd")
    assert paths["heatmap"].name == "scan_heatmap.nrrd"
    assert paths["segmentation"].name == "scan_anomaly.seg.nrrd"


def test_slice_inferer_reports_progress_per_batch():
    reports = []

    class Recorder:
        def update(self, done, total):
            reports.append((done, total))

    inferer = engine.ProgressSliceInferer(reporter=Recorder(), roi_size=(16, 16), sw_batch_size=4)
    out = inferer(torch.rand(1, 2, 16, 16, 10), lambda x: x * 2)
    assert out.shape == (1, 2, 16, 16, 10)
    assert reports == [(4, 10), (8, 10), (10, 10)]
