"""Tests of the synthetic brain-MRI cohort (medanomaly.data.synth) and datalists."""

from __future__ import annotations

import json
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage

from medanomaly.data import datalist as dl
from medanomaly.data import synth
from medanomaly.data.synth import PRESETS, SPLITS, generate_cohort, plan_cohort, synthesize_subject

SEED = 7
SIZE_U = {"tumour": 0.5, "stroke": 0.6, "wmh": 0.8}


# `tiny` (conftest.py): the `tiny` preset, seed 0, generated once per session by two workers.


@pytest.fixture(scope="module")
def pairs() -> dict:
    """One subject without a lesion and the same subject with each lesion family."""
    out = {"healthy": synthesize_subject(SEED)}
    for family, u in SIZE_U.items():
        out[family] = synthesize_subject(SEED, family, size_u=u)
    return out


def _load(path: str) -> tuple[np.ndarray, np.ndarray, tuple]:
    img = nib.load(path)
    return np.asarray(img.dataobj), img.affine, img.header.get_zooms()[:3]


# ----------------------------------------------------------------------------------------
# the cohort on disk


def test_datalist_loads_with_monai(tiny):
    from monai.data import load_decathlon_datalist

    doc = json.loads(tiny.read_text())
    assert doc["modality"] == {"0": "T1"} and doc["labels"] == {"0": "background", "1": "lesion"}
    assert doc["numTraining"] == PRESETS["tiny"]["training"]
    assert doc["medanomaly"]["preset"] == "tiny" and doc["medanomaly"]["seed"] == 0
    for key in SPLITS:
        items = load_decathlon_datalist(tiny, data_list_key=key, base_dir=tiny.parent)
        assert len(items) == PRESETS["tiny"][key]
        for item in items:
            assert Path(item["image"]).is_file() and Path(item["mask"]).is_file()
            assert ("label" in item) == (key != "training")
            if "label" in item:
                assert Path(item["label"]).is_file()
            assert item["subject"].startswith("sub-")
            assert item["family"] in ("healthy", "tumour", "stroke", "wmh")
            assert (item["family"] == "healthy") == (key in ("training", "validation_healthy", "test_healthy"))
    families = sorted(e["family"] for e in dl.load_datalist(tiny, "test_lesion"))
    assert families == ["stroke", "tumour", "wmh"]  # one per family
    subjects = [e["subject"] for k in SPLITS for e in dl.load_datalist(tiny, k)]
    assert len(subjects) == len(set(subjects)) == sum(PRESETS["tiny"].values())


def test_load_datalist_errors(tiny, tmp_path):
    entries = dl.load_datalist(tiny, "validation_lesion")
    assert all(Path(e["image"]).is_absolute() for e in entries)
    with pytest.raises(KeyError, match="Available splits: training, validation_healthy"):
        dl.load_datalist(tiny, "validation")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        dl.load_datalist(tmp_path / "missing.json", "training")


def test_write_datalist_round_trip(tmp_path):
    img = tmp_path / "imgs" / "a.nii.gz"
    path = dl.write_datalist(
        tmp_path / "d.json", {"training": [{"image": str(img), "subject": "a"}], "test": ["imgs/b.nii.gz"]}
    )
    assert json.loads(path.read_text())["training"][0]["image"] == "imgs/a.nii.gz"
    assert dl.load_datalist(path, "training")[0]["image"] == str(img.resolve())
    assert dl.load_datalist(path, "test")[0]["image"] == str((tmp_path / "imgs" / "b.nii.gz").resolve())
    assert dl.datalist_keys(path) == ["training", "test"]


