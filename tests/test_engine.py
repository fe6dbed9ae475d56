"""The shared inference plumbing's small pieces: inputs, weights, checkpoints."""

from __future__ import annotations

import json

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from medanomaly.bundles.handlers import CalibrationHandler, CohortMetricsHandler, collect_volume
from medanomaly.bundles.inputs import resolve_inputs
from medanomaly.bundles.method import ProgressSliceInferer
from medanomaly.bundles.model_info import update_model_info
from medanomaly.bundles.outputs import output_paths, volume_name
from medanomaly.bundles.predictions import PRED, supplied_brain_mask
from medanomaly.bundles.weights import latest_checkpoint, load_weights
from medanomaly.bundles.writing import SaveAnomalyOutputsd


def _write_volume(path):
    image = sitk.GetImageFromArray(np.random.rand(16, 18, 20).astype(np.float32))
    image.SetSpacing((3.0, 3.0, 3.0))  # large enough to analyse (io.check_input_volume)
    sitk.WriteImage(image, str(path))
    return path


def test_inputs_from_a_file_a_folder_and_a_glob(tmp_path):
    a = _write_volume(tmp_path / "a.nii.gz")
    b = _write_volume(tmp_path / "b.nrrd")
    (tmp_path / "b_anomaly.seg.nrrd").write_text("not an input")
    assert resolve_inputs(str(a)) == [{"image": str(a), "subject": "a"}]
    assert [i["image"] for i in resolve_inputs(str(tmp_path))] == [str(a), str(b)]
    assert [i["image"] for i in resolve_inputs(str(tmp_path / "*.nrrd"))] == [str(b)]
    assert resolve_inputs(str(a), mask=str(b)) == [{"image": str(a), "subject": "a", "mask": str(b)}]
    with pytest.raises(ValueError, match="single input"):
        resolve_inputs(str(tmp_path), mask=str(b))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        resolve_inputs(str(tmp_path / "missing.nii.gz"))
    with pytest.raises(ValueError, match="Nothing to run on"):
        resolve_inputs(None, None)


def test_inputs_from_a_datalist(tiny):
    items = resolve_inputs(None, str(tiny), ["test_lesion", "test_healthy"])
    assert len(items) == 5 and all("label" in item for item in items)


def test_weights_load_with_errors_that_say_what_to_do(tmp_path):
    network = torch.nn.Linear(3, 2)
    with pytest.raises(FileNotFoundError, match="train the bundle first"):
        load_weights(network, tmp_path)
    torch.save(torch.nn.Linear(3, 4).state_dict(), tmp_path / "model.pt")
    with pytest.raises(RuntimeError, match="demo.yaml"):
        load_weights(network, tmp_path)
    trained = torch.nn.Linear(3, 2)
    torch.save({"model": trained.state_dict()}, tmp_path / "model.pt")  # CheckpointSaver's layout
    load_weights(network, tmp_path)
    torch.testing.assert_close(network.weight, trained.weight)


def test_resume_takes_the_final_then_the_newest_periodic_checkpoint(tmp_path):
    assert latest_checkpoint(tmp_path) is None
    for epoch in (2, 10, 9):
        (tmp_path / f"checkpoint_epoch={epoch}.pt").write_bytes(b"")
    assert latest_checkpoint(tmp_path).endswith("checkpoint_epoch=10.pt")
    (tmp_path / "checkpoint.pt").write_bytes(b"")
    assert latest_checkpoint(tmp_path).endswith("checkpoint.pt")


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

    inferer = ProgressSliceInferer(reporter=Recorder(), roi_size=(16, 16), sw_batch_size=4)
    out = inferer(torch.rand(1, 2, 16, 16, 10), lambda x: x * 2)
    assert out.shape == (1, 2, 16, 16, 10)
    assert reports == [(4, 10), (8, 10), (10, 10)]


