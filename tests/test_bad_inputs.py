"""Bad, damaged and adversarial inputs, full disks, crashes and concurrent runs.

Each test is one kind of case a user can meet. It asserts that the run stops (or the library
raises) with a message naming the problem and the file, and that nothing earlier is lost, left
half-written or reported wrongly. Most cases are checked where they are decided (io, engine,
runner, CLI argument checks) so they run in seconds; a few go through the whole command.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from monai.transforms import LoadImage

from medanomaly import io
from medanomaly.bundles import BundleProcess, BundleRunError, ConfigText, bundle_command, find_bundle, list_bundles
from medanomaly.bundles.handlers import CohortMetricsHandler
from medanomaly.bundles.inputs import resolve_inputs
from medanomaly.bundles.model_info import load_threshold
from medanomaly.bundles.outputs import OutputFolderBusyError, lock_output_dir
from medanomaly.bundles.registry import BUNDLE_PATH_ENV, BundleNotFound
from medanomaly.data import load_datalist

from checks import write_dicom_series

HAS_DAE_WEIGHTS = find_bundle("dae").has_weights


def medanomaly(*args: str, cwd: Path | None = None, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "medanomaly.cli", *args], capture_output=True, text=True, cwd=cwd,
                          env={**os.environ, **(env or {})}, timeout=600)


def brain_volume(size=(48, 48, 32), spacing=(2.0, 2.0, 2.0), origin=(0.0, 0.0, 0.0), seed=0) -> sitk.Image:
    """A blob of tissue in an empty field: a minimal scan that passes every check."""
    rng = np.random.default_rng(seed)
    z, y, x = np.meshgrid(*(np.linspace(-1, 1, n) for n in size[::-1]), indexing="ij")
    array = ((x**2 + y**2 + z**2) < 0.6).astype(np.float32) * (100 + 10 * rng.random(size[::-1]).astype(np.float32))
    image = sitk.GetImageFromArray(array)
    image.SetSpacing(spacing)
    image.SetOrigin(origin)
    return image


def with_voxel(image: sitk.Image, index_zyx: tuple, value: float) -> sitk.Image:
    array = sitk.GetArrayFromImage(image)
    array[index_zyx] = value
    changed = sitk.GetImageFromArray(array)
    changed.CopyInformation(image)
    return changed


def write(image: sitk.Image, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(image, str(path), useCompression=path.name.endswith(".gz"))
    return path


# --------------------------------------------------------------------------- damaged files
def test_truncated_nifti_gz_is_refused_not_zero_filled(tmp_path):
    path = write(brain_volume(), tmp_path / "scan.nii.gz")
    path.write_bytes(path.read_bytes()[: path.stat().st_size * 2 // 3])
    with pytest.raises(io.VolumeError, match="damaged") as err:
        io.read_volume(path)
    assert str(path) in str(err.value)


def test_corrupt_gzip_stream_of_a_nifti_is_refused(tmp_path):
    path = write(brain_volume(), tmp_path / "scan.nii.gz")
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF  # a flipped byte inside the deflate stream: CRC or stream error
    path.write_bytes(bytes(data))
    with pytest.raises(io.VolumeError, match="damaged|could not be read") as err:
        io.read_volume(path)
    assert str(path) in str(err.value)


def test_truncated_uncompressed_nifti_is_refused_with_byte_counts(tmp_path):
    path = write(brain_volume(), tmp_path / "scan.nii")
    full = path.stat().st_size
    path.write_bytes(path.read_bytes()[: full - 4000])
    with pytest.raises(io.VolumeError, match=f"truncated: it holds {full - 4000} bytes .* needs {full}"):
        io.read_volume(path)


# --------------------------------------------------------------------------- voxel checks
@pytest.mark.parametrize("value, name", [(np.nan, "nan"), (np.inf, "inf"), (-np.inf, "minus_inf")])
def test_non_finite_voxels_in_nrrd_are_refused_by_the_bundle_reader(tmp_path, value, name):
    path = write(with_voxel(brain_volume(), (10, 20, 20), value), tmp_path / f"{name}.nrrd")
    with pytest.raises(io.VolumeError, match="1 NaN or infinite") as err:
        LoadImage(reader=io.VolumeReader())(str(path))  # what every bundle's preprocessing reads with
    assert str(path) in str(err.value)


def test_constant_image_is_refused_but_an_empty_mask_is_read(tmp_path):
    path = write(sitk.Image(48, 48, 32, sitk.sitkFloat32), tmp_path / "blank.nii.gz")
    with pytest.raises(io.VolumeError, match="constant"):
        LoadImage(reader=io.VolumeReader())(str(path))
    assert LoadImage(reader=io.VolumeReader(allow_constant=True))(str(path)).sum() == 0


@pytest.mark.parametrize("size, spacing", [((5, 5, 5), (1.0, 1.0, 1.0)), ((96, 96, 3), (1.0, 1.0, 1.0)),
                                           ((20, 20, 20), (1.0, 1.0, 1.0))])
def test_volumes_too_small_to_hold_a_brain_are_refused(tmp_path, size, spacing):
    path = write(brain_volume(size, spacing), tmp_path / "small.nii.gz")
    with pytest.raises(io.VolumeError, match="too small to analyse") as err:
        io.check_input_volume(path)
    assert str(size) in str(err.value)


def test_a_thick_slice_clinical_volume_is_not_too_small(tmp_path):
    path = write(brain_volume((64, 64, 24), (3.0, 3.0, 5.0)), tmp_path / "thick.nii.gz")
    assert io.check_input_volume(path).size == (64, 64, 24)


def test_detect_inputs_are_checked_voxel_by_voxel_before_any_model_loads(tmp_path):
    good = write(brain_volume(), tmp_path / "good.nii.gz")
    bad = write(with_voxel(brain_volume(), (5, 5, 5), np.nan), tmp_path / "bad.nrrd")
    with pytest.raises(io.VolumeError, match="NaN") as err:
        resolve_inputs([str(good), str(bad)])
    assert "bad.nrrd" in str(err.value)


# --------------------------------------------------------------------------- masks on another grid
@pytest.mark.parametrize("change", ["shifted_40mm", "other_spacing", "rotated", "other_size"])
def test_a_mask_on_another_physical_grid_is_refused(tmp_path, change):
    image = write(brain_volume(), tmp_path / "scan.nii.gz")
    mask_image = sitk.Cast(brain_volume() > 50, sitk.sitkUInt8)
    if change == "shifted_40mm":
        mask_image.SetOrigin((40.0, 0.0, 0.0))
    elif change == "other_spacing":
        mask_image.SetSpacing((2.0, 2.0, 2.2))
    elif change == "rotated":
        mask_image.SetDirection((0.0, -1.0, 0.0, 1.0, 0.0, 0.0, 0.0, 0.0, 1.0))
    else:
        mask_image = sitk.Cast(brain_volume((48, 48, 30)) > 50, sitk.sitkUInt8)
    mask = write(mask_image, tmp_path / "mask.nii.gz")
    with pytest.raises(io.VolumeError, match="not on the grid") as err:
        resolve_inputs(str(image), mask=str(mask))
    assert "mask.nii.gz" in str(err.value) and "Resample" in str(err.value)


def test_a_mask_within_the_documented_tolerance_is_accepted(tmp_path):
    image = write(brain_volume(), tmp_path / "scan.nii.gz")
    mask_image = sitk.Cast(brain_volume() > 50, sitk.sitkUInt8)
    mask_image.SetOrigin((io.GRID_TOLERANCE_MM / 2, 0.0, 0.0))  # float noise of a resampling tool
    mask = write(mask_image, tmp_path / "mask.nii.gz")
    assert resolve_inputs(str(image), mask=str(mask))[0]["mask"] == str(mask)


# --------------------------------------------------------------------------- DICOM
def test_dicom_folder_with_two_series_is_read_as_one_series_by_every_reader(tmp_path):
    folder = tmp_path / "dicom"
    write_dicom_series(brain_volume((40, 40, 8), seed=1), folder, "1.2.3.1")  # smaller, listed first
    write_dicom_series(brain_volume((40, 40, 24), seed=2), folder, "1.2.3.2")
    chosen = io.read_volume(folder)
    assert chosen.GetSize() == (40, 40, 24)
    loaded = LoadImage(reader=io.VolumeReader(), ensure_channel_first=True)(str(folder))  # the bundles' reader
    assert tuple(loaded.shape[1:]) == chosen.GetSize()
    np.testing.assert_array_equal(loaded[0].numpy(), io.volume_array(chosen))
    assert io.check_volume_file(folder).size == chosen.GetSize()  # and the outputs' writer


def test_dicom_series_with_a_missing_slice_is_refused_not_stretched(tmp_path):
    folder = tmp_path / "dicom"
    write_dicom_series(brain_volume((40, 40, 24)), folder, "1.2.3.9", skip=11)
    with pytest.raises(io.VolumeError, match="uneven slice spacing") as err:
        io.read_volume(folder)
    assert str(folder) in str(err.value) and "missing" in str(err.value)


# --------------------------------------------------------------------------- output names and folders
def test_same_file_name_in_two_folders_gets_two_output_names(tmp_path):
    a = write(brain_volume(seed=1), tmp_path / "a" / "scan.nii.gz")
    b = write(brain_volume(seed=2), tmp_path / "b" / "scan.nii.gz")
    other = write(brain_volume(seed=3), tmp_path / "b" / "t2.nii.gz")
    items = resolve_inputs([str(a), str(b), str(other)])
    assert [item["subject"] for item in items] == ["a_scan", "b_scan", "t2"]


def test_the_same_input_twice_is_an_error(tmp_path):
    a = write(brain_volume(), tmp_path / "scan.nii.gz")
    with pytest.raises(ValueError, match="given twice"):
        resolve_inputs([str(a), str(tmp_path / "." / "scan.nii.gz")])


def test_a_folder_input_skips_earlier_outputs_and_hidden_temporary_files(tmp_path):
    scan = write(brain_volume(), tmp_path / "scan.nii.gz")
    for name in ("scan_heatmap.nii.gz", "scan_pseudo_healthy.nrrd", ".scan_heatmap.nii.gz.1a2b.tmp.nii.gz",
                 ".hidden.nii.gz"):
        write(brain_volume(), tmp_path / name)
    io.write_segmentation(np.zeros((48, 48, 32), np.uint8), str(scan), tmp_path / "scan_anomaly.seg.nrrd")
    assert [item["image"] for item in resolve_inputs(str(tmp_path))] == [str(scan)]


def test_a_datalist_with_empty_splits_is_an_error_not_an_empty_run(tmp_path):
    datalist = tmp_path / "empty.json"
    datalist.write_text(json.dumps({"test_lesion": [], "test_healthy": []}))
    with pytest.raises(ValueError, match="no volumes under 'test_lesion', 'test_healthy'"):
        resolve_inputs(datalist=str(datalist), keys=["test_lesion", "test_healthy"])


@pytest.mark.parametrize("content, error, message", [
    ("not json {", ValueError, "is not valid JSON"),
    ("[1, 2]", ValueError, "must hold a JSON object"),
    ('{"training": []}', KeyError, "no split 'test_lesion'"),
    ('{"test_lesion": [{"mask": "m.nii.gz"}]}', ValueError, "must be an object with an 'image' path"),
    ('{"test_lesion": [{"image": 5}]}', ValueError, "'image' must be a file path, got 5"),
    ('{"test_lesion": [{"image": "scan.nii.gz", "label": ""}]}', ValueError, "'label' must be a file path"),
    ('{"test_lesion": [{"image": "nowhere/scan.nii.gz", "subject": "s1"}]}', FileNotFoundError,
     "do not exist .* the image of s1"),
])
def test_malformed_datalists_are_named_before_any_volume_is_read(tmp_path, content, error, message):
    write(brain_volume(), tmp_path / "scan.nii.gz")
    datalist = tmp_path / "cohort.json"
    datalist.write_text(content)
    with pytest.raises(error, match=message):
        resolve_inputs(datalist=str(datalist), keys="test_lesion")


# --------------------------------------------------------------------------- full disks, read-only folders
@contextmanager
def small_filesystem(path: Path, size_kb: int):
    """A tmpfs of `size_kb` at `path` (needs mount rights; the test is skipped otherwise)."""
    path.mkdir(parents=True, exist_ok=True)
    try:
        result = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_kb}k", "tmpfs", str(path)],
                                capture_output=True, text=True)
    except OSError as err:  # no mount command
        pytest.skip(f"cannot mount a small tmpfs here ({err})")
    if result.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here ({result.stderr.strip() or 'mount failed'})")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], capture_output=True)


def fill(folder: Path, leave_bytes: int) -> None:
    """Fills the file system of `folder` until about `leave_bytes` are free."""
    free = shutil.disk_usage(folder).free
    with open(folder / "filler.bin", "wb") as f:
        f.write(b"\0" * max(0, free - leave_bytes))


def noise_volume(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).random((48, 48, 32)).astype(np.float32)  # compresses badly: ~290 KB


def test_heatmap_on_a_full_disk_raises_and_keeps_the_earlier_file(tmp_path):
    reference = brain_volume()
    with small_filesystem(tmp_path / "disk", 1024) as disk:
        target = disk / "scan_heatmap.nii.gz"
        io.write_heatmap(np.zeros((48, 48, 32), np.float32), reference, target)
        before = target.read_bytes()
        fill(disk, leave_bytes=40_000)
        with pytest.raises(io.OutputWriteError, match="disk full") as err:
            io.write_heatmap(noise_volume(0), reference, target)
        assert str(target) in str(err.value) and "earlier file is kept" in str(err.value)
        assert target.read_bytes() == before
        assert sorted(p.name for p in disk.iterdir()) == ["filler.bin", "scan_heatmap.nii.gz"]  # no temp file


@pytest.mark.parametrize("fmt", [".nrrd", ".mha"])
def test_volumes_in_other_formats_on_a_full_disk_raise(tmp_path, fmt):
    with small_filesystem(tmp_path / "disk", 512) as disk:
        fill(disk, leave_bytes=30_000)
        with pytest.raises(io.OutputWriteError):
            io.write_volume(noise_volume(1), brain_volume(), disk / f"pseudo{fmt}")
        assert sorted(p.name for p in disk.iterdir()) == ["filler.bin"]


def test_segmentation_on_a_full_disk_raises_and_leaves_nothing(tmp_path):
    with small_filesystem(tmp_path / "disk", 256) as disk:
        fill(disk, leave_bytes=2_000)
        mask = np.random.default_rng(0).random((48, 48, 32)) > 0.5  # compresses to ~10 KB
        with pytest.raises(io.OutputWriteError):
            io.write_segmentation(mask, brain_volume(), disk / "scan_anomaly.seg.nrrd")
        assert sorted(p.name for p in disk.iterdir()) == ["filler.bin"]


def test_json_summary_on_a_full_disk_raises_and_keeps_the_earlier_summary(tmp_path):
    with small_filesystem(tmp_path / "disk", 256) as disk:
        target = io.write_json(disk / "detections.json", [{"subject": "a", "volume_score": 0.1}])
        before = target.read_text()
        fill(disk, leave_bytes=1_000)
        with pytest.raises(io.OutputWriteError, match="detections.json"):
            io.write_json(target, [{"subject": f"s{i}", "volume_score": i / 7} for i in range(5000)])
        assert target.read_text() == before


def test_writing_into_a_read_only_file_system_raises_naming_the_file(tmp_path):
    with small_filesystem(tmp_path / "disk", 256) as disk:
        subprocess.run(["mount", "-o", "remount,ro", str(disk)], check=True)
        with pytest.raises(io.OutputWriteError, match="scan_heatmap.nii.gz"):
            io.write_heatmap(np.zeros((48, 48, 32), np.float32), brain_volume(), disk / "scan_heatmap.nii.gz")


def test_json_outputs_are_strict_json_with_non_finite_numbers_as_null(tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="medanomaly.io"):
        path = io.write_json(tmp_path / "metrics.json", {"auroc": float("nan"), "curve": [1.0, float("inf")]})
    strict = json.loads(path.read_text(), parse_constant=lambda name: pytest.fail(f"{name} in strict JSON"))
    assert strict == {"auroc": None, "curve": [1.0, None]}
    assert "metrics.json.auroc" in caplog.text and "metrics.json.curve[1]" in caplog.text


def test_an_uncalibrated_null_threshold_falls_back_with_a_warning(tmp_path, caplog):
    io.write_json(tmp_path / "model_info.json", {"threshold": float("inf")})
    with caplog.at_level(logging.WARNING):
        assert load_threshold(tmp_path, default=0.5) == 0.5
    assert "No calibrated threshold" in caplog.text


def test_metrics_are_not_written_when_no_volume_was_evaluated(tmp_path):
    from medanomaly.metrics import CohortEvaluator

    handler = CohortMetricsHandler(CohortEvaluator(), str(tmp_path))
    with pytest.raises(ValueError, match="No volume was evaluated"):
        handler._write(engine=None)
    assert not (tmp_path / "metrics.json").exists()


# --------------------------------------------------------------------------- concurrent runs
@contextmanager
def another_run_holding(folder: Path):
    """A second process that holds the output-folder lock of `folder` until the block ends (killed)."""
    holder = subprocess.Popen(
        [sys.executable, "-c", "import time; from medanomaly.bundles.outputs import lock_output_dir; "
         f"lock_output_dir({str(folder)!r}); print('locked', flush=True); time.sleep(300)"],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        yield holder.pid
    finally:
        holder.kill()
        holder.wait()


def test_a_second_run_into_a_busy_output_folder_stops_and_a_killed_run_frees_it(tmp_path):
    with another_run_holding(tmp_path) as pid:
        with pytest.raises(OutputFolderBusyError, match=f"process {pid}.*{tmp_path.name}"):
            lock_output_dir(tmp_path)
    lock_output_dir(tmp_path)  # the system released the killed process's lock: no stale lock file blocks


# --------------------------------------------------------------------------- values reaching MONAI's config parser
def test_paths_and_names_reach_the_bundle_as_literals_never_as_code(tmp_path):
    """A file named like code, folders named like numbers, `@` and `%` references: the bundle
    receives exactly the strings given, and nothing is run."""
    config = tmp_path / "echo.json"
    config.write_text(json.dumps({"input": "", "output_dir": "", "tags": [], "keys": "",
                                  "run": ["$print(json.dumps([@input, @output_dir, @tags, @keys]))"],
                                  "imports": ["$import json"]}))
    values = {"input": '$open("pwned","w").nii.gz', "output_dir": "2024", "tags": ["301", "@input", "%x#y", "a b"],
              "keys": ConfigText("test_lesion")}
    from medanomaly.bundles.runner import _format_override

    args = [sys.executable, "-m", "monai.bundle", "run", "--config_file", str(config)]
    for key, value in values.items():
        args += [f"--{key}", _format_override(value)]
    result = subprocess.run(args, capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    echoed = json.loads(next(line for line in result.stdout.splitlines() if line.startswith("[")))
    assert echoed == ['$open("pwned","w").nii.gz', "2024", ["301", "@input", "%x#y", "a b"], "test_lesion"]
    assert not (tmp_path / "pwned").exists()


# --------------------------------------------------------------------------- damaged bundle files
@pytest.fixture
def broken_bundle(tmp_path, monkeypatch):
    root = tmp_path / "bundles" / "broken"
    shutil.copytree(find_bundle("dae").configs_dir, root / "configs")
    (root / "models").mkdir()
    (root / "models" / "model_info.json").write_text('{"variant": "demo", "threshold": 0.3')  # cut short
    monkeypatch.setenv(BUNDLE_PATH_ENV, str(tmp_path / "bundles"))
    return root


def test_a_damaged_model_info_is_named_and_the_bundle_skipped_in_listings(broken_bundle):
    with pytest.warns(UserWarning, match="Skipping bundle 'broken'.*model_info.json is damaged"):
        names = [b.name for b in list_bundles()]
    assert "broken" not in names and "dae" in names
    with pytest.raises(BundleNotFound, match="'broken' cannot be used.*model_info.json"):
        find_bundle("broken")


def test_list_and_detect_with_a_damaged_model_info_exit_cleanly(broken_bundle, tmp_path):
    env = {BUNDLE_PATH_ENV: str(broken_bundle.parent)}
    listing = medanomaly("list", env=env)
    assert listing.returncode == 0 and "dae" in listing.stdout and "broken" not in listing.stdout
    assert "model_info.json is damaged" in listing.stderr
    detect = medanomaly("detect", "broken", "scan.nii.gz", env=env)
    assert detect.returncode != 0 and "model_info.json is damaged" in detect.stderr
    assert "Traceback" not in detect.stderr


def test_the_slicer_method_list_still_shows_the_other_methods(broken_bundle):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "MedAnomalyExtension"))
    try:
        from MedAnomalyLib.inference import available_methods

        with pytest.warns(UserWarning, match="model_info.json is damaged"):
            names = [method.name for method in available_methods()]
    finally:
        sys.path.pop(0)
    assert "dae" in names and "broken" not in names


def test_a_damaged_metadata_json_is_skipped_too(broken_bundle):
    (broken_bundle / "models" / "model_info.json").write_text("{}")
    (broken_bundle / "configs" / "metadata.json").write_text("not json")
    with pytest.warns(UserWarning, match="metadata.json is damaged"):
        assert "broken" not in [b.name for b in list_bundles()]


# --------------------------------------------------------------------------- command-line checks before any work
@pytest.mark.parametrize("value, message", [("-1", "finite number >= 0"), ("nan", "finite number >= 0"),
                                            ("inf", "finite number >= 0"), ("abc", "not a number")])
def test_bad_thresholds_stop_before_the_bundle_starts(tmp_path, value, message):
    result = medanomaly("detect", "dae", str(tmp_path / "x.nii.gz"), "--threshold", value,
                        "--output-dir", str(tmp_path / "out"))
    assert result.returncode == 2 and message in result.stderr
    assert not (tmp_path / "out").exists()


def test_a_mistyped_setting_stops_with_the_closest_names(tmp_path):
    scan = write(brain_volume(), tmp_path / "scan.nii.gz")
    result = medanomaly("detect", "dae", str(scan), "--set", "treshold=0.2", "--output-dir", str(tmp_path / "out"))
    assert result.returncode != 0 and "Unknown setting for dae inference: 'treshold'" in result.stderr
    assert "did you mean threshold" in result.stderr and not (tmp_path / "out").exists()


def test_nested_settings_and_config_values_pass(tmp_path):
    from medanomaly.bundles.runner import check_override_keys

    check_override_keys("dae", "train", ["num_iterations", "train#dataloader#batch_size"])
    assert bundle_command("dae", "train", {"num_iterations": ConfigText("6000")})[-1] == "6000"  # a number, as written


def test_an_output_folder_that_is_a_file_stops_before_the_bundle_starts(tmp_path):
    scan = write(brain_volume(), tmp_path / "scan.nii.gz")
    (tmp_path / "out").write_text("I am a file")
    result = medanomaly("detect", "dae", str(scan), "--output-dir", str(tmp_path / "out"))
    assert result.returncode != 0 and "is a file" in result.stderr
    assert (tmp_path / "out").read_text() == "I am a file"
    assert "dae inference" not in result.stderr  # no progress bar: the bundle never started


def test_a_read_only_output_folder_stops_before_the_bundle_starts(tmp_path):
    scan = write(brain_volume(), tmp_path / "scan.nii.gz")
    with small_filesystem(tmp_path / "ro", 64) as disk:
        subprocess.run(["mount", "-o", "remount,ro", str(disk)], check=True)
        result = medanomaly("detect", "dae", str(scan), "--output-dir", str(disk / "out"))
    assert result.returncode != 0 and "cannot create the output folder" in result.stderr


def test_a_missing_input_stops_before_the_bundle_starts(tmp_path):
    result = medanomaly("detect", "dae", str(tmp_path / "nope.nii.gz"), "--output-dir", str(tmp_path / "out"))
    assert result.returncode != 0 and "nope.nii.gz does not exist" in result.stderr
    assert not (tmp_path / "out").exists()


def test_a_bundle_killed_by_a_signal_says_what_that_usually_means():
    process = BundleProcess([sys.executable, "-c", "import os, signal; os.kill(os.getpid(), signal.SIGKILL)"])
    with pytest.raises(BundleRunError, match="killed by SIGKILL: usually the system ran out of memory"):
        process.wait()


def test_undecodable_output_of_a_bundle_is_replaced_not_fatal():
    code = ("import sys; sys.stdout.buffer.write(b'bad \\xff\\xfe bytes\\n'); sys.stdout.flush(); "
            "print('x' * 100000); print('done')")
    process = BundleProcess([sys.executable, "-c", code])
    lines = list(process.lines(timeout=60))  # a dead reader thread would stop the lines here...
    try:
        assert process.process.wait(timeout=60) == 0  # ...and leave the bundle blocked on a full pipe
    finally:
        process.cancel(grace_seconds=1)
    assert lines[0] == "bad \ufffd\ufffd bytes" and lines[-1] == "done"


def test_a_bundle_terminated_by_sigterm_says_so():
    process = BundleProcess([sys.executable, "-c", "import os, signal; os.kill(os.getpid(), signal.SIGTERM)"])
    with pytest.raises(BundleRunError, match="killed by SIGTERM"):
        process.wait()


# --------------------------------------------------------------------------- through the whole command
@pytest.mark.skipif(not HAS_DAE_WEIGHTS, reason="the dae demo weights are not committed")
def test_detect_on_a_nan_volume_exits_non_zero_naming_it_and_prints_one_traceback_at_most(tmp_path):
    scan = write(with_voxel(brain_volume(), (3, 4, 5), np.nan), tmp_path / "nan_scan.nrrd")
    result = medanomaly("detect", "dae", str(scan), "--device", "cpu", "--output-dir", str(tmp_path / "out"))
    assert result.returncode != 0
    assert "nan_scan.nrrd' contains 1 NaN or infinite voxel" in result.stderr
    assert result.stderr.count("Traceback") <= 1 and result.stderr.count("VolumeError: ") <= 2
    assert not list((tmp_path / "out").glob("*heatmap*")) and not (tmp_path / "out" / "detections.json").exists()


@pytest.mark.skipif(not HAS_DAE_WEIGHTS, reason="the dae demo weights are not committed")
def test_evaluate_never_reports_an_earlier_runs_metrics(tmp_path):
    out = tmp_path / "eval"
    out.mkdir()
    (out / "metrics.json").write_text(json.dumps({"stale": True}))
    datalist = tmp_path / "empty.json"
    datalist.write_text(json.dumps({"test_lesion": [], "test_healthy": []}))
    result = medanomaly("evaluate", "dae", "--datalist", str(datalist), "--device", "cpu", "--output-dir", str(out))
    assert result.returncode != 0 and "no volumes under" in result.stderr
    assert "pooled [Dice]" not in result.stdout
    assert json.loads((out / "metrics.json").read_text()) == {"stale": True}  # an earlier result is not deleted either


@pytest.mark.slow
@pytest.mark.skipif(not HAS_DAE_WEIGHTS, reason="the dae demo weights are not committed")
def test_detect_on_a_full_disk_exits_non_zero_and_keeps_the_earlier_outputs(tiny, tmp_path):
    scan = load_datalist(tiny, "test_lesion")[0]["image"]
    with small_filesystem(tmp_path / "disk", 8192) as disk:
        first = medanomaly("detect", "dae", scan, "--device", "cpu", "--output-dir", str(disk))
        assert first.returncode == 0, first.stderr[-2000:]
        earlier = {p.name: p.read_bytes() for p in disk.iterdir() if p.is_file() and not p.name.startswith(".")}
        assert any(name.endswith("_heatmap.nii.gz") for name in earlier) and "detections.json" in earlier
        fill(disk, leave_bytes=20_000)
        second = medanomaly("detect", "dae", scan, "--device", "cpu", "--output-dir", str(disk), "--threshold", "0.01")
        assert second.returncode != 0 and "disk full" in second.stderr
        assert "volume score" not in second.stdout
        after = {p.name: p.read_bytes() for p in disk.iterdir() if p.is_file() and not p.name.startswith(".")}
        assert {k: v for k, v in after.items() if k != "filler.bin"} == earlier
        assert not [p for p in disk.iterdir() if ".tmp" in p.name]


@pytest.mark.slow
@pytest.mark.skipif(not HAS_DAE_WEIGHTS, reason="the dae demo weights are not committed")
def test_a_detection_into_a_folder_another_run_writes_stops_and_writes_nothing(tiny, tmp_path):
    scan = load_datalist(tiny, "test_lesion")[0]["image"]
    with another_run_holding(tmp_path) as pid:
        busy = medanomaly("detect", "dae", scan, "--device", "cpu", "--output-dir", str(tmp_path))
    assert busy.returncode != 0 and f"Another MedAnomaly run (process {pid})" in busy.stderr
    assert "volume score" not in busy.stdout and not [p for p in tmp_path.iterdir() if not p.name.startswith(".")]
    done = medanomaly("detect", "dae", scan, "--device", "cpu", "--output-dir", str(tmp_path))
    assert done.returncode == 0 and "volume score" in done.stdout
