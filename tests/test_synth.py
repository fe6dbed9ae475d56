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
SIZE_U = {"tumour": 0.5, "stroke": 0.6, "wmh": 0.8}  # seed 7: a ring tumour and a chronic stroke
ACUTE_STROKE_SEED = 12


# `tiny` (conftest.py): the `tiny` preset, seed 0, generated once per session by two workers.


@pytest.fixture(scope="module")
def pairs() -> dict:
    """One subject without a lesion and the same subject with each lesion family."""
    out = {"healthy": synthesize_subject(SEED)}
    for family, u in SIZE_U.items():
        out[family] = synthesize_subject(SEED, family, size_u=u)
    out["stroke_acute"] = synthesize_subject(ACUTE_STROKE_SEED, "stroke", size_u=SIZE_U["stroke"])
    return out


def _load(path: str) -> tuple[np.ndarray, np.ndarray, tuple]:
    img = nib.load(path)
    return np.asarray(img.dataobj), img.affine, img.header.get_zooms()[:3]


# ----------------------------------------------------------------------------------------
# the cohort on disk


def test_datalist_loads_with_monai(tiny):
    from monai.data import load_decathlon_datalist

    doc = json.loads(tiny.read_text())
    assert doc["modality"] == {"0": "T1"} and doc["contrast"] == "T1w"
    assert doc["labels"] == {"0": "background", "1": "lesion"}
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


def test_first_test_volumes_keep_about_a_quarter_healthy(tmp_path):
    """The quick-benchmark subset: the first volumes of each test split, one healthy per three
    lesion volumes (at least one of each when more than one volume is asked for)."""
    lesion = [{"image": f"/d/l{i}.nii.gz"} for i in range(6)]
    healthy = [{"image": f"/d/h{i}.nii.gz"} for i in range(3)]
    source = dl.write_datalist(tmp_path / "all.json", {"test_lesion": lesion, "test_healthy": healthy})
    for n, expected in ((8, (6, 2)), (4, (3, 1)), (2, (1, 1)), (1, (1, 0)), (20, (6, 3))):
        path, count = dl.first_test_volumes(source, n, tmp_path / f"first_{n}")
        got = tuple(len(dl.load_datalist(path, key)) for key in dl.TEST_KEYS)
        assert (got, count) == (expected, sum(expected)), n
        assert dl.load_datalist(path, "test_lesion")[0]["image"] == "/d/l0.nii.gz"


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


def _ring_around(subject, region, mm=(3.0, 12.0)) -> np.ndarray:
    """White matter 3-12 mm from `region`, outside the lesion (a mask)."""
    dist = ndimage.distance_transform_edt(~region, sampling=subject.spacing)
    return (dist > mm[0]) & (dist < mm[1]) & (subject.tissue["wm"] > 0.9) & (subject.lesion == 0)


def _ratio(subject, contrast, region, reference) -> float:
    image = subject.images[contrast]
    return float(image[region].mean() / image[reference].mean())


def test_healthy_tissues_look_like_each_contrast(pairs):
    """WM > GM > CSF on T1w; CSF brightest and GM > WM on T2w; CSF nulled and GM > WM on FLAIR."""
    h = pairs["healthy"]
    brain = h.brain_mask > 0
    wm, gm, csf = (brain & (h.tissue[t] > 0.9) for t in ("wm", "gm", "csf"))
    mean = {c: {t: h.images[c][m].mean() for t, m in (("wm", wm), ("gm", gm), ("csf", csf))} for c in h.images}
    assert mean["T1w"]["wm"] > 1.3 * mean["T1w"]["gm"] > 1.3 * mean["T1w"]["csf"]
    assert mean["T2w"]["csf"] > 1.5 * mean["T2w"]["gm"] > 1.5 * mean["T2w"]["wm"]
    assert mean["FLAIR"]["gm"] > 1.1 * mean["FLAIR"]["wm"] > 3 * mean["FLAIR"]["csf"]
    assert set(h.images) == {"T1w", "T2w", "FLAIR"}


