"""Bundle discovery, metadata, the command line the runner builds, and the runner itself."""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
from pathlib import Path

import pytest
import torch

from medanomaly.bundles import (
    BundleNotFound,
    BundleProcess,
    BundleRunError,
    VolumeProgress,
    bundle_command,
    bundle_search_path,
    find_bundle,
    format_progress,
    list_bundles,
    parse_progress,
    registry,
)

REPO = Path(__file__).resolve().parents[1]
SCHEMA = REPO / "monai_bundles" / "schema" / "meta_schema_20240725.json"
STANDARD_FILES = ["configs/metadata.json", "configs/train.yaml", "configs/inference.yaml", "configs/evaluate.yaml",
                  "configs/calibrate.yaml", "configs/demo.yaml", "configs/logging.conf", "docs/README.md", "LICENSE",
                  "scripts/__init__.py"]


def test_every_bundle_has_the_standard_layout():
    bundles = list_bundles()
    assert "dae" in [b.name for b in bundles]
    for bundle in bundles:
        missing = [f for f in STANDARD_FILES if not (bundle.root / f).is_file()]
        assert not missing, f"{bundle.name} lacks {missing}"


@pytest.mark.parametrize("bundle", [b.name for b in list_bundles()])
def test_metadata_passes_monai_verify_metadata(bundle):
    """MONAI's own check (`python -m monai.bundle verify_metadata` runs this function; in this process
    it costs no interpreter start-up): the metadata validates against the model-zoo schema, which a
    copy in the tests folder stands in for (nothing is downloaded). It raises when it does not."""
    from monai.bundle import verify_metadata

    verify_metadata(meta_file=str(find_bundle(bundle).configs_dir / "metadata.json"), filepath=str(SCHEMA))


