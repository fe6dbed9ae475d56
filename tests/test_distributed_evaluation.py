"""Evaluation, calibration and detection in several processes (#20): inference.yaml (+ evaluate.yaml /
calibrate.yaml) + multi_gpu_evaluate.yaml under torchrun. Rank r scores the volumes r, r + N, ...;
rank 0 merges every rank's records in the datalist's order and writes the same files as one
process. Here two processes on the CPU with gloo against one process, file by file."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import yaml

from medanomaly import cli
from medanomaly.bundles import distributed, find_bundle, list_bundles, runner

from checks import NoProcess, config_names

EVALUATED_BUNDLES = ("cddpm", "dae", "intensity", "phanes", "sagan", "scrps", "supervised")


# --------------------------------------------------------------------------- shards and their merge
def _as_rank(monkeypatch, rank: int, world: int) -> None:
    monkeypatch.setattr(distributed, "world_size", lambda: world)
    monkeypatch.setattr(distributed, "rank", lambda: rank)


@pytest.mark.parametrize("n_volumes, world", [(7, 3), (6, 2), (2, 2), (5, 1)])
def test_shards_cover_every_volume_once_and_merge_back_into_the_datalist_order(monkeypatch, n_volumes, world):
    volumes = [f"sub-{i:02d}" for i in range(n_volumes)]
    shards = []
    for rank in range(world):
        _as_rank(monkeypatch, rank, world)
        shards.append([volumes[i] for i in distributed.shard_sampler(volumes)])
    assert sorted(v for shard in shards for v in shard) == volumes  # each volume once, none padded in
    assert shards[0] == volumes[::world]  # rank 0: the volumes 0, N, 2N, ...

    def all_gather_object(output, item):  # what torch.distributed gives every rank
        output[:] = shards

    monkeypatch.setattr(distributed.dist, "all_gather_object", all_gather_object)
    assert distributed.gather_in_order(shards[0]) == volumes


def test_outside_a_process_group_nothing_is_sharded_or_gathered():
    assert (distributed.world_size(), distributed.rank(), distributed.is_main_process()) == (1, 0, True)
    assert distributed.gather_in_order(("a", "b")) == ["a", "b"]
    assert list(distributed.shard_sampler(["a", "b", "c"])) == [0, 1, 2]


def test_fewer_volumes_than_processes_is_a_clear_error(monkeypatch):
    _as_rank(monkeypatch, 0, 4)
    with pytest.raises(ValueError, match="3 volume\\(s\\) for 4 processes.*--nproc 3"):
        distributed.shard_sampler([1, 2, 3])


# --------------------------------------------------------------------------- the overlays and commands
def test_every_bundle_evaluates_in_several_processes_with_the_same_overlay():
    names = [b.name for b in list_bundles() if b.evaluates_distributed]
    assert set(EVALUATED_BUNDLES) <= set(names)
    for name in EVALUATED_BUNDLES:
        bundle = find_bundle(name)
        overlay = yaml.safe_load(bundle.config_file("multi_gpu_evaluate").read_text())
        assert overlay["dataloader#sampler"] == "@volume_shards" and "shard_sampler" in overlay["volume_shards"]
        # the process group starts before anything that asks for the rank (sampler, handlers)
        assert overlay["run"][0] == "$@rank" and "start_process_group" in overlay["rank"]
        # what the overlay redirects exists in the inference config it lays over
        inference = yaml.safe_load(bundle.config_file("inference").read_text())
        assert {"dataloader", "progress", "device", "evaluator"} <= set(inference)
        # and it overrides nothing else of the bundle's (cddpm's `sampler` is its diffusion sampler)
        own = {key for name in ("inference", "evaluate", "calibrate", "demo") for key in
               yaml.safe_load(bundle.config_file(name).read_text())}
        assert set(overlay) & own <= {"device", "progress", "run", "finalize"}, name


def _torchrun(command: list[str], nproc: int) -> bool:
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc)]
    return command[:6] == torchrun


@pytest.mark.parametrize("workflow, overlay", [("evaluate", "evaluate.yaml"), ("calibrate", "calibrate.yaml"),
                                               ("inference", None)])
def test_a_sharded_workflow_adds_the_overlay_after_its_own_and_before_demo(workflow, overlay):
    command = runner.bundle_command("dae", workflow, demo=True, nproc=2)
    assert _torchrun(command, 2)
    assert config_names(command) == ["inference.yaml", *([overlay] if overlay else []), "multi_gpu_evaluate.yaml",
                                      "demo.yaml"]


def test_evaluate_and_benchmark_take_nproc(tmp_path, no_process):
    with pytest.raises(SystemExit):  # the stand-in writes no metrics.json
        cli.main(["evaluate", "dae", "--nproc", "2", "--datalist", "tiny", "--output-dir", str(tmp_path / "e"),
                  "--set", "dist_timeout_minutes=5"])
    (evaluate,) = no_process
    assert _torchrun(evaluate, 2) and "multi_gpu_evaluate.yaml" in config_names(evaluate)
    assert evaluate[evaluate.index("--dist_timeout_minutes") + 1] == "5"  # a key of the overlay is a known setting
    no_process.clear()
    cli.main(["benchmark", "--bundles", "dae", "phanes[mode=ra]", "--nproc", "3", "--cohort", "tiny",
              "--output-dir", str(tmp_path / "b")])
    assert len(no_process) == 2 and all(_torchrun(command, 3) for command in no_process)
    assert json.loads((tmp_path / "b" / "results.json").read_text())["processes"] == 3


def test_nproc_refuses_a_device_for_every_process_and_a_bundle_without_the_overlay(tmp_path, no_process, monkeypatch):
    with pytest.raises(SystemExit, match="its own GPU"):
        cli.main(["evaluate", "dae", "--nproc", "2", "--device", "cuda:0", "--output-dir", str(tmp_path)])
    monkeypatch.setattr(type(find_bundle("dae")), "evaluates_distributed", property(lambda self: False))
    monkeypatch.setattr(type(find_bundle("dae")), "has_config", lambda self, name: name != "multi_gpu_evaluate")
    with pytest.raises(SystemExit, match="no configs/multi_gpu_evaluate.yaml"):
        cli.main(["benchmark", "--bundles", "dae", "--nproc", "2", "--output-dir", str(tmp_path)])
    assert no_process == []


# --------------------------------------------------------------------------- two processes = one process
def _evaluate(bundle: str, output_dir: Path, nproc: int | None) -> Path:
    """One thread a process either way: convolutions sum in another order with another number of
    threads, which moves maps in their last bits (docs/DISTRIBUTED.md); the merge is what is tested."""
    overrides = {"datalist": "tiny", "contrast": "T2w", "output_dir": str(output_dir), "n_bootstrap": 50}
    runner.run_bundle(bundle, "evaluate", overrides=overrides, nproc=nproc, env={"OMP_NUM_THREADS": "1"})
    return output_dir


def _same_outputs(one: Path, two: Path) -> None:
    metrics = [json.loads((folder / "metrics.json").read_text()) for folder in (one, two)]
    assert metrics[1].pop("timing")["processes"] == 2 and metrics[0].pop("timing")["processes"] == 1
    assert metrics[0] == metrics[1]  # every number, to the bit
    for name in ("per_volume.csv", "per_volume.json"):
        assert (one / name).read_text() == (two / name).read_text()
    detections = [(folder / "detections.json").read_text().replace(str(folder), "OUT") for folder in (one, two)]
    assert detections[0] == detections[1]  # every rank's outputs, in the datalist's order
    assert sorted(p.name for p in one.glob("*_heatmap.nii.gz")) == sorted(p.name for p in two.glob("*_heatmap.nii.gz"))


def test_dae_evaluation_in_two_processes_writes_what_one_process_writes(tiny_preset, tmp_path):
    _same_outputs(_evaluate("dae", tmp_path / "one", None), _evaluate("dae", tmp_path / "two", 2))


@pytest.mark.slow  # 20 s to 3 min a bundle: each evaluates the 5 tiny test volumes twice
@pytest.mark.parametrize("bundle", [name for name in EVALUATED_BUNDLES if name != "dae"])
def test_every_bundles_evaluation_in_two_processes_writes_what_one_process_writes(bundle, tiny_preset, tmp_path):
    _same_outputs(_evaluate(bundle, tmp_path / "one", None), _evaluate(bundle, tmp_path / "two", 2))


@pytest.mark.slow  # ~40 s: the tiny cohort's 2 healthy validation volumes, twice
def test_calibration_in_two_processes_stores_the_threshold_of_one_process(tiny_preset, tmp_path):
    import shutil

    thresholds, volumes = [], []
    for nproc in (None, 2):
        model_dir = shutil.copytree(find_bundle("dae").model_dir, tmp_path / f"models{nproc}")
        runner.run_bundle("dae", "calibrate", overrides={"datalist": "tiny", "contrast": "T2w",
                                                         "model_dir": str(model_dir)}, nproc=nproc,
                          env={"OMP_NUM_THREADS": "1"})
        info = json.loads((model_dir / "model_info.json").read_text())
        thresholds.append(info["threshold"])
        volumes.append(info["calibration_volumes"])
    assert thresholds[0] == thresholds[1] and volumes == [2, 2]  # the tiny cohort's 2 healthy volumes, both


# --------------------------------------------------------------------------- scrps' latent repository
def test_scrps_train_nproc_builds_its_repository_in_n_processes_and_calibrates_in_one(tmp_path, no_process):
    cli.main(["train", "scrps", "--nproc", "2", "--demo", "--datalist", "tiny", "--output-dir", str(tmp_path)])
    train, repository, calibrate = no_process
    assert _torchrun(train, 2) and _torchrun(repository, 2) and not _torchrun(calibrate, 2)
    assert config_names(repository) == ["inference.yaml", "build_repository.yaml",
                                         "multi_gpu_build_repository.yaml", "demo.yaml"]


@pytest.mark.slow  # ~1 min: the shipped generator inverts 10 % of the tiny cohort's slices, twice
def test_the_repository_built_in_two_processes_is_the_one_process_repository(tiny_preset, tmp_path):
    import shutil

    import torch

    from medanomaly.latent import LatentRepository

    repositories = []
    for nproc in (None, 2):
        model_dir = shutil.copytree(find_bundle("scrps").model_dir, tmp_path / f"models{nproc}")
        runner.run_bundle("scrps", "build_repository", {
            "datalist": "tiny", "contrast": "T2w", "model_dir": str(model_dir), "repository_fraction": 0.1,
            "inversion_steps": 3, "repository_batch_size": 4}, nproc=nproc, env={"OMP_NUM_THREADS": "1"})
        repositories.append(LatentRepository.load(model_dir / "repository.pt"))
    one, two = repositories
    assert len(one) > 8  # several batches, so both processes inverted some
    assert one.sources == two.sources and torch.equal(one.codes, two.codes)


def test_n_processes_share_the_machines_cores_unless_the_user_chose(monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(runner.os, "sched_getaffinity", lambda pid: set(range(16)), raising=False)
    assert runner.threads_per_process(4) == {"OMP_NUM_THREADS": "4"}
    assert runner.threads_per_process(32) == {"OMP_NUM_THREADS": "1"}
    assert runner.threads_per_process(None) == {} and runner.threads_per_process(1) == {}
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert runner.threads_per_process(4) == {}


def test_the_launcher_gives_each_process_its_threads(monkeypatch, no_process):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(runner.os, "sched_getaffinity", lambda pid: set(range(8)), raising=False)
    seen = {}
    monkeypatch.setattr(runner.subprocess, "Popen", lambda command, env=None, **kw: seen.update(env) or NoProcess(
        command))
    runner.start_bundle("dae", "evaluate", nproc=2)
    assert seen["OMP_NUM_THREADS"] == "4"
