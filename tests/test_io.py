"""Tests for medanomaly.io: geometry round trips (oblique, anisotropic), DICOM, errors, Slicer segmentations."""

import logging

import numpy as np
import pytest
import SimpleITK as sitk
import slicerio
import torch
from monai.data import MetaTensor
from monai.transforms import LoadImage
from scipy.spatial.transform import Rotation

from medanomaly import io

from checks import assert_same_grid, write_dicom_series

# SWIG (itk, SimpleITK) objects trigger these on import; they are not ours to fix.
pytestmark = pytest.mark.filterwarnings("ignore:builtin type .* has no __module__ attribute:DeprecationWarning")

SIZE = (20, 24, 12)  # (x, y, z)
SPACING = (0.9, 1.3, 3.0)
ORIGIN = (-12.5, 30.25, 7.0)
FORMATS = [".nii.gz", ".nrrd", ".mha"]


def make_oblique_image(seed=0, dtype=np.float32):
    rng = np.random.default_rng(seed)
    array_zyx = rng.random(SIZE[::-1]).astype(dtype)
    image = sitk.GetImageFromArray(array_zyx)
    image.SetSpacing(SPACING)
    image.SetOrigin(ORIGIN)
    image.SetDirection(Rotation.random(random_state=seed + 1).as_matrix().ravel().tolist())
    return image


@pytest.fixture
def oblique_file(tmp_path, request):
    path = tmp_path / f"input{request.param}"
    sitk.WriteImage(make_oblique_image(), str(path))
    return path


@pytest.mark.parametrize("oblique_file", FORMATS, indirect=True)
def test_round_trip_oblique_anisotropic(oblique_file, tmp_path):
    on_disk = sitk.ReadImage(str(oblique_file))
    info = io.check_volume_file(oblique_file)
    assert info.size == SIZE
    np.testing.assert_allclose(info.spacing, on_disk.GetSpacing())
    np.testing.assert_allclose(info.direction, on_disk.GetDirection())

    image = io.read_volume(oblique_file)
    assert image.GetPixelID() == sitk.sitkFloat32 and image.GetDimension() == 3
    assert_same_grid(image, on_disk, atol=0)

    tensor = io.image_to_metatensor(image)
    assert isinstance(tensor, MetaTensor) and tuple(tensor.shape) == (1, *SIZE)
    np.testing.assert_array_equal(tensor[0].numpy(), io.volume_array(image))
    assert io.volume_array(image)[3, 5, 7] == image[3, 5, 7]  # (x, y, z) indexing, as SimpleITK's
    monai_tensor = LoadImage(reader="ITKReader", ensure_channel_first=True)(str(oblique_file))
    assert tuple(monai_tensor.shape) == tuple(tensor.shape)
    np.testing.assert_allclose(tensor.affine.numpy(), monai_tensor.affine.numpy(), atol=1e-10)
    np.testing.assert_array_equal(tensor.numpy(), monai_tensor.numpy())

    back = io.metatensor_to_image(tensor)
    assert_same_grid(back, image, atol=1e-10)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(back), sitk.GetArrayFromImage(image))

    # Outputs on the reference grid, with every kind of reference.
    values = tensor[0].numpy()
    mask = values > 0.7
    suffix = FORMATS[FORMATS.index("".join(oblique_file.suffixes))]
    outputs = {
        "heat_from_path": io.write_heatmap(values, oblique_file, tmp_path / "out" / f"heat_path{suffix}"),
        "heat_from_tensor": io.write_heatmap(tensor, tensor, tmp_path / "out" / f"heat_mt{suffix}"),
        "volume_from_image": io.write_volume(values, image, tmp_path / "out" / "deep" / f"vol{suffix}"),
    }
    for name, path in outputs.items():
        written = sitk.ReadImage(str(path))
        assert_same_grid(written, on_disk, atol=1e-5)
        assert written.GetPixelID() == sitk.sitkFloat32, name
        np.testing.assert_array_equal(sitk.GetArrayFromImage(written), sitk.GetArrayFromImage(image))
    assert "anomaly heatmap" in sitk.ReadImage(str(outputs["heat_from_path"])).GetMetaData("ITK_FileNotes")

    seg_path = io.write_segmentation(mask, tensor, tmp_path / "out" / "anomaly.seg.nrrd")
    seg = sitk.ReadImage(str(seg_path))
    assert_same_grid(seg, on_disk, atol=1e-5)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(seg), mask.transpose(2, 1, 0).astype(np.uint8))

    # Nothing but the outputs in the output directories (temporary files were renamed away).
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == sorted(
        ["anomaly.seg.nrrd", "deep", f"heat_path{suffix}", f"heat_mt{suffix}"])