def _write_case(folder, spacing=1.2):
    """A small scan on an oblique-free 1.2 mm grid: a brain ball, a lesion at its edge."""
    folder.mkdir(parents=True, exist_ok=True)
    grid = np.stack(np.meshgrid(*(np.arange(n) for n in (30, 34, 26)), indexing="ij"), axis=-1)
    brain = np.linalg.norm(grid - (15, 17, 13), axis=-1) < 11.5
    lesion = brain & (np.linalg.norm(grid - (15, 17, 23), axis=-1) < 4)
    image = np.where(brain, 100 + 20 * np.random.default_rng(0).random(brain.shape) + 80 * lesion, 0)
    paths = {}
    for name, array in (("image", image), ("mask", brain), ("label", lesion)):
        volume = sitk.GetImageFromArray(np.transpose(array, (2, 1, 0)).astype(np.float32))
        volume.SetSpacing((spacing,) * 3)
        paths[name] = str(folder / f"{name}.nii.gz")
        sitk.WriteImage(volume, paths[name])
    return paths, int(brain.sum()), int(lesion.sum())


def _inverted_prediction(item, pixdim, image_size, fill):
    """What a bundle's postprocessing hands the handlers: a prediction made on the model grid of
    `pixdim` / `image_size`, inverted to the input grid together with the brain mask."""
    from monai.data import MetaTensor
    from monai.transforms import Invertd

    from medanomaly.data import preprocessing

    transform = preprocessing(pixdim=pixdim, image_size=image_size)
    data = transform(dict(item))
    data["pred"] = MetaTensor(fill(data["image"]), affine=data["image"].affine, meta=dict(data["image"].meta))
    data["pred"].applied_operations = list(data["image"].applied_operations)
    return Invertd(keys=["pred", "mask"], transform=transform, orig_keys=["image", "mask"],
                   nearest_interp=[False, True])(data)


@pytest.mark.parametrize("supply_mask", [True, False])
def test_every_model_grid_is_scored_on_the_supplied_voxels(tmp_path, supply_mask):
    """Two methods with different model grids (and one scoring NaN) evaluate the same brain and
    lesion voxels: those of the supplied mask and label on the input grid, not the mask after its
    round trip through each model grid (which loses edge voxels differently)."""
    from medanomaly.metrics import CohortEvaluator

    paths, n_brain, n_lesion = _write_case(tmp_path)
    item = {"image": paths["image"], "label": paths["label"], "subject": "s1"}
    if supply_mask:
        item["mask"] = paths["mask"]
    methods = {"fine": ((1.2, 1.2, 1.2), (32, 32), lambda x: torch.cat([x, x])),
               "coarse": ((3.0, 3.0, 3.0), (8, 8), lambda x: torch.cat([torch.full_like(x, float("nan")), x]))}
    counts = {}
    for name, (pixdim, size, fill) in methods.items():
        inverted = _inverted_prediction(item, pixdim, size, fill)
        evaluator = CohortEvaluator(n_bins=100)
        collect_volume(evaluator, inverted)
        row = evaluator.per_volume()[0]
        counts[name] = (row["n_brain_voxels"], row["n_lesion_voxels"])
        assert row["lesion_ml"] == pytest.approx(n_lesion * 1.2**3 / 1000, abs=1e-4)  # voxels x voxel volume
        if name == "coarse":
            assert (inverted["mask"] > 0.5).sum() < n_brain  # the round trip did lose voxels
            assert evaluator.records[0].histogram.pos_counts[0] == n_lesion  # NaN scores count as 0
    assert counts == {"fine": (n_brain, n_lesion), "coarse": (n_brain, n_lesion)}


