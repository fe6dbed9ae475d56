"""Training in several processes with PyTorch distributed (#20): `medanomaly train --nproc N` runs
train.yaml + multi_gpu_train.yaml under torchrun (DDP, DistributedSampler, rank-0 handlers).

Here two processes on the CPU with gloo: each rank writes what its networks hold at the start and
the end of training (tests/distributed_probe.py, added by a config overlay), and the test checks
that the ranks start and end with identical weights although they trained on different data, that
the weights changed, and that rank 0 alone wrote weights, model_info.json and TensorBoard logs."""

from __future__ import annotations

import ast
import os
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
import yaml

from medanomaly import cli
from medanomaly.bundles import BundleProcess, bundle_command, find_bundle, runner
from medanomaly.data import load_datalist, write_datalist

from checks import config_names

TESTS = Path(__file__).resolve().parent
DISTRIBUTED_BUNDLES = ("dae", "supervised", "cddpm", "sagan", "scrps")


# --------------------------------------------------------------------------- the command line
def test_train_nproc_runs_the_training_under_torchrun_then_calibrates_in_one_process(tmp_path, no_process):
    cli.main(["train", "dae", "--nproc", "2", "--demo", "--datalist", "tiny", "--output-dir", str(tmp_path / "run"),
              "--set", "dist_timeout_minutes=5"])
    train, calibrate = no_process
    assert train[:8] == [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                         "-m", "monai.bundle"] and train[8] == "run"
    assert config_names(train) == ["train.yaml", "multi_gpu_train.yaml", "demo.yaml"]
    assert train[train.index("--dist_timeout_minutes") + 1] == "5"  # a key of the overlay is a known setting
    assert train[train.index("--output_dir") + 1] == "$" + repr(str(tmp_path / "run"))
    # calibration: one process, no torchrun, on the weights the distributed training wrote
    assert calibrate[:4] == [sys.executable, "-m", "monai.bundle", "run"] and "torch.distributed.run" not in calibrate
    assert config_names(calibrate) == ["inference.yaml", "calibrate.yaml", "demo.yaml"]
    assert calibrate[calibrate.index("--model_dir") + 1] == "$" + repr(str(tmp_path / "run" / "models"))


def test_without_nproc_training_runs_in_one_process_as_before(tmp_path, no_process):
    cli.main(["train", "dae", "--demo", "--datalist", "tiny", "--output-dir", str(tmp_path / "run"), "--no-calibrate"])
    (train,) = no_process
    assert train[:4] == [sys.executable, "-m", "monai.bundle", "run"]
    assert config_names(train) == ["train.yaml", "demo.yaml"]


@pytest.mark.parametrize("arguments, message", [
    (["intensity", "--nproc", "2"], "its train runs in one process only"),
    (["dae", "--nproc", "2", "--device", "cuda:1"], "its own GPU"),
    (["dae", "--nproc", "2", "--set", "no_such_key=1"], "Unknown setting"),
])
def test_train_nproc_refuses_what_cannot_run_in_several_processes(tmp_path, no_process, arguments, message, capsys):
    with pytest.raises(SystemExit, match=message):
        cli.main(["train", *arguments, "--output-dir", str(tmp_path / "run")])
    assert no_process == []


def test_nproc_is_a_positive_whole_number(tmp_path, no_process, capsys):
    for bad in ("0", "two"):
        with pytest.raises(SystemExit):
            cli.main(["train", "dae", "--nproc", bad, "--output-dir", str(tmp_path / "run")])
        assert "--nproc" in capsys.readouterr().err
    with pytest.raises(ValueError, match="no configs/multi_gpu_train.yaml"):
        bundle_command("intensity", "train", nproc=2)


def test_the_bundles_that_train_in_several_processes():
    assert [name for name in DISTRIBUTED_BUNDLES if find_bundle(name).trains_distributed] == list(DISTRIBUTED_BUNDLES)
    assert not find_bundle("intensity").trains_distributed and find_bundle("phanes").trains_distributed
    assert find_bundle("dae").summary()["trains_distributed"] is True


def test_a_workers_exception_is_the_root_cause_of_a_torchrun_failure():
    log = ("[rank1]: Traceback (most recent call last):\n[rank1]:   File \"x.py\", line 1\n"
           "[rank1]: ValueError: the datalist has no training volumes\n"
           "torch.distributed.elastic.multiprocessing.errors.ChildFailedError: \n=====\nmonai.bundle FAILED")
    assert runner.root_cause(log) == "ValueError: the datalist has no training volumes"


