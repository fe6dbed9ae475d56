"""The brain-MRI transform chain: geometry, intensities, slicing and the way back."""

from __future__ import annotations

import os

import numpy as np
import SimpleITK as sitk
import torch
from monai.transforms import Invertd

from medanomaly import io
from medanomaly.data import axial_axis, brain_mask_from_image, intensity_window, preprocessing, random_axial_slices


def _oblique_volume(tmp_path, spacing=(1.1, 0.9, 2.5)):
    """A skull-stripped 'brain' (ellipsoid with a bright inner ellipsoid) on an oblique,
    anisotropic grid."""
    size = (120, 140, 60)
    grid = np.stack(np.meshgrid(*[np.arange(n) for n in size], indexing="ij"), -1).astype(float)
    centre = np.array(size) / 2
    radius = np.array([50, 60, 20])
    r = np.sqrt((((grid - centre) / radius) ** 2).sum(-1))
    brain = r < 1
    volume = np.where(brain, 300.0 + 500.0 * (r < 0.5), 0.0).astype(np.float32)
    image = sitk.GetImageFromArray(volume.transpose(2, 1, 0))
    image.SetSpacing(spacing)
    image.SetOrigin((-60.0, 20.0, 35.0))
    rotation = sitk.VersorTransform((0.2, 0.1, 1.0), 0.3).GetMatrix()
    image.SetDirection(rotation)
    path = tmp_path / "oblique.nrrd"
    sitk.WriteImage(image, str(path))
    return path, volume, brain


def test_preprocessing_outputs_model_grid(tmp_path):
    path, volume, brain = _oblique_volume(tmp_path)
    data = preprocessing(pixdim=(1.5, 1.5, 1.5), image_size=(128, 128))({"image": str(path)})
    image, mask = data["image"], data["mask"]
    assert image.shape[:3] == (1, 128, 128) and mask.shape == image.shape
    assert image.dtype == torch.float32
    assert float(image.min()) == 0.0 and float(image.max()) <= 1.0
    assert torch.all(image[mask == 0] == 0), "background must be exactly zero"
    spacing = np.linalg.norm(np.asarray(image.affine)[:3, :3], axis=0)
    np.testing.assert_allclose(spacing, 1.5, atol=1e-4)
    low, high = intensity_window(image)
    # 0.5th percentile sits on partial-volume edge voxels, 99.5th on the bright core
    assert 0 < low < 320 and 750 < high < 850


def test_inverse_brings_maps_back_to_the_input_grid(tmp_path):
    path, volume, brain = _oblique_volume(tmp_path)
    chain = preprocessing(pixdim=(1.5, 1.5, 1.5), image_size=(128, 128))
    data = chain({"image": str(path)})
    data["pred"] = data["mask"].clone()  # a 'map' equal to the brain mask
    back = Invertd(keys="pred", transform=chain, orig_keys="mask", nearest_interp=True)(data)["pred"]
    assert back.shape == (1, *volume.shape)
    reference = io.check_volume_file(path)
    np.testing.assert_allclose(np.asarray(back.affine), reference.affine, atol=1e-4)
    recovered = np.asarray(back[0]) > 0.5
    dice = 2 * (recovered & brain).sum() / (recovered.sum() + brain.sum())
    assert dice > 0.97


def test_random_axial_slices_pass_through_the_brain(tmp_path):
    path, _, _ = _oblique_volume(tmp_path)
    data = preprocessing(image_size=(128, 128))({"image": str(path)})
    indices, crop, squeeze = random_axial_slices(num_samples=6)
    crop.set_random_state(0)
    samples = crop(indices(data))
    assert len(samples) == 6
    for sample in samples:
        sliced = squeeze(sample)
        assert sliced["image"].shape == (1, 128, 128)
        assert sliced["mask"].sum() > 0


def test_brain_mask_from_skull_stripped_image():
    volume = np.zeros((40, 40, 40), np.float32)
    volume[10:30, 10:30, 10:30] = 100
    volume[18:22, 18:22, 18:22] = 0  # dark ventricle inside: filled
    volume[0, 0, 0] = 100  # isolated speck outside: dropped
    mask = brain_mask_from_image(volume)
    assert mask[20, 20, 20] and not mask[0, 0, 0]
    assert mask.sum() == 20**3