def test_geometry_is_oblique_and_anisotropic(tiny):
    import SimpleITK as sitk

    for key in SPLITS:
        for entry in dl.load_datalist(tiny, key):
            img = nib.load(entry["image"])
            rot = img.affine[:3, :3] / np.asarray(img.header.get_zooms()[:3])
            off_diagonal = np.abs(rot - np.diag(np.diag(rot))).max()
            assert off_diagonal > 1e-3, "affine should be oblique (non-diagonal)"
            zooms = np.asarray(img.header.get_zooms()[:3])
            assert 1.2 <= zooms[0] <= 1.8 and zooms[0] == pytest.approx(zooms[1])
            assert zooms[2] - zooms[0] >= 0.15 and zooms[2] <= 2.5 + 1e-6
            assert img.get_data_dtype() == np.int16
            # SimpleITK opens it with the same geometry (orthonormal direction)
            s = sitk.ReadImage(entry["image"])
            assert np.allclose(s.GetSpacing(), zooms, atol=1e-4)
            assert np.allclose(nib.load(entry["mask"]).affine, img.affine)


def test_skull_stripped_and_lesions_inside_brain(tiny):
    for key in SPLITS[1:]:
        for entry in dl.load_datalist(tiny, key):
            image, _, zooms = _load(entry["image"])
            mask, _, _ = _load(entry["mask"])
            lesion, _, _ = _load(entry["label"])
            brain = mask > 0
            assert set(np.unique(mask)) <= {0, 1} and set(np.unique(lesion)) <= {0, 1}
            assert np.all(image[~brain] == 0), "image must be 0 outside the brain"
            assert np.mean(image[brain] > 0) > 0.999
            assert np.all(brain[lesion > 0]), "lesion voxels must lie inside the brain mask"
            n = int(lesion.sum())
            assert n == entry["lesion_voxels"]
            assert entry["lesion_ml"] == pytest.approx(n * np.prod(zooms) / 1000.0, rel=1e-3)
            if entry["family"] == "healthy":
                assert n == 0
            else:
                assert n > 0
            assert 1.0e6 < brain.sum() * np.prod(zooms) < 2.6e6  # 1-2.6 litres


def test_files_match_in_memory_subject(tiny):
    """A file written by a worker process equals the subject made here from its seed."""
    seed = json.loads(tiny.read_text())["medanomaly"]["seed"]
    plans = {p["subject"]: p for p in plan_cohort("tiny", seed=seed)}
    entry = next(e for e in dl.load_datalist(tiny, "test_lesion") if e["family"] == "wmh")
    plan = plans[entry["subject"]]
    subject = synthesize_subject(plan["seed"], plan["family"], plan["size_u"])
    image, affine, _ = _load(entry["image"])
    lesion, _, _ = _load(entry["label"])
    assert np.allclose(affine, subject.affine, atol=1e-4)
    assert np.array_equal(image, np.rint(subject.image).astype(np.int16))
    assert np.array_equal(lesion, subject.lesion)


def test_second_call_does_no_work(tiny):
    files = sorted(p for p in tiny.parent.rglob("*") if p.is_file())
    before = {p: p.stat().st_mtime_ns for p in files}
    t0 = time.perf_counter()
    assert generate_cohort(tiny.parent, "tiny", seed=0, progress=False) == tiny
    assert time.perf_counter() - t0 < 1.0
    assert {p: p.stat().st_mtime_ns for p in files} == before
    assert sorted(p for p in tiny.parent.rglob("*") if p.is_file()) == files


def test_interrupted_run_resumes_with_identical_bytes(tiny):
    """Removing one subject's image (as after an interruption) regenerates only that subject,
    byte for byte identical, and leaves every other file alone."""
    root = tiny.parent
    entry = dl.load_datalist(tiny, "validation_healthy")[0]
    image = Path(entry["image"])
    original = image.read_bytes()
    others = {p: p.stat().st_mtime_ns for p in root.rglob("*_T1w.nii.gz") if p != image}
    image.unlink()
    assert generate_cohort(root, "tiny", seed=0, workers=1, progress=False) == tiny
    assert image.read_bytes() == original
    assert {p: p.stat().st_mtime_ns for p in others} == others
    assert not list(root.rglob(".*.tmp"))