# --------------------------------------------------------------------------- the agreed end of training
@pytest.mark.slow  # ~25 s here: two processes that import torch, ignite and MONAI (make test-all)
def test_every_rank_stops_when_one_is_told_to(tmp_path):
    import socket

    import ignite.distributed as idist
    from distributed_probe import stop_one_rank

    with socket.socket() as free:
        free.bind(("127.0.0.1", 0))
        port = free.getsockname()[1]
    with idist.Parallel(backend="gloo", nproc_per_node=2, master_port=port) as parallel:
        parallel.run(stop_one_rank, str(tmp_path))
    assert [(tmp_path / f"rank{rank}.txt").read_text() for rank in (0, 1)] == ["3 5", "3 5"]


# --------------------------------------------------------------------------- the overlays
def _yaml(bundle: str, name: str) -> dict:
    return yaml.safe_load(find_bundle(bundle).config_file(name).read_text())


RANK0_ONLY = {"TrainingProgress", "StatsHandler", "TensorBoardStatsHandler", "ModelInfoHandler", "CheckpointSaver",
              "BestMetricInfoHandler"}


@pytest.mark.parametrize("bundle", DISTRIBUTED_BUNDLES)
def test_handlers_that_log_or_write_files_attach_on_rank_0_only(bundle):
    """train.yaml's handlers that print, or write weights, model_info.json or TensorBoard logs are
    `_disabled_` on ranks > 0; those that keep the ranks in step (validation, learning-rate
    schedule, early stopping) run on every rank."""
    config = _yaml(bundle, "train")
    handlers = [*config["train"]["handlers"], *config.get("validate", {}).get("handlers", []),
                *[h for h in config["checkpoint"].values() if isinstance(h, dict) and "_target_" in h]]
    for handler in handlers:
        if not isinstance(handler, dict):  # a reference, e.g. '@validate#early_stop'
            continue
        kind = handler["_target_"].rsplit(".", 1)[-1]
        if kind == "CheckpointLoader":  # resume: every rank loads the same checkpoint
            assert "$@rank" not in str(handler.get("_disabled_"))
        else:
            assert (handler.get("_disabled_") == "$@rank > 0") == (kind in RANK0_ONLY), (bundle, kind)
    assert config["rank"] == 0


@pytest.mark.parametrize("bundle", DISTRIBUTED_BUNDLES)
def test_overlay_runs_train_yamls_run_inside_a_process_group(bundle):
    """The overlay's `run` is train.yaml's, with the process group first (and ignite joining it on
    every rank), seeds per rank, and the agreed end of training attached just before the run."""
    train, overlay = _yaml(bundle, "train")["run"], _yaml(bundle, "multi_gpu_train")
    run = overlay["run"]
    assert run[0] == "$@rank" and "start_process_group" in overlay["rank"]  # the group first
    assert run.index("$monai.utils.set_determinism(seed=@seed + @rank)") > 0
    assert [s for s in train if "set_determinism" not in s] == [s for s in run if s in train]
    assert run[-2:] == ["$@termination.attach(@train#trainer)", "$@train#trainer.run()"]
    assert "destroy_process_group" in overlay["finalize"][0]
    assert overlay["train#trainer#network"] == "@distributed_network"
    assert overlay["train#dataloader#sampler"] == "@train#sampler" and overlay["train#dataloader#shuffle"] is False
    assert overlay["train#sampler"]["_target_"] == "DistributedSampler" and overlay["train#sampler"]["shuffle"]


# --------------------------------------------------------------------------- two processes, gloo
def _probe_overlay(root: Path, networks: dict[str, str], stop_rank1_after: int | None,
                   handlers_key: str = "train#trainer#train_handlers") -> Path:
    """Per-rank output folders (rank 1 must leave its own empty) and the probe on every rank."""
    overlay = {
        "output_dir": f"$os.path.join({str(root)!r}, 'rank' + str(@rank))",
        "distributed_probe": {"_target_": "distributed_probe.ParameterProbe",
                              "path": f"$os.path.join({str(root)!r}, 'probe_rank' + str(@rank) + '.pt')",
                              "networks": networks,
                              "stop_after": f"${stop_rank1_after} if @rank == 1 else None"},
        handlers_key: ("$@train#handlers + [@distributed_probe]" if handlers_key == "train#trainer#train_handlers"
                       else "$[@distributed_probe]"),
    }
    path = root / "probe.yaml"
    path.write_text(yaml.safe_dump(overlay))
    return path


