"""The supervised bundle (the benchmark's ceiling): its labelled training set never touches the test
subjects, its training lowers the loss, its map is the lesion probability, and its demo weights
find lesions."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from monai.bundle import ConfigParser

from medanomaly.bundles import bundle_scripts, find_bundle, import_bundle_scripts, run_bundle
from medanomaly.data import CONTRASTS, load_datalist
from medanomaly.data.companion import COMPANION_SEED_OFFSET, companion_seed
from medanomaly.data.synth import plan_cohort

from checks import pixel_metrics

SUPERVISED = find_bundle("supervised")
_SCRIPTS = import_bundle_scripts("supervised", "supervised")
supervised = _SCRIPTS["scripts.supervised"]


def _demo_config(*names: str, **overrides) -> ConfigParser:
    parser = ConfigParser()
    parser.read_config([str(SUPERVISED.config_file(n)) for n in (*names, "demo")])
    parser.update(overrides)
    return parser


def _images(datalist, keys) -> set[str]:
    return {item["image"] for key in keys for item in load_datalist(datalist, key)}


def test_companion_training_set_never_shares_a_subject_or_seed_with_the_test_split(tiny, tiny_preset):
    items = supervised.training_items(tiny_preset, CONTRASTS, n_lesion_subjects=2)
    lesions = [item for item in items if "label" in item]
    # 4 healthy training subjects and 2 companion lesion subjects, each in every contrast
    assert len(items) == 3 * (4 + 2) and len(lesions) == 3 * 2
    assert supervised.contrasts_of(items) == list(CONTRASTS)
    assert {item["contrast"] for item in lesions} == set(CONTRASTS)
    held_out = set()
    for contrast in CONTRASTS:
        held_out |= _images(Path(tiny).parent / f"datalist_{contrast}.json",
                            ["validation_lesion", "test_lesion", "test_healthy"])
    assert not held_out & {item["image"] for item in items}
    assert not {Path(p).parent.parent for p in held_out} & {Path(item["image"]).parent.parent for item in lesions}
    # another cohort seed, hence other subject seeds than every validation and test subject's
    assert companion_seed(tiny) == COMPANION_SEED_OFFSET + 0 != 0
    companion = {plan["seed"] for plan in plan_cohort({"validation_lesion": 2}, seed=companion_seed(tiny))}
    cohort = {plan["seed"] for plan in plan_cohort("tiny", seed=0) if plan["split"] != "training"}
    assert companion and not companion & cohort
    assert all(item["subject"].startswith("companion-") for item in lesions)
    assert len({item["subject"] for item in items}) == len(items)  # one id per volume: sub-0001_T2w


def test_a_datalist_without_labelled_lesion_subjects_is_refused(tmp_path, tiny):
    from medanomaly.data import write_datalist

    own = write_datalist(tmp_path / "own.json", {"training": load_datalist(tiny, "training")})
    with pytest.raises(ValueError, match="lesion_key"):
        supervised.training_items(own, ["T1w"])


def test_lesion_balanced_slices_show_lesions_as_often_as_asked(tiny):
    from monai.transforms import Compose

    from medanomaly.data import preprocessing
    from medanomaly.data.transforms import lesion_balanced_axial_slices

    item = load_datalist(tiny, "validation_lesion")[0]
    volume = preprocessing(label=True)(item)
    assert volume["label"].shape == volume["image"].shape and volume["label"].sum() > 0
    sampler = Compose(lesion_balanced_axial_slices(200, lesion_weight=3, brain_weight=1))
    sampler.set_random_state(0)
    slices = sampler(volume)
    with_lesion = sum(bool(s["label"].any()) for s in slices) / len(slices)
    # 3 / 4 of the centres are lesion voxels; the other quarter are brain voxels outside the lesion, whose
    # slice shows lesion with the probability p below: expected 0.75 + 0.25 p, binomial spread over 200 draws
    brain, lesion = volume["mask"][0] > 0.5, volume["label"][0] > 0.5
    lesion_slices = lesion.any(dim=0).any(dim=0)
    p = float((brain & ~lesion)[..., lesion_slices].sum() / (brain & ~lesion).sum())
    expected = 0.75 + 0.25 * p
    assert abs(with_lesion - expected) < 3 * (expected * (1 - expected) / len(slices)) ** 0.5 + 1e-9
    assert all(s["mask"].any() for s in slices)  # never a slice without brain
    healthy = preprocessing(label=True)(load_datalist(tiny, "training")[0])
    assert healthy["label"].shape == healthy["image"].shape and not healthy["label"].any()


def test_one_training_run_lowers_the_loss_on_a_fixed_batch(tiny):
    parser = _demo_config("train", datalist=str(tiny), device="cpu", amp=False)
    torch.manual_seed(0)
    with bundle_scripts("supervised"):
        network = parser.get_parsed_content("network_def")
        transforms = parser.get_parsed_content("train#transforms")
        loss_function = parser.get_parsed_content("loss")
    transforms.set_random_state(0)
    samples = transforms(load_datalist(tiny, "validation_lesion")[0]) + transforms(load_datalist(tiny, "training")[0])
    images = torch.stack([s["image"] for s in samples])
    labels = torch.stack([s["label"] for s in samples])
    assert labels.sum() > 0 and images.shape == labels.shape == (8, 1, 128, 128)
    optimizer = torch.optim.Adam(network.parameters(), lr=1e-3)
    losses = []
    for _ in range(15):
        optimizer.zero_grad()
        loss = loss_function(network(images), labels)
        loss.backward()
        optimizer.step()
        losses.append(float(loss))
    assert losses[1] < losses[0] and losses[-1] < 0.9 * losses[0]  # measured: 2.24 -> 2.18 -> ... -> 1.87


class _Logits(torch.nn.Module):
    """Logits (0, 4 x - 2) per pixel: the lesion probability is sigmoid(4 x - 2)."""

    def forward(self, x):
        return torch.cat([torch.zeros_like(x), 4 * x - 2], dim=1)


def test_method_map_is_the_lesion_probability_and_zero_outside_the_brain():
    method = supervised.SupervisedCeilingMethod(_Logits(), smoothing=None)
    x = torch.rand(3, 1, 32, 32)
    mask = torch.zeros_like(x)
    mask[:2, :, 8:24, 8:24] = 1  # third slice: no brain
    out = method(torch.cat([x, mask], 1))
    assert out.shape == (3, 2, 32, 32)
    brain = mask[:, 0] == 1
    torch.testing.assert_close(out[:, 0][brain], torch.sigmoid(4 * x[:, 0] - 2)[brain])
    assert torch.all(out[:, 0][~brain] == 0) and torch.all(out[2] == 0)
    assert 0 <= float(out[:, 0].min()) and float(out[:, 0].max()) <= 1
    torch.testing.assert_close(out[:, 1], x[:, 0] * mask[:, 0])  # the "pseudo-healthy" channel is the input
    # a one-channel network: sigmoid of its logit, the same probability
    one_channel = supervised.SupervisedCeilingMethod(lambda t: 4 * t - 2, smoothing=None)
    torch.testing.assert_close(one_channel(torch.cat([x, mask], 1)), out)


def test_pooled_max_dice_is_the_best_dice_over_thresholds_of_the_lesion_softmax():
    """Against a brute force over every threshold on two decollated 'volumes' whose lesion
    probability never reaches 0.5 (argmax Dice would be 0)."""
    rng = np.random.default_rng(0)
    labels = [torch.from_numpy(rng.random((1, 8, 8, 4)) < 0.1) for _ in range(2)]
    logits = [torch.cat([torch.zeros(1, 8, 8, 4),
                         torch.from_numpy(rng.normal(-3, 0.5, (1, 8, 8, 4))).float().clamp(max=-2.05)
                         + 2.0 * label.float()]) for label in labels]
    metric = supervised.PooledMaxDice(n_bins=1000)
    metric.reset()
    metric.update((logits[:1], labels[:1]))
    metric.update((logits[1:], labels[1:]))
    probability = np.concatenate([torch.softmax(x, 0)[1].numpy().ravel() for x in logits])
    truth = np.concatenate([y[0].numpy().ravel() for y in labels])
    assert probability.max() < 0.5
    brute = max(2 * np.sum((probability >= t) & truth) / (np.sum(probability >= t) + truth.sum())
                for t in np.unique(probability))
    assert abs(metric.compute() - brute) < 0.01  # 1,000 bins


def test_metadata_marks_the_bundle_as_the_ceiling():
    assert SUPERVISED.metadata["medanomaly_role"] == "ceiling"


@pytest.mark.slow  # with `e2e`: run by `make test` (and CI) after the default suite
@pytest.mark.e2e
def test_bundle_trains_within_its_time_budget_calibrates_and_evaluates(tiny, tiny_preset, tmp_path):
    run = tmp_path / "run"
    run_bundle("supervised", "train", {"datalist": tiny_preset, "device": "cpu", "num_workers": 0,
                                       "output_dir": str(run), "n_healthy_subjects": 1, "n_lesion_subjects": 1,
                                       "num_iterations": 1000, "epoch_length": 2, "max_train_seconds": 30}, demo=True)
    model_dir = run / "models"
    info = json.loads((model_dir / "model_info.json").read_text())
    assert info["contrast"] == list(CONTRASTS) and info["role"] == "ceiling"
    assert 2 <= info["iterations_done"] < 1000  # stopped by the wall-clock budget, after a validation
    assert (model_dir / "model.pt").is_file() and 0 <= info["best_val_max_dice"] <= 1
    run_bundle("supervised", "calibrate", {"datalist": tiny_preset, "device": "cpu", "model_dir": str(model_dir)},
               demo=True)
    assert json.loads((model_dir / "model_info.json").read_text())["calibration_volumes"] == 2 * 3  # every contrast
    run_bundle("supervised", "evaluate", {"datalist": tiny_preset, "contrast": "FLAIR", "device": "cpu",
                                          "model_dir": str(model_dir), "output_dir": str(run / "eval"),
                                          "n_bootstrap": 10, "save_outputs": False}, demo=True)
    metrics = json.loads((run / "eval" / "metrics.json").read_text())
    assert metrics["n_lesion_volumes"] == 3 and metrics["n_healthy_volumes"] == 2


@pytest.mark.slow
@pytest.mark.parametrize("contrast", ["FLAIR", "T2w"])
def test_demo_weights_find_lesions_above_chance(tiny, tmp_path, contrast):
    datalist = Path(tiny).parent / f"datalist_{contrast}.json"
    run_bundle("supervised", "evaluate", {"datalist": str(datalist), "contrast": contrast, "device": "cpu",
                                          "output_dir": str(tmp_path), "n_bootstrap": 10, "save_outputs": False})
    pixel, prevalence = pixel_metrics(tmp_path / "metrics.json")
    # Chance pixel AP is the lesion prevalence (1.8 % of brain voxels here). The demo weights (30 min of
    # CPU training, docs/README.md) measured AP 0.541 (30 x chance) / AUROC 0.84 on FLAIR and 0.198
    # (11 x) / 0.79 on T2w; the limits (half the measured multiple, AUROC a few points lower) leave room
    # for CPU nondeterminism yet fail the earlier 18-minute weights (5 x on both) and a map that does not
    # follow lesions (~1 x). T1w is not tested: those weights reach only 2.3 x there (AP 0.041).
    ap_multiple, auroc = {"FLAIR": (15, 0.78), "T2w": (5.5, 0.72)}[contrast]
    assert pixel["ap"] > ap_multiple * prevalence and pixel["auroc"] > auroc