def test_axial_axis_follows_the_affine():
    assert axial_axis(np.eye(4)) == 2
    sagittal = np.array([[0, 0, 1, 0], [0, 1, 0, 0], [1, 0, 0, 0], [0, 0, 0, 1]], float)
    assert axial_axis(sagittal) == 0


# --- the persistent preprocessing cache ------------------------------------------------------

def _healthy_items(tiny, n=1):
    from medanomaly.bundles.inputs import resolve_inputs

    return resolve_inputs(datalist=str(tiny), keys="validation_healthy")[:n]


def test_persistent_cache_reuses_preprocessed_volumes_across_runs(tiny, tmp_path, monkeypatch):
    """A second dataset over the same items and chain reads the first one's files instead of
    preprocessing again (counted with a spy on the loader); the items equal a plain run's; a
    changed chain (spacing) or a replaced scan gets files of its own."""
    import shutil

    from monai.transforms import LoadImaged

    from medanomaly.data import PersistentCacheDataset

    cache = tmp_path / "cache"
    items = _healthy_items(tiny)
    chain = preprocessing(pixdim=[3.0] * 3, image_size=[64, 64])
    plain = chain(items[0])
    loads = []
    original = LoadImaged.__call__

    def counted(self, data, *a, **k):  # one count per item: the loader of the image (masks load apart)
        if "image" in self.keys:
            loads.append(1)
        return original(self, data, *a, **k)

    monkeypatch.setattr(LoadImaged, "__call__", counted)

    first = PersistentCacheDataset(items, chain, cache_dir=cache, num_workers=0, progress=False)
    assert len(loads) == 1 and len(list(cache.glob("*.pt"))) == 1
    second = PersistentCacheDataset(items, chain, cache_dir=cache, num_workers=0, progress=False)
    assert len(loads) == 1  # nothing preprocessed again
    for key in ("image", "mask"):
        torch.testing.assert_close(torch.as_tensor(second[0][key]), torch.as_tensor(plain[key]))
        torch.testing.assert_close(torch.as_tensor(second[0][key]), torch.as_tensor(first[0][key]))
    assert tuple(second[0]["image"].affine.shape) == (4, 4)  # metadata survives the disk
    from monai.data import list_data_collate

    list_data_collate([first[0], second[0]])  # a computed and a read-back item batch together

    PersistentCacheDataset(items, preprocessing(pixdim=[2.0] * 3, image_size=[64, 64]), cache_dir=cache,
                           num_workers=0, progress=False)
    assert len(loads) == 2 and len(list(cache.glob("*.pt"))) == 2  # a changed chain: its own files

    copy = dict(items[0], image=str(shutil.copy(items[0]["image"], tmp_path / "scan.nii.gz")))
    PersistentCacheDataset([copy], chain, cache_dir=cache, num_workers=0, progress=False)
    assert len(loads) == 3
    os.utime(copy["image"], ns=(1, 1))  # the same path, replaced: preprocessed again
    PersistentCacheDataset([copy], chain, cache_dir=cache, num_workers=0, progress=False)
    assert len(loads) == 4

    PersistentCacheDataset(items, chain, cache_dir=cache, persistent=False, num_workers=0, progress=False)
    assert len(loads) == 5 and len(list(cache.glob("*.pt"))) == 4  # in memory only


def test_brain_mask_in_the_foregrounds_box_equals_the_whole_volume_rule():
    """Labelling and hole filling run inside the foreground's box (memory follows the brain): the
    same mask as on the whole grid, with a hole, a second smaller blob and a brain at the border."""
    from scipy import ndimage

    rng = np.random.default_rng(0)
    volume = np.zeros((60, 70, 50), np.float32)
    volume[10:40, 20:55, 0:30] = 100 + rng.random((30, 35, 30))  # touches the grid's border
    volume[20:25, 30:35, 10:15] = 0  # a hole inside
    volume[50:53, 5:8, 40:45] = 80  # a smaller blob elsewhere
    foreground = volume > 0.02 * np.percentile(volume[volume > 0], 99)
    labels, _ = ndimage.label(foreground)
    sizes = np.bincount(labels.ravel())
    sizes[0] = 0
    expected = ndimage.binary_fill_holes(labels == sizes.argmax())
    np.testing.assert_array_equal(brain_mask_from_image(volume), expected)
    assert brain_mask_from_image(volume)[22, 32, 12] and not brain_mask_from_image(volume)[51, 6, 42]