def test_montage_written(tiny, tmp_path):
    png = tiny.parent / "montage.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    out = synth.save_montage(tiny, tmp_path / "m.png", n=2, key="validation_lesion")
    assert out.stat().st_size > 10_000


# ----------------------------------------------------------------------------------------
# subjects in memory


def test_same_seed_same_subject_other_seed_differs():
    a = synthesize_subject(3, "wmh", size_u=0.3)
    b = synthesize_subject(3, "wmh", size_u=0.3)
    assert np.array_equal(a.image, b.image) and np.array_equal(a.lesion, b.lesion)
    assert np.array_equal(a.affine, b.affine)
    c = synthesize_subject(4)
    assert c.image.shape != a.image.shape or not np.allclose(c.image, a.image)


@pytest.mark.parametrize("family", ["tumour", "stroke", "wmh"])
def test_image_changes_where_the_mask_says(pairs, family):
    healthy, sick = pairs["healthy"], pairs[family]
    assert np.array_equal(healthy.affine, sick.affine)
    lesion = sick.lesion > 0
    assert lesion.any() and not healthy.lesion.any()
    brain = (sick.brain_mask > 0) & (healthy.brain_mask > 0)
    diff = np.abs(sick.image - healthy.image)
    inside = diff[lesion].mean()
    outside = diff[brain & ~lesion].mean()
    assert inside > 20 * outside
    # far from the lesion (beyond the mass effect) both versions agree
    dist = ndimage.distance_transform_edt(~lesion, sampling=sick.spacing)
    reach = 8.0
    if family == "tumour":
        reach = 2.5 * sick.info["lesion"]["pushes"][0]["radius"]
    far = brain & (dist > reach)
    assert far.sum() > 0.3 * brain.sum()
    scale = healthy.image[brain].mean()
    assert diff[far].mean() < 1e-3 * scale
    assert np.mean(diff[far] < 1e-3 * scale) > 0.97
    assert np.mean(diff[far] == 0) > 0.8


def test_tumour_mass_effect_displaces_anatomy(pairs):
    healthy, sick = pairs["healthy"], pairs["tumour"]
    lesion = sick.lesion > 0
    push = sick.info["lesion"]["pushes"][0]
    dist = ndimage.distance_transform_edt(~lesion, sampling=sick.spacing)
    shell = (dist > 0) & (dist < push["radius"]) & (healthy.brain_mask > 0)
    moved = np.abs(sick.tissue["wm"] - healthy.tissue["wm"])[shell].mean()
    assert moved > 0.02, "tissue around a tumour should be pushed away"
    for family in ("stroke", "wmh"):  # no mass effect: identical anatomy
        assert np.array_equal(pairs[family].tissue["wm"], healthy.tissue["wm"])


def _surrounding_wm(subject, region, mm=(3.0, 12.0)) -> np.ndarray:
    dist = ndimage.distance_transform_edt(~region, sampling=subject.spacing)
    ring = (dist > mm[0]) & (dist < mm[1]) & (subject.tissue["wm"] > 0.9) & (subject.lesion == 0)
    return subject.image[ring]


def test_lesion_intensity_direction(pairs):
    healthy = pairs["healthy"]
    # tumour: oedema brighter than the white matter around it (and than before)
    t = pairs["tumour"]
    oedema = t.parts["oedema"] & (healthy.tissue["wm"] > 0.9)
    assert oedema.sum() > 20
    assert t.image[oedema].mean() > 1.08 * _surrounding_wm(t, t.lesion > 0).mean()
    assert t.image[oedema].mean() > 1.08 * healthy.image[oedema].mean()
    assert t.image[t.parts["core"]].size > 0
    # stroke: darker than the tissue it replaced and than the white matter around it
    s = pairs["stroke"]
    les = s.lesion > 0
    assert s.image[les].mean() < 0.85 * healthy.image[les].mean()
    assert s.image[les].mean() < 0.85 * _surrounding_wm(s, les).mean()
    # wmh: brighter than the surrounding white matter
    w = pairs["wmh"]
    les = w.lesion > 0
    assert w.image[les].mean() > 1.08 * _surrounding_wm(w, les).mean()
    assert np.all(healthy.tissue["wm"][les] > 0.5)  # foci lie in white matter