def test_metatensor_to_image_exact_for_oblique_affine():
    image = make_oblique_image(seed=3)
    tensor = io.image_to_metatensor(image)
    for data in (tensor, tensor[0].as_tensor(), tensor[0].numpy()):
        back = io.metatensor_to_image(data, affine=tensor.affine)
        assert_same_grid(back, image, atol=1e-12)
        np.testing.assert_array_equal(sitk.GetArrayFromImage(back), sitk.GetArrayFromImage(image))
    with pytest.raises(ValueError, match="affine"):
        io.metatensor_to_image(np.zeros(SIZE))


def test_segmentation_is_a_named_coloured_slicer_segment(tmp_path):
    image = make_oblique_image(seed=5)
    mask = np.zeros(SIZE, dtype=bool)
    mask[4:9, 5:12, 3:6] = True
    path = io.write_segmentation(mask, image, tmp_path / "lesion.seg.nrrd", name="Lesion",
                                 color=(0.1, 0.6, 0.3), label_value=3)

    seg = slicerio.read_segmentation(str(path))
    (segment,) = seg["segments"]
    assert segment["name"] == "Lesion"
    np.testing.assert_allclose(segment["color"], (0.1, 0.6, 0.3))
    assert segment["labelValue"] == 3
    np.testing.assert_allclose(seg["ijkToLPS"], io._info_from_image(image).ijk_to_lps, atol=1e-6)
    np.testing.assert_array_equal(slicerio.segment_mask(seg, "Lesion"), mask)

    labels, segments = io.read_segmentation(path)
    assert labels.shape == SIZE
    np.testing.assert_array_equal(labels == 3, mask)
    assert segments[0]["name"] == "Lesion"

    with pytest.raises(ValueError, match=".seg.nrrd"):
        io.write_segmentation(mask, image, tmp_path / "lesion.nrrd")


def test_writer_rejects_wrong_shape_and_suffix_without_leaving_files(tmp_path):
    image = make_oblique_image()
    with pytest.raises(ValueError, match="reference grid"):
        io.write_volume(np.zeros((3, 4, 5)), image, tmp_path / "bad.nii.gz")
    with pytest.raises(ValueError, match="must end with"):
        io.write_volume(np.zeros(SIZE), image, tmp_path / "bad.png")
    assert list(tmp_path.iterdir()) == []


def make_dicom_image(depth, seed):
    rng = np.random.default_rng(seed)
    image = sitk.GetImageFromArray(rng.integers(0, 1000, (depth, 16, 12)).astype(np.int16))
    image.SetSpacing((0.8, 0.7, 2.5))
    image.SetOrigin((-10.0, 20.0, 5.0))
    image.SetDirection(Rotation.from_euler("xyz", [10, 20, 30], degrees=True).as_matrix().ravel().tolist())
    return image


def test_dicom_series_directory(tmp_path, caplog):
    original = make_dicom_image(depth=6, seed=0)
    write_dicom_series(original, tmp_path / "dicom", "1.2.3.4.5.1")

    info = io.check_volume_file(tmp_path / "dicom")
    assert info.size == (12, 16, 6)
    np.testing.assert_allclose(info.spacing, (0.8, 0.7, 2.5), atol=1e-5)

    image = io.read_volume(tmp_path / "dicom")
    assert_same_grid(image, original, atol=1e-5)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(image), sitk.GetArrayFromImage(original))
    np.testing.assert_allclose(info.spacing, image.GetSpacing(), atol=1e-6)
    monai_tensor = LoadImage(reader="ITKReader", ensure_channel_first=True)(str(tmp_path / "dicom"))
    np.testing.assert_allclose(io.image_to_metatensor(image).affine.numpy(), monai_tensor.affine.numpy(), atol=1e-6)

    # A second, smaller series in the same directory: the larger one is used, and the log says so.
    write_dicom_series(make_dicom_image(depth=3, seed=1), tmp_path / "dicom", "1.2.3.4.5.2")
    with caplog.at_level(logging.INFO, logger="medanomaly.io"):
        image = io.read_volume(tmp_path / "dicom")
    assert image.GetSize() == (12, 16, 6)
    assert "2 DICOM series" in caplog.text and "1.2.3.4.5.1" in caplog.text