def test_tumour_compartments_in_each_contrast(pairs):
    """Oedema dark on T1w and bright on T2w / FLAIR; a ring tumour's rim enhances on T1w and its
    necrotic centre is CSF-like: brighter than oedema on T2w, darker than oedema on FLAIR."""
    t = pairs["tumour"]
    assert t.info["lesion"]["core_type"] == "ring"
    wm = _ring_around(t, t.lesion > 0)
    oedema = t.parts["oedema"] & (pairs["healthy"].tissue["wm"] > 0.9)
    assert oedema.sum() > 20
    assert _ratio(t, "T1w", oedema, wm) < 0.85
    assert _ratio(t, "T2w", oedema, wm) > 1.5
    assert _ratio(t, "FLAIR", oedema, wm) > 1.3
    depth = ndimage.distance_transform_edt(t.parts["core"], sampling=t.spacing)
    rim = t.parts["core"] & (depth > 0.5) & (depth < t.info["lesion"]["rim_mm"] - 0.5)
    centre = t.parts["core"] & (depth > t.info["lesion"]["rim_mm"] + 1.5)
    assert rim.sum() > 10 and centre.sum() > 10
    assert _ratio(t, "T1w", rim, wm) > 1.15
    assert _ratio(t, "T2w", centre, oedema) > 1.1
    assert _ratio(t, "FLAIR", centre, oedema) < 0.7


def test_stroke_stages_in_each_contrast(pairs):
    """Acute infarct: dark on T1w, bright on T2w and FLAIR. Chronic: a cavity dark on FLAIR (CSF-like)
    inside a gliotic rim brighter than the white matter on FLAIR."""
    acute, chronic = pairs["stroke_acute"], pairs["stroke"]
    assert acute.info["lesion"]["stage"] == "acute" and chronic.info["lesion"]["stage"] == "chronic"
    les = acute.lesion > 0
    wm = _ring_around(acute, les)
    assert _ratio(acute, "T1w", les, wm) < 0.8
    assert _ratio(acute, "T2w", les, wm) > 1.4
    assert _ratio(acute, "FLAIR", les, wm) > 1.2
    wm = _ring_around(chronic, chronic.lesion > 0)
    cavity, gliosis = chronic.parts["cavity"], chronic.parts["gliosis"]
    assert cavity.sum() > 20 and gliosis.sum() > 20
    assert _ratio(chronic, "FLAIR", cavity, wm) < 0.6
    assert _ratio(chronic, "FLAIR", gliosis, cavity) > 1.5
    assert _ratio(chronic, "T2w", cavity, wm) > 1.8
    assert _ratio(chronic, "T1w", cavity, wm) < 0.6


def test_wmh_bright_on_t2w_and_flair_not_on_t1w(pairs):
    w = pairs["wmh"]
    les = w.lesion > 0
    wm = _ring_around(w, les)
    assert np.all(pairs["healthy"].tissue["wm"][les] > 0.5)  # foci lie in white matter
    assert _ratio(w, "FLAIR", les, wm) > 1.2
    assert _ratio(w, "T2w", les, wm) > 1.2
    assert _ratio(w, "T1w", les, wm) < 1.0  # iso- to hypo-intense on T1w


def test_contrasts_share_anatomy_mask_and_lesion(pairs):
    """One lesion mask and one brain for all contrasts; rendering fewer contrasts changes nothing else."""
    w = pairs["wmh"]
    only_flair = synthesize_subject(SEED, "wmh", size_u=SIZE_U["wmh"], contrasts=["FLAIR"])
    assert set(only_flair.images) == {"FLAIR"}
    assert np.array_equal(only_flair.images["FLAIR"], w.images["FLAIR"])
    assert np.array_equal(only_flair.lesion, w.lesion) and np.array_equal(only_flair.brain_mask, w.brain_mask)
    for image in w.images.values():
        assert np.all(image[w.brain_mask == 0] == 0) and image.shape == w.lesion.shape


def test_cohort_has_one_datalist_per_contrast(tiny):
    root = tiny.parent
    docs = {c: json.loads((root / f"datalist_{c}.json").read_text()) for c in ("T1w", "T2w", "FLAIR")}
    assert json.loads(tiny.read_text())["training"] == docs["T1w"]["training"]
    for contrast, doc in docs.items():
        modality = {"T1w": "T1", "T2w": "T2"}.get(contrast, contrast)
        assert doc["contrast"] == contrast and doc["modality"] == {"0": modality}
        for split in SPLITS:
            for entry, t1 in zip(doc[split], docs["T1w"][split]):
                assert entry["image"].endswith(f"_{contrast}.nii.gz") and (root / entry["image"]).is_file()
                assert entry["subject"] == t1["subject"] and entry["mask"] == t1["mask"]
                assert entry.get("label") == t1.get("label")
        sidecar = json.loads((root / doc["test_lesion"][0]["image"].replace(".nii.gz", ".json")).read_text())
        assert sidecar["Contrast"] == contrast and "TE" in sidecar["SequenceParameters"] or contrast == "T1w"
    assert synth.ensure_cohort("tiny", root=root, contrast="flair") == root / "datalist_FLAIR.json"


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