def train_in_two_processes(bundle: str, root: Path, overrides: dict, networks: dict[str, str],
                           stop_rank1_after: int | None = None, timeout: float = 300,
                           handlers_key: str = "train#trainer#train_handlers") -> tuple[dict, dict, str]:
    """Runs `medanomaly train BUNDLE --nproc 2`'s command (demo overlay) plus the probe overlay
    (`stop_rank1_after`: rank 1 alone is told to stop after that iteration); returns the two
    ranks' probe records and the log."""
    root.mkdir(parents=True, exist_ok=True)
    command = bundle_command(bundle, "train", overrides, demo=True, nproc=2)
    at = command.index("--config_file") + 1
    probe = _probe_overlay(root, networks, stop_rank1_after, handlers_key)
    command[at] = repr([*ast.literal_eval(command[at]), str(probe)])
    env = {"PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")]), "OMP_NUM_THREADS": "1"}
    process = BundleProcess(command, env=env, log_lines=400)
    timer = threading.Timer(timeout, process.cancel)
    timer.start()
    try:
        returncode = process.wait()
    finally:
        timer.cancel()
    assert returncode == 0 and not process.cancelled, process.log_tail
    records = [torch.load(root / f"probe_rank{rank}.pt", weights_only=False) for rank in (0, 1)]
    return records[0], records[1], process.log_tail


def _same(a: dict, b: dict, skip: tuple[str, ...] = ()) -> list[str]:
    """The state entries that differ between two states (`skip`: name endings left out)."""
    assert a.keys() == b.keys()
    return [key for key in a if not key.endswith(skip) and not torch.equal(a[key], b[key])]


def check_ranks(rank0: dict, rank1: dict, iterations: int, trained: tuple[str, ...],
                skip: tuple[str, ...] = ()) -> None:
    """Both ranks ran every iteration on different data (different losses), started from the same
    weights (DDP's broadcast; EMA copies made from them) and ended with identical weights, which
    training changed."""
    assert rank0["iterations"] == rank1["iterations"] == iterations
    assert len(rank0["losses"]) == len(rank1["losses"]) == iterations
    assert rank0["losses"] != rank1["losses"], "both ranks saw the same data: the DistributedSampler did not shard it"
    for name in rank0["final"]:
        assert _same(rank0["initial"][name], rank1["initial"][name], skip) == [], f"{name}: ranks started apart"
        assert _same(rank0["final"][name], rank1["final"][name], skip) == [], f"{name}: ranks ended apart"
    for name in trained:
        assert _same(rank0["initial"][name], rank0["final"][name]), f"{name}: training changed nothing"


def check_rank0_wrote_alone(root: Path, iterations: int) -> dict:
    """Rank 0's output folder has the weights, model_info.json and one TensorBoard log; rank 1's
    does not exist. Returns rank 0's checkpoint.pt."""
    import json

    models = root / "rank0" / "models"
    assert {"model.pt", "checkpoint.pt", "model_info.json"} <= {p.name for p in models.iterdir()}
    assert json.loads((models / "model_info.json").read_text())["iterations_done"] == iterations
    assert list((root / "rank0" / "tensorboard").glob("events.out.tfevents.*"))
    assert not (root / "rank1").exists(), sorted(map(str, (root / "rank1").rglob("*")))
    return torch.load(models / "checkpoint.pt", weights_only=False)


def test_dae_trains_in_two_processes_with_identical_weights(tiny, tmp_path):
    """The fast one (~25 s on 2 cores): a tiny UNet, 2 epochs of 3 iterations, validation after the
    first; rank 1 alone is told to stop after iteration 5 (as its own wall-clock limit would), and
    rank 0 stops with it instead of waiting for it in the next gradient all-reduce."""
    started = time.monotonic()
    overrides = {"datalist": str(tiny), "num_workers": 0, "num_iterations": 6, "epoch_length": 3,
                 "network_def#channels": [4, 8, 8, 8], "dist_timeout_minutes": 2}
    rank0, rank1, log = train_in_two_processes("dae", tmp_path, overrides, {"network": "@network"},
                                               stop_rank1_after=5)
    check_ranks(rank0, rank1, 5, trained=("network",))
    checkpoint = check_rank0_wrote_alone(tmp_path, 5)
    # what rank 0 saved is what rank 1 holds
    assert _same(checkpoint["model"], rank1["final"]["network"]) == []
    assert "val_mse" in log
    print(f"dae, 2 processes: {time.monotonic() - started:.1f} s")