def test_4d_with_single_volume_is_accepted_as_3d(tmp_path):
    array = np.random.default_rng(0).random((5, 6, 7)).astype(np.float32)  # (z, y, x)
    image = sitk.JoinSeries([sitk.GetImageFromArray(array)])  # 4D, size (7, 6, 5, 1)
    sitk.WriteImage(image, str(tmp_path / "single.mha"))
    assert sitk.ReadImage(str(tmp_path / "single.mha")).GetDimension() == 4
    assert io.check_volume_file(tmp_path / "single.mha").size == (7, 6, 5)
    volume = io.read_volume(tmp_path / "single.mha")
    assert volume.GetDimension() == 3
    np.testing.assert_array_equal(sitk.GetArrayFromImage(volume), array)


def _write(path, array):
    sitk.WriteImage(sitk.GetImageFromArray(array), str(path))
    return path


@pytest.mark.parametrize("case, pattern", [
    ("missing", "does not exist"),
    ("garbage", "could not be read as an image"),
    ("2d", "2D image"),
    ("4d", "4D image"),
    ("nan", "NaN or infinite"),
    ("constant", "constant"),
    ("single_slice", "single slice"),
    ("empty_dir", "no DICOM series"),
    ("vector", "components per voxel"),
    ("truncated", "truncated or damaged"),
])
def test_bad_inputs_raise_volume_error_naming_the_file(tmp_path, case, pattern):
    rng = np.random.default_rng(0)
    if case == "missing":
        path = tmp_path / "nope.nii.gz"
    elif case == "garbage":
        path = tmp_path / "garbage.nii.gz"
        path.write_bytes(rng.integers(0, 256, 2000, dtype=np.uint8).tobytes())
    elif case == "2d":
        path = _write(tmp_path / "flat.nrrd", rng.random((8, 9)).astype(np.float32))
    elif case == "4d":
        path = tmp_path / "time.nii.gz"
        volume = sitk.GetImageFromArray(rng.random((4, 5, 6)).astype(np.float32))
        sitk.WriteImage(sitk.JoinSeries([volume] * 3), str(path))
    elif case == "nan":
        array = rng.random((4, 5, 6)).astype(np.float32)
        array[1, 2, 3] = np.nan
        path = _write(tmp_path / "nan.nrrd", array)
    elif case == "constant":
        path = _write(tmp_path / "const.mha", np.full((4, 5, 6), 7, dtype=np.int16))
    elif case == "single_slice":
        path = _write(tmp_path / "one.nii.gz", rng.random((1, 5, 6)).astype(np.float32))
    elif case == "truncated":
        path = _write(tmp_path / "cut.mha", rng.random((40, 50, 60)).astype(np.float32))
        path.write_bytes(path.read_bytes()[:5000])
    elif case == "vector":
        path = tmp_path / "rgb.nrrd"
        sitk.WriteImage(sitk.GetImageFromArray(rng.random((4, 5, 6, 3)).astype(np.float32), isVector=True), str(path))
    else:
        path = tmp_path / "empty"
        path.mkdir()
    with pytest.raises(io.VolumeError, match=pattern) as err:
        io.read_volume(path)
    assert str(path) in str(err.value)
    if case == "constant":  # an empty label or mask is fine when asked for
        assert io.read_volume(path, allow_constant=True).GetSize() == (6, 5, 4)
    if case not in ("nan", "constant", "truncated"):  # header problems are found by the fast check too
        with pytest.raises(io.VolumeError, match=pattern):
            io.check_volume_file(path)


def test_image_to_metatensor_meta():
    tensor = io.image_to_metatensor(make_oblique_image(), source="x.nii.gz")
    assert tensor.dtype == torch.float32 and tensor.affine.dtype == torch.float64
    assert tensor.meta["space"] == "RAS" and tensor.meta["filename_or_obj"] == "x.nii.gz"
    np.testing.assert_array_equal(tensor.meta["spatial_shape"], SIZE)