def test_verify_metadata_fails_on_a_metadata_without_a_required_field(tmp_path):
    from monai.bundle import verify_metadata

    meta = json.loads((find_bundle("dae").configs_dir / "metadata.json").read_text())
    del meta["network_data_format"]
    (tmp_path / "metadata.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="against schema"):
        verify_metadata(meta_file=str(tmp_path / "metadata.json"), filepath=str(SCHEMA))


def test_find_bundle_by_name_and_folder_and_unknown():
    dae = find_bundle("dae")
    assert find_bundle(dae.root) == dae
    with pytest.raises(BundleNotFound, match="available: .*dae"):
        find_bundle("no-such-method")


def test_extra_bundle_folders_come_first(tmp_path, monkeypatch):
    copy = tmp_path / "dae"
    (copy / "configs").mkdir(parents=True)
    (copy / "configs" / "metadata.json").write_text(json.dumps({"version": "9.9", "description": "local copy"}))
    monkeypatch.setenv("MEDANOMALY_BUNDLE_PATH", str(tmp_path))
    assert find_bundle("dae").root == copy.resolve()
    assert find_bundle("dae").version == "9.9"


def _copy_configs(bundle: str, into: Path) -> Path:
    """A bundle folder with a copy of `bundle`'s configs (all discovery looks at)."""
    copy = into / bundle
    shutil.copytree(find_bundle(bundle).configs_dir, copy / "configs")
    return copy


def test_the_search_path_is_the_variable_then_package_data_then_the_checkout(tmp_path, monkeypatch):
    env_copy, packaged = _copy_configs("dae", tmp_path / "mine"), _copy_configs("dae", tmp_path / "packaged")
    monkeypatch.setattr(registry, "PACKAGED_BUNDLES", packaged.parent)
    monkeypatch.delenv(registry.BUNDLE_PATH_ENV, raising=False)
    assert find_bundle("dae").root == packaged.resolve()  # package data before the checkout
    monkeypatch.setenv(registry.BUNDLE_PATH_ENV, os.pathsep.join([str(tmp_path / "missing"), str(env_copy.parent)]))
    assert bundle_search_path() == [tmp_path / "missing", env_copy.parent, packaged.parent, REPO / "monai_bundles"]
    assert find_bundle("dae").root == env_copy.resolve()
    assert [b.root for b in list_bundles() if b.name == "dae"] == [env_copy.resolve()]


def test_an_unknown_bundle_names_every_searched_place(tmp_path, monkeypatch):
    monkeypatch.setenv(registry.BUNDLE_PATH_ENV, os.pathsep.join([str(tmp_path / "missing"), str(tmp_path)]))
    with pytest.raises(BundleNotFound) as error:
        find_bundle("no-such-method")
    message = str(error.value)
    assert f"{tmp_path / 'missing'} ($MEDANOMALY_BUNDLE_PATH, not a folder)" in message
    assert f"{tmp_path} ($MEDANOMALY_BUNDLE_PATH)" in message
    assert f"{REPO / 'monai_bundles'} (the repository checkout)" in message and "available: " in message


def test_an_installed_package_has_no_repository_checkout(tmp_path, monkeypatch):
    site_packages = tmp_path / "lib" / "python3" / "site-packages"
    monkeypatch.setattr(registry, "_PACKAGE", site_packages / "medanomaly")
    monkeypatch.setattr(registry, "REPOSITORY_ROOT", tmp_path / "lib")
    (tmp_path / "lib" / "pyproject.toml").parent.mkdir(parents=True, exist_ok=True)
    (tmp_path / "lib" / "pyproject.toml").write_text("")  # even beside a stray pyproject.toml
    assert registry.repository_bundles() is None
    assert REPO / "monai_bundles" not in bundle_search_path()


def test_command_merges_configs_in_monai_order():
    dae = find_bundle("dae")
    command = bundle_command("dae", "evaluate", overrides={"input": "/data/a b.nii.gz", "threshold": 0.25,
                                                          "device": None}, demo=True, python="python")
    assert command[:4] == ["python", "-m", "monai.bundle", "run"]
    files = eval(command[command.index("--config_file") + 1])
    assert [Path(f).name for f in files] == ["inference.yaml", "evaluate.yaml", "demo.yaml"]
    assert command[command.index("--input") + 1] == "$'/data/a b.nii.gz'"  # one argument, spaces kept, a literal
    assert command[command.index("--threshold") + 1] == "0.25"
    assert "--device" not in command  # None means: leave the config's default
    assert command[command.index("--meta_file") + 1] == str(dae.configs_dir / "metadata.json")
    with pytest.raises(ValueError, match="Unknown workflow"):
        bundle_command("dae", "deploy")


def test_demo_overlay_follows_the_shipped_weights():
    dae = find_bundle("dae")
    inference = bundle_command("dae", "inference")
    uses_demo = "demo.yaml" in " ".join(inference)
    assert uses_demo == dae.weights_need_demo_config
    own = bundle_command("dae", "inference", overrides={"model_dir": "/my/models"})
    assert "demo.yaml" not in " ".join(own)
    assert "demo.yaml" not in " ".join(bundle_command("dae", "train"))


def test_demo_overlay_follows_the_model_info_of_a_given_model_dir(tmp_path):
    (tmp_path / "model_info.json").write_text(json.dumps({"variant": "demo"}))
    own_demo = bundle_command("dae", "evaluate", overrides={"model_dir": str(tmp_path)})
    assert own_demo[own_demo.index("--config_file") + 1].endswith("demo.yaml']")
    assert "demo.yaml" not in " ".join(bundle_command("dae", "evaluate", overrides={"model_dir": str(tmp_path)},
                                                      demo=False))
    (tmp_path / "model_info.json").write_text(json.dumps({"variant": "paper"}))
    assert "demo.yaml" not in " ".join(bundle_command("dae", "evaluate", overrides={"model_dir": str(tmp_path)}))


def _contrast_weight_folders():
    """(bundle, folder) for each contrast's own shipped weights, models[/<variant>]/<contrast>/."""
    from medanomaly.bundles.model_info import weights_contrasts
    from medanomaly.data.contrast import CONTRASTS

    return [pytest.param(bundle.name, info.parent, id=f"{bundle.name}-{info.parent.relative_to(bundle.model_dir)}")
            for bundle in list_bundles() for info in sorted(bundle.model_dir.glob("**/model_info.json"))
            if info.parent.name in CONTRASTS and weights_contrasts(info.parent) == (info.parent.name,)]


@pytest.mark.parametrize("name, folder", _contrast_weight_folders())
def test_each_contrasts_own_weights_are_picked_for_its_scans_and_load(name, folder):
    """A scan of that contrast (and the variant the weights record) resolves to the folder, and the
    bundle's method builds from it (weights, and what the bundle keeps beside them)."""
    from monai.bundle import ConfigParser

    from medanomaly.bundles import bundle_scripts

    bundle, info = find_bundle(name), json.loads((folder / "model_info.json").read_text())
    parser = ConfigParser()
    parser.read_config([str(bundle.config_file(n)) for n in ("inference", "demo")])
    parser.update({"device": "cpu", "contrast": folder.name, **({"model": info["model"]} if "model" in info else {})})
    with bundle_scripts(name):
        assert Path(parser.get_parsed_content("model_dir")) == folder
        assert parser.get_parsed_content("method") is not None


def test_mixed_precision_only_where_the_hardware_runs_it(monkeypatch, caplog):
    """cddpm's demo asks for autocast through `autocast_pays`: CUDA yes; a CPU only with native bf16
    (emulated bf16 made its training step 23 x slower than float32), said in the log."""
    from monai.bundle import ConfigParser

    from medanomaly.bundles import precision

    assert precision.autocast_pays("cuda") and not precision.autocast_pays("meta")
    monkeypatch.setattr(precision, "cpu_has_native_bf16", lambda: True)
    assert precision.autocast_pays("cpu") and "no native bf16" not in caplog.text
    monkeypatch.setattr(precision, "cpu_has_native_bf16", lambda: False)
    assert not precision.autocast_pays(torch.device("cpu")) and "no native bf16" in caplog.text
    parser = ConfigParser()
    parser.read_config([str(find_bundle("cddpm").config_file(n)) for n in ("inference", "demo")])
    parser.update({"device": "$torch.device('cpu')"})
    assert parser.get_parsed_content("amp") is False
    monkeypatch.setattr(precision, "cpu_has_native_bf16", lambda: True)
    parser.update({"device": "$torch.device('cpu')"})  # re-parse
    assert parser.get_parsed_content("amp") is True


def test_progress_lines_round_trip():
    assert parse_progress(format_progress(0.4213, "volume 1/2: slices 3/9")) == (0.421, "volume 1/2: slices 3/9")
    assert parse_progress("2026 - INFO - Epoch 1") is None
    assert parse_progress(format_progress(7)) == (1.0, "")
    # after a tqdm bar's carriage-return output on the shared stdout/stderr pipe
    bar = "PHANES stage 1:   0%|          | 9/6000 [00:10<1:58:09,  1.18s/it]"
    assert parse_progress(bar + "\r" + format_progress(0.002, "stage 1: iteration 11/6000")) == (
        0.002, "stage 1: iteration 11/6000")
    assert parse_progress("the [medanomaly] progress bar is stuck") is None
    seen = []
    progress = VolumeProgress(4, report=lambda f, m: seen.append((f, m)))
    progress.start_volume(2, "sub-1")
    progress.update(5, 10)
    assert seen[-1] == (pytest.approx(0.625), "volume 3/4 sub-1: slices 5/10")


def test_training_progress_is_iterations_or_the_wall_clock_budget_whichever_ends_first():
    from ignite.engine import Engine

    from medanomaly.bundles.handlers import TrainingProgress, training_fraction

    assert training_fraction(25, 100) == 0.25
    assert training_fraction(25, 100, seconds=60, max_seconds=120) == 0.5  # the budget ends it first
    assert training_fraction(80, 100, seconds=60, max_seconds=120) == 0.8
    assert training_fraction(100, 100) == training_fraction(5, 100, 500, 120) == 0.999  # 1 only once done
    seen = []
    trainer = Engine(lambda engine, batch: None)
    TrainingProgress(every_seconds=0, label="dae training", report=lambda f, m: seen.append((f, m))).attach(trainer)
    trainer.run(range(5), max_epochs=2)
    assert [f for f, _ in seen] == pytest.approx([0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.999, 1.0])
    assert seen[3][1] == "dae training: iteration 3/10" and seen[-1][1] == "dae training: done after 10 iterations"


@pytest.mark.parametrize("bundle", ["cddpm", "dae", "sagan", "scrps", "supervised"])
def test_every_ignite_training_reports_its_progress(bundle):
    """train.yaml's trainer handlers include TrainingProgress, given the run's wall-clock budget if it has one."""
    import yaml

    config = yaml.safe_load((find_bundle(bundle).configs_dir / "train.yaml").read_text())
    (handler,) = [h for h in config["train"]["handlers"] if str(h.get("_target_", "")).endswith(".TrainingProgress")]
    assert handler.get("max_seconds") == ("@max_train_seconds" if "max_train_seconds" in config else None)


@pytest.mark.parametrize("bundle", ["cddpm", "dae", "intensity", "phanes", "sagan", "scrps", "supervised"])
def test_overlays_extend_the_inference_handlers_instead_of_repeating_them(bundle):
    """inference.yaml states the handlers every workflow runs once (`base_handlers`: progress, and
    cddpm's per-volume seed); evaluate.yaml and calibrate.yaml replace only `workflow_handlers`."""
    import yaml

    configs = find_bundle(bundle).configs_dir

    def targets(config, key):
        return [h["_target_"].rsplit(".", 1)[-1] for h in config.get(key, [])]

    inference = yaml.safe_load((configs / "inference.yaml").read_text())
    assert inference["handlers"] == "$@base_handlers + @workflow_handlers"
    assert targets(inference, "base_handlers")[0] == "ProgressHandler"
    assert targets(inference, "workflow_handlers") == ["OutputSummaryHandler"]
    expected = {"evaluate": ["OutputSummaryHandler", "CohortMetricsHandler"], "calibrate": ["CalibrationHandler"]}
    for overlay, handlers in expected.items():
        config = yaml.safe_load((configs / f"{overlay}.yaml").read_text())
        assert "handlers" not in config and targets(config, "workflow_handlers") == handlers


@pytest.mark.parametrize("bundle", ["cddpm", "dae", "intensity", "phanes", "sagan", "scrps", "supervised"])
def test_every_nested_demo_setting_has_its_parent_in_every_workflow(bundle):
    """demo.yaml is layered on every workflow (train, inference, calibrate, evaluate): a nested id
    `a#b` whose `a` one of them lacks makes that workflow fail (MONAI: "query key: a")."""
    import yaml

    from medanomaly.bundles.runner import workflow_configs

    info = find_bundle(bundle)
    demo = yaml.safe_load((info.configs_dir / "demo.yaml").read_text())
    for workflow in ("train", "inference", "calibrate", "evaluate"):
        keys = set()
        for name in workflow_configs(info, workflow):
            keys |= set(yaml.safe_load((info.configs_dir / f"{name}.yaml").read_text()) or {})
        missing = [key for key in demo if "#" in key and key.split("#")[0] not in keys]
        assert not missing, f"{bundle} {workflow}: demo.yaml sets {missing} without their parent"


def test_phanes_training_reports_the_iterations_of_both_stages(monkeypatch):
    import types

    from medanomaly.bundles import bundle_scripts

    seen = []
    state = types.SimpleNamespace(stage="both", iterations={1: 300, 2: 100}, _last_report=-float("inf"))
    with bundle_scripts("phanes", "trainer") as scripts:
        monkeypatch.setattr(scripts.trainer, "report_progress", lambda f, m: seen.append((f, m)))
        report = scripts.trainer.PhanesTrainer._report_progress
        report(state, 1, 150)
        report(state, 1, 151)  # within 5 s of the last line: not repeated
        report(state, 2, 100)  # the last iteration always reports
    assert seen == [(0.375, "stage 1: iteration 150/300"), (1.0, "stage 2: iteration 100/100")]


def _python_process(code: str) -> BundleProcess:
    return BundleProcess([sys.executable, "-c", code])


def test_process_streams_lines_and_progress():
    process = _python_process(
        "import sys\n"
        "from medanomaly.bundles import report_progress\n"
        "print('hello')\nreport_progress(0.5, 'half')\nprint('bye')\n"
    )
    lines, progress = [], []
    assert process.wait(on_line=lines.append, on_progress=lambda f, m: progress.append((f, m))) == 0
    assert lines == ["hello", "bye"] and progress == [(0.5, "half")]


def test_failure_raises_with_the_log_tail():
    process = _python_process("print('loading'); raise SystemExit('weights missing')")
    with pytest.raises(BundleRunError, match="weights missing") as error:
        process.wait()
    assert error.value.returncode == 1


def test_cancel_kills_the_whole_process_tree(tmp_path):
    pid_file = tmp_path / "child.pid"
    process = _python_process(
        "import subprocess, sys, time\n"
        f"child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'])\n"
        f"open({str(pid_file)!r}, 'w').write(str(child.pid))\n"
        "print('started', flush=True)\ntime.sleep(60)\n"
    )
    deadline = time.time() + 20
    while not pid_file.exists() or not pid_file.read_text():
        assert time.time() < deadline, "child did not start"
        time.sleep(0.1)
    child = int(pid_file.read_text())
    process.cancel(grace_seconds=2)
    assert process.poll() is not None and process.cancelled
    assert process.wait() != 0  # no BundleRunError for a cancelled run
    for _ in range(50):
        try:
            os.kill(child, 0)
        except ProcessLookupError:
            break
        time.sleep(0.1)
    else:
        pytest.fail("the grandchild process survived cancel()")


def test_poll_lines_does_not_block():
    process = _python_process("import time; print('a', flush=True); time.sleep(3); print('b')")
    start = time.time()
    assert process.poll_lines() in ([], ["a"])
    assert time.time() - start < 1.0
    process.cancel(grace_seconds=1)


def test_root_cause_skips_monai_wrappers():
    from medanomaly.bundles.runner import root_cause

    log = """Traceback (most recent call last):
medanomaly.io.VolumeError: /data/flat.nrrd is 2D: a 3D volume is needed.
The above exception was the direct cause of the following exception:
RuntimeError: applying transform <medanomaly.data.transforms.CheckVolumed object>
RuntimeError: Failed to instantiate component 'monai.engines.evaluator.SupervisedEvaluator' with keywords: device
RuntimeError: Failed to evaluate ConfigExpression: "$@evaluator.run()"
"""
    assert root_cause(log) == "VolumeError: /data/flat.nrrd is 2D: a 3D volume is needed."
    assert root_cause("all fine\n") is None