def _small_datalist(tiny, folder: Path) -> str:
    """The tiny cohort with two training volumes (one a rank) and one volume of each other split."""
    splits = {key: load_datalist(tiny, key)[: 2 if key == "training" else 1]
              for key in ("training", "validation_healthy", "validation_lesion", "test_lesion", "test_healthy")}
    return str(write_datalist(folder / "datalist.json", splits))


# bundle: (settings beyond the cohort's, networks the probe records, trained ones, state entries that may differ)
SLOW_RUNS = {
    "supervised": ({"train_contrasts": ["T1w"], "n_healthy_subjects": 2, "n_lesion_subjects": 2,
                    "network_def#channels": [4, 8, 8], "network_def#strides": [2, 2]},
                   {"network": "@network"}, ("network",), ()),
    "cddpm": ({"fold": 3, "val_slices_per_volume": 2, "network_def#channels": [8, 8, 8, 8],
               "network_def#norm_num_groups": 4, "network_def#num_head_channels": 4},
              {"network": "@network", "ema": "@ema"}, ("network", "ema"), ()),
    "sagan": ({"conv_dim": 4, "critic_dim": 4, "n_residual": 1, "heads": 2},
              {"network": "@network", "critic": "@critic"}, ("network", "critic"), ()),
    # lazy R1 and path-length passes every 2nd iteration, through DDP too; the mapping's running mean
    # of w (a buffer) follows each rank's latents between DDP's broadcasts of rank 0's
    "scrps": ({"channel_base": 128, "max_channels": 32, "n_mlp": 2, "r1_interval": 2, "pl_weight": 2.0,
               "pl_interval": 2},
              {"network": "@network", "discriminator": "@discriminator", "g_ema": "@g_ema"},
              ("network", "discriminator", "g_ema"), ("w_avg",)),
}


@pytest.mark.slow  # ~30-60 s each here (make test-all)
@pytest.mark.parametrize("bundle", list(SLOW_RUNS))
def test_gan_diffusion_and_supervised_bundles_train_in_two_processes_with_identical_weights(
        bundle, tiny, tiny_preset, tmp_path):
    """Every network a bundle trains (the GANs' both, through DDP inside their step) and its EMA copy
    end identical on both ranks after 4 iterations (2 epochs, validation after each)."""
    settings, networks, trained, may_differ = SLOW_RUNS[bundle]
    datalist = {"supervised": tiny_preset, "sagan": str(tiny)}.get(bundle) or _small_datalist(tiny, tmp_path)
    overrides = {"datalist": datalist, "num_workers": 0, "num_iterations": 4, "epoch_length": 2,
                 "dist_timeout_minutes": 3, **settings}
    rank0, rank1, _ = train_in_two_processes(bundle, tmp_path / "run", overrides, networks, timeout=600)
    check_ranks(rank0, rank1, 4, trained=trained, skip=may_differ)
    check_rank0_wrote_alone(tmp_path / "run", 4)


@pytest.mark.slow  # ~1 min here (make test-all)
def test_phanes_trains_in_two_processes_with_identical_networks(tiny, tmp_path):
    """PHANES without DDP's wrapper (its steps call the VAE's encoder and decoder): rank 0's weights at
    the start, gradients averaged before every optimiser step and rank 0's BatchNorm statistics keep
    the ranks' networks identical through stage 1, trained on different slices; rank 0 alone writes."""
    overrides = {"datalist": _small_datalist(tiny, tmp_path), "num_workers": 0, "stage": "1", "stage1_iterations": 4,
                 "checkpoint_interval": 2, "validation_interval": 2, "log_interval": 1, "dist_timeout_minutes": 3,
                 "vae_channels": [4, 8, 8, 8, 8], "zdim": 8}
    rank0, rank1, _ = train_in_two_processes("phanes", tmp_path / "run", overrides,
                                             {"network": "@network_def", "discriminator": "@discriminator"},
                                             timeout=600, handlers_key="trainer#handlers")
    check_ranks(rank0, rank1, 4, trained=("network",))
    models = tmp_path / "run" / "rank0" / "models"
    assert {"model.pt", "checkpoint_stage1.pt", "model_info.json"} <= {p.name for p in models.iterdir()}
    assert list((tmp_path / "run" / "rank0" / "tensorboard").glob("events.out.tfevents.*"))
    assert not (tmp_path / "run" / "rank1").exists()
