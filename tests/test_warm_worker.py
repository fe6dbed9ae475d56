"""The warm worker (#18): runs forked from one process that imported torch, MONAI and ignite once,
with the output, exit code and cancel of a process of their own."""

from __future__ import annotations

import sys
import time

import pytest

from medanomaly.bundles import BundleRunError, runner, warm

pytestmark = pytest.mark.skipif(not warm.supported(), reason="the warm worker needs fork and Unix sockets (Linux)")


@pytest.fixture(scope="module")
def light_worker():
    """A worker that preloads nothing (fast to start); the runs are ordinary modules."""
    worker = warm.WarmWorker(modules=())
    assert worker.wait_ready(timeout=30)
    yield worker
    worker.close()


def _run(worker, *module_and_arguments: str, cwd=None, env=None) -> runner.BundleProcess:
    return runner.BundleProcess([sys.executable, "-m", *module_and_arguments], cwd=cwd, env=env, spawn=worker._fork)


PROBE = """import os, sys
print("folder", os.getcwd())
print("value", os.environ.get("MEDANOMALY_TEST_VALUE"))
print("arguments", sys.argv[1:])
print("no line break at the end", end="")
"""


def test_a_forked_run_is_python_dash_m_in_its_folder_and_environment(light_worker, tmp_path):
    (tmp_path / "probe_module.py").write_text(PROBE)
    process = _run(light_worker, "probe_module", "a", "b c", cwd=str(tmp_path), env={"MEDANOMALY_TEST_VALUE": "7"})
    assert process.wait() == 0
    assert list(process.lines()) == [] and process.log_tail.splitlines() == [
        f"folder {tmp_path}", "value 7", "arguments ['a', 'b c']", "no line break at the end"]
    assert isinstance(process.process, warm.ForkedRun)


def test_a_failing_run_reports_its_exit_code_and_message(light_worker, tmp_path):
    process = _run(light_worker, "json.tool", str(tmp_path / "missing.json"))
    with pytest.raises(BundleRunError) as failure:
        process.wait()
    assert failure.value.returncode == 2 and "missing.json" in failure.value.log_tail


def test_cancel_ends_a_forked_run_and_the_worker_serves_the_next(light_worker):
    process = _run(light_worker, "timeit", "-n", "100000000000", "pass")
    time.sleep(1.0)
    assert process.poll() is None
    process.cancel(grace_seconds=5)
    assert process.cancelled and process.poll() is not None and process.poll() < 0
    assert _run(light_worker, "platform").wait() == 0


def test_only_plain_bundle_commands_go_to_the_worker(light_worker, monkeypatch):
    command = runner.bundle_command("dae", "inference", demo=True)
    assert light_worker.can_run(command)
    assert not light_worker.can_run(runner.bundle_command("dae", "train", demo=True, nproc=2))  # torchrun
    monkeypatch.setenv("MEDANOMALY_WARM_WORKER", "0")
    assert not light_worker.can_run(command)
    assert light_worker.start_bundle(["true"]).spawn is None  # a process of its own


@pytest.mark.slow  # ~1 min: the worker imports torch / MONAI, then dae detects a tiny scan twice
def test_dae_detection_in_the_worker_writes_what_a_new_process_writes(tiny, tmp_path):
    import json

    import numpy as np

    from medanomaly import io
    from medanomaly.data import load_datalist

    scan = load_datalist(tiny, "test_lesion")[0]["image"]
    worker = warm.WarmWorker()
    assert worker.start_bundle(["true"]).spawn is None  # not a bundle command: a process of its own
    worker.start()  # in the background: a run before it is ready gets a process of its own
    try:
        outputs = []
        for name, start in (("plain", runner.BundleProcess), ("warm", worker.start_bundle)):
            folder = tmp_path / name
            command = runner.bundle_command("dae", "inference", {"input": scan, "output_dir": str(folder)})
            if name == "warm":
                assert worker.wait_ready(timeout=120)
            process = start(command)
            assert process.wait() == 0
            assert (process.spawn is not None) == (name == "warm")
            summary = json.loads((folder / "detections.json").read_text())
            outputs.append(io.volume_array(io.read_volume(summary[0]["heatmap"], allow_constant=True)))
        np.testing.assert_array_equal(outputs[0], outputs[1])
    finally:
        worker.close()