def test_a_mask_off_the_input_grid_is_refused(tmp_path):
    paths, _, _ = _write_case(tmp_path)
    sitk.WriteImage(sitk.GetImageFromArray(np.ones((5, 5, 5), np.float32)), str(tmp_path / "small.nii.gz"))
    inverted = _inverted_prediction({"image": paths["image"], "mask": paths["mask"]}, (3.0, 3.0, 3.0), (8, 8),
                                    lambda x: torch.cat([x, x]))
    inverted["mask"].meta["filename_or_obj"] = str(tmp_path / "small.nii.gz")  # a mask of another grid
    with pytest.raises(Exception, match="is not on the grid"):
        supplied_brain_mask(inverted)


def test_calibration_stores_the_threshold_that_flags_at_most_the_target_fraction_of_healthy_voxels(tmp_path):
    from medanomaly.metrics import CohortEvaluator

    rng = np.random.default_rng(0)
    evaluator = CohortEvaluator(n_bins=1000)
    maps = []
    for i in range(3):
        heatmap = rng.beta(2, 8, size=(20, 20, 10)).astype(np.float32)
        brain = np.zeros_like(heatmap, dtype=bool)
        brain[2:18, 2:18, 1:9] = True
        evaluator.add_volume(f"h{i}", heatmap, np.zeros_like(brain), brain)
        maps.append(heatmap[brain])
    handler = CalibrationHandler(evaluator, str(tmp_path), target_fpr=0.01, fields={"backbone": "x"})
    handler._write(engine=None)
    info = json.loads((tmp_path / "model_info.json").read_text())
    healthy = np.concatenate(maps)
    flagged = float((healthy >= info["threshold"]).mean())
    one_bin_lower = float((healthy >= info["threshold"] - 1e-3).mean())
    # at most 1 % flagged, and the threshold is the smallest such bin edge (one bin lower flags more than 1 %)
    assert flagged <= 0.01 < one_bin_lower
    assert info["target_fpr"] == 0.01 and info["calibration_volumes"] == 3 and info["backbone"] == "x"


def test_the_pseudo_healthy_image_is_written_in_the_inputs_intensities_inside_the_brain():
    from monai.data import MetaTensor

    from medanomaly.data.transforms import INTENSITY_HIGH, INTENSITY_LOW

    reconstruction = torch.rand(4, 5, 6)
    image = MetaTensor(torch.zeros(1, 4, 5, 6), meta={INTENSITY_LOW: 100.0, INTENSITY_HIGH: 500.0})
    brain = np.zeros((4, 5, 6), dtype=bool)
    brain[1:3, 1:4, 2:5] = True
    d = {PRED: torch.stack([torch.zeros(4, 5, 6), reconstruction]), "image": image}
    out = SaveAnomalyOutputsd._scanner_intensities(d, brain)
    expected = (100.0 + 400.0 * reconstruction.numpy()) * brain  # [0, 1] back to the scanner's window
    np.testing.assert_allclose(out, expected, rtol=1e-6)
    assert torch.equal(d[PRED][1], reconstruction)  # the prediction itself is untouched


def test_metrics_record_the_weights_they_evaluated(tmp_path):
    """A variant's weights sit in their own folder (sagan's models/brainomaly): metrics.json says which
    weights were evaluated, so the benchmark's row reads that model_info, not the bundle's default one."""
    from types import SimpleNamespace

    from medanomaly.metrics import CohortEvaluator

    weights = tmp_path / "models" / "brainomaly"
    update_model_info(weights, model="brainomaly", train_seconds=713.4)
    evaluator = CohortEvaluator(n_bins=100)
    heatmap = np.random.default_rng(0).random((8, 8, 4)).astype(np.float32)
    label = np.zeros_like(heatmap, dtype=bool)
    label[2:4, 2:4, 1:3] = True
    evaluator.add_volume("s1", heatmap, label, np.ones_like(label))
    handler = CohortMetricsHandler(evaluator, str(tmp_path / "eval"), n_boot=5, model_dir=str(weights))
    handler.started = 0.0
    handler._write(SimpleNamespace(state=SimpleNamespace(device="cpu")))
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert metrics["model_info"] == {"model": "brainomaly", "train_seconds": 713.4}