def test_lesion_sizes_follow_size_quantile():
    small = synthesize_subject(11, "tumour", size_u=0.0).lesion_ml
    large = synthesize_subject(11, "tumour", size_u=1.0).lesion_ml
    assert large > 8 * small
    few = synthesize_subject(12, "wmh", size_u=0.0)
    assert 1 <= few.lesion_voxels < 300


# ----------------------------------------------------------------------------------------
# plans, presets, errors


def test_plan_cohort_is_balanced_and_independent_of_preset():
    demo = plan_cohort("demo", seed=0)
    for split in ("validation_lesion", "test_lesion"):
        fams = [p["family"] for p in demo if p["split"] == split]
        assert {f: fams.count(f) for f in set(fams)} == {f: len(fams) // 3 for f in ("tumour", "stroke", "wmh")}
        for fam in ("tumour", "stroke", "wmh"):
            us = sorted(p["size_u"] for p in demo if p["split"] == split and p["family"] == fam)
            assert all(0 <= u <= 1 for u in us)
            assert all((i <= u * len(us) <= i + 1) for i, u in enumerate(us))  # stratified
    seeds = [p["seed"] for p in demo]
    assert len(set(seeds)) == len(seeds)
    tiny_training = [p["seed"] for p in plan_cohort("tiny", seed=0) if p["split"] == "training"]
    assert tiny_training == [p["seed"] for p in demo if p["split"] == "training"][: len(tiny_training)]
    assert plan_cohort("tiny", seed=1)[0]["seed"] != plan_cohort("tiny", seed=0)[0]["seed"]


def test_cohort_root_and_bad_inputs(monkeypatch, tmp_path):
    monkeypatch.setenv("MEDANOMALY_HOME", str(tmp_path))
    assert synth.cohort_root("demo") == tmp_path / "cohorts" / "demo"
    monkeypatch.delenv("MEDANOMALY_HOME")
    assert synth.cohort_root("x") == Path.home() / ".cache" / "medanomaly" / "cohorts" / "x"
    with pytest.raises(ValueError, match="Unknown cohort preset"):
        generate_cohort(tmp_path / "c", preset="huge")
    with pytest.raises(ValueError, match="Unknown lesion family"):
        synthesize_subject(0, "glioma")
    with pytest.raises(TypeError, match="seed"):
        synthesize_subject(-1)


def test_refuses_to_overwrite_a_foreign_datalist(tmp_path):
    dl.write_datalist(tmp_path / "datalist.json", {"training": [{"image": "real/sub-01_T1w.nii.gz"}]})
    with pytest.raises(FileExistsError, match="not written by the synthetic cohort generator"):
        generate_cohort(tmp_path, "tiny", progress=False)


def test_ensure_cohort_generates_once(monkeypatch, tmp_path):
    monkeypatch.setenv("MEDANOMALY_HOME", str(tmp_path))
    path = synth.ensure_cohort({"training": 1, "test_lesion": 1}, seed=5)
    assert path == tmp_path / "cohorts" / "custom-seed5" / "datalist.json"
    (entry,) = dl.load_datalist(path, "test_lesion")
    assert entry["family"] in ("tumour", "stroke", "wmh") and entry["lesion_voxels"] > 0
    mtime = path.stat().st_mtime_ns
    assert synth.ensure_cohort({"training": 1, "test_lesion": 1}, seed=5) == path
    assert path.stat().st_mtime_ns == mtime
