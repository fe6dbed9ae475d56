"""Run a bundle's workflow (`train`, `inference`, `evaluate`, `calibrate`) in its own process, or in
N processes under torchrun (`nproc`: PyTorch distributed, the bundle's multi_gpu_train.yaml or
multi_gpu_evaluate.yaml).

The CLI, the benchmark and the Slicer module all launch bundles through `bundle_command`
and `BundleProcess`, so what a user runs from a shell is exactly what the tests run.
"""

from __future__ import annotations

import os
import queue
import re
import signal
import subprocess
import sys
import threading
from collections import deque
from dataclasses import dataclass, field
from typing import Callable, Mapping

from medanomaly.bundles.model_info import trained_with_demo_config
from medanomaly.bundles.progress import parse_progress
from medanomaly.bundles.registry import BundleInfo, find_bundle, list_bundles

# Config files of each workflow, in the order MONAI merges them (later ones override).
WORKFLOW_CONFIGS = {
    "train": ["train"],
    "inference": ["inference"],
    "evaluate": ["inference", "evaluate"],
    "calibrate": ["inference", "calibrate"],
}
# The overlay that runs a workflow in several processes under torchrun: DDP training on train.yaml;
# volumes sharded over the processes on inference.yaml (+ evaluate / calibrate); a bundle's post-train
# workflow X (e.g. scrps' build_repository) in several processes: its multi_gpu_X.yaml.
DISTRIBUTED_CONFIGS = {
    "train": "multi_gpu_train",
    "inference": "multi_gpu_evaluate",
    "evaluate": "multi_gpu_evaluate",
    "calibrate": "multi_gpu_evaluate",
}


def distributed_config(workflow: str) -> str:
    """The name of the overlay that runs `workflow` in several processes."""
    return DISTRIBUTED_CONFIGS.get(workflow) or f"multi_gpu_{workflow}"


def workflow_configs(bundle: BundleInfo, workflow: str) -> list[str]:
    """Config names of a workflow: a shared one (WORKFLOW_CONFIGS), or one of the bundle's
    post-train workflows (an overlay on inference.yaml, listed in its metadata.json)."""
    if workflow in WORKFLOW_CONFIGS:
        return list(WORKFLOW_CONFIGS[workflow])
    if workflow in bundle.post_train_workflows:
        return ["inference", workflow]
    choices = ", ".join([*WORKFLOW_CONFIGS, *bundle.post_train_workflows])
    raise ValueError(f"Unknown workflow '{workflow}' for bundle '{bundle.name}' (choose from {choices}).")


# torchrun prefixes a worker's traceback lines with its rank: `[rank1]: ValueError: ...`
_EXCEPTION_LINE = re.compile(r"^(?:\[rank\d+\]:\s*)?(?:[\w.]+\.)?(\w*(?:Error|Exception|Missing|NotFound)): (.+)$")


_WRAPPERS = ("Failed to evaluate", "applying transform", "Failed to instantiate")


def root_cause(log: str) -> str | None:
    """The exception a user must act on: the last one raised in the log's tracebacks, not
    counting MONAI's wrappers ('Failed to evaluate ...', 'applying transform ...')."""
    causes = [f"{m[1]}: {m[2]}" for m in map(_EXCEPTION_LINE.match, map(str.strip, log.splitlines()))
              if m and not m[2].startswith(_WRAPPERS)]
    return causes[-1] if causes else None


class BundleRunError(RuntimeError):
    """A bundle process that failed; `headline` is what to act on, `str()` adds the log's tail."""

    def __init__(self, message: str, returncode: int, log_tail: str):
        cause = root_cause(log_tail)
        self.headline = f"{cause}\n({message})" if cause else message
        super().__init__(f"{self.headline}\n--- last lines of the log ---\n{log_tail}")
        self.returncode, self.log_tail, self.cause = returncode, log_tail, cause


class ConfigText(str):
    """An override written in MONAI's config language (`--set` values: `6000`, `[1, 2]`,
    `$@x * 2`), passed to the bundle as written. Every other string is a literal."""


def _plain(value):
    """Paths as strings, recursively."""
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


def _holds_text(value) -> bool:
    if isinstance(value, str):
        return True
    if isinstance(value, (list, dict)):
        return any(map(_holds_text, value.values() if isinstance(value, dict) else value))
    return False


def _format_override(value) -> str:
    """A value as MONAI's command line reads it back into exactly this value. Strings (paths,
    names) become a config expression that is a Python literal, `$'...'`: python-fire would turn
    `2024` into an int, and MONAI's parser would run a name starting with `$` or resolve `@x`.
    MONAI rewrites `@id` and `#` even inside an expression's string literals, so `@` and `#` are
    written as the escapes `\\x40` and `\\x23`."""
    if isinstance(value, ConfigText):
        return str(value)
    value = _plain(value)
    if not _holds_text(value):
        return repr(value)
    return "$" + repr(value).replace("@", "\\x40").replace("#", "\\x23")


def config_keys(bundle: BundleInfo, workflow: str, demo: bool = True, distributed: bool = False) -> set[str]:
    """The top-level keys a workflow's configs define (with the demo overlay's, and with `distributed`
    the multi-process overlay's): what an override may set."""
    import yaml

    names = [*workflow_configs(bundle, workflow), *([distributed_config(workflow)] if distributed else []),
             *(["demo"] if demo else [])]
    keys: set[str] = set()
    for name in names:
        config = yaml.safe_load(bundle.config_file(name).read_text(encoding="utf-8")) or {}
        keys |= set(config)
    return keys


def check_override_keys(bundle, workflow: str, keys, distributed: bool = False) -> None:
    """Raises `ValueError` for a key no config of the workflow defines (a typo would otherwise be
    ignored silently), naming the closest keys. A nested id `a#b` is checked by its first part."""
    import difflib

    bundle = find_bundle(bundle)
    known = config_keys(bundle, workflow, distributed=distributed)
    unknown = [key for key in keys if str(key).split("#")[0] not in known]
    if unknown:
        hints = "; ".join(f"'{key}' (did you mean {', '.join(difflib.get_close_matches(key, known, 3)) or 'none close'}"
                          "?)" for key in unknown)
        raise ValueError(f"Unknown setting for {bundle.name} {workflow}: {hints}. The settings are the keys of "
                         f"{bundle.configs_dir}/{{{','.join(workflow_configs(bundle, workflow))}}}.yaml.")


def uses_demo_config(bundle: BundleInfo, workflow: str, overrides: Mapping | None, demo: bool | None) -> bool:
    """Explicit choice wins; otherwise inference and evaluation use the overlay the weights were
    trained with: the shipped weights' or, with a `model_dir` override, that folder's (its
    model_info.json). A bare `model_path` says nothing of its network: no overlay."""
    if demo is not None:
        return demo
    overrides = overrides or {}
    if workflow == "train" or "model_path" in overrides:
        return False
    return trained_with_demo_config(overrides.get("model_dir") or bundle.model_dir)


def torchrun_command(nproc: int, python: str | None = None) -> list[str]:
    """The start of a command that runs a Python module in `nproc` processes on this machine:
    torchrun (`python -m torch.distributed.run`) with a rendezvous of its own on a free port
    (`--standalone`). Several machines: torchrun's --nnodes / --rdzv-* options (docs/DISTRIBUTED.md)."""
    if isinstance(nproc, bool) or not isinstance(nproc, int) or nproc < 1:
        raise ValueError(f"The number of processes must be an integer >= 1 (got {nproc!r}).")
    return [python or sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc)]


def check_distributed(bundle: BundleInfo, workflow: str) -> None:
    """Raises `ValueError` unless `workflow` of `bundle` can run in several processes."""
    workflow_configs(bundle, workflow)  # an unknown workflow: the error that names the known ones
    overlay = distributed_config(workflow)
    if not bundle.has_config(overlay):
        names = ", ".join(b.name for b in list_bundles() if b.has_config(overlay)) or "none"
        raise ValueError(f"Bundle '{bundle.name}' has no configs/{overlay}.yaml: its {workflow} runs in one process "
                         f"only (bundles whose {workflow} runs in several: {names}).")


def bundle_command(
    bundle: str | os.PathLike | BundleInfo,
    workflow: str = "inference",
    overrides: Mapping | None = None,
    demo: bool | None = None,
    python: str | None = None,
    nproc: int | None = None,
) -> list[str]:
    """The `python -m monai.bundle run ...` command line of one workflow; with `nproc`, the workflow
    in that many processes: `python -m torch.distributed.run ... -m monai.bundle run` with the
    workflow's configs, its multi-process overlay (multi_gpu_train.yaml, multi_gpu_evaluate.yaml),
    then demo.yaml when used."""
    bundle = find_bundle(bundle)
    if nproc is not None:
        check_distributed(bundle, workflow)
    with_demo = uses_demo_config(bundle, workflow, overrides, demo)
    names = (workflow_configs(bundle, workflow) + ([distributed_config(workflow)] if nproc is not None else [])
             + (["demo"] if with_demo else []))
    config_files = [str(bundle.config_file(name)) for name in names]
    launcher = [python or sys.executable] if nproc is None else torchrun_command(nproc, python)
    command = [
        *launcher, "-m", "monai.bundle", "run",
        "--config_file", repr(config_files) if len(config_files) > 1 else config_files[0],
        "--meta_file", str(bundle.configs_dir / "metadata.json"),
        "--logging_file", str(bundle.configs_dir / "logging.conf"),
    ]
    for key, value in (overrides or {}).items():
        if value is not None:
            command += [f"--{key}", _format_override(value)]
    return command


def _new_process(command: list[str], cwd: str | None, env: Mapping[str, str]) -> subprocess.Popen:
    """A new interpreter in its own session (cancel ends its whole process tree)."""
    return subprocess.Popen(
        command, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL, text=True, encoding="utf-8", errors="replace", bufsize=1,
        start_new_session=True, creationflags=getattr(subprocess, "CREATE_NO_WINDOW", 0),
    )


@dataclass
class BundleProcess:
    """A running bundle: lines and progress stream in from a reader thread; `cancel` ends
    the whole process tree (the bundle may start data-loader workers)."""

    command: list[str]
    cwd: str | None = None
    env: Mapping[str, str] | None = None
    log_lines: int = 200
    # how the process starts: a new interpreter (subprocess.Popen), or `spawn(command, cwd, env)`
    # giving an object with Popen's stdout / pid / poll / wait (warm.WarmWorker: a fork of a warm process)
    spawn: Callable | None = None
    _lines: "queue.Queue[str | None]" = field(default_factory=queue.Queue, init=False)
    _tail: deque = field(init=False)

    def __post_init__(self):
        self._tail = deque(maxlen=self.log_lines)
        # UTF-8 both ways, and an undecodable byte becomes U+FFFD instead of killing the reader
        # thread (which would leave the bundle blocked on a full pipe); no console window on Windows
        env = {**os.environ, **(self.env or {}), "PYTHONUNBUFFERED": "1", "PYTHONIOENCODING": "utf-8"}
        self.cancelled = False
        self.process = (self.spawn or _new_process)(self.command, self.cwd, env)
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.process.stdout:
            self._lines.put(line.rstrip("\n"))
        self._lines.put(None)

    def lines(self, timeout: float | None = None):
        """Yields output lines as they arrive, until the process closes its output."""
        while True:
            try:
                line = self._lines.get(timeout=timeout)
            except queue.Empty:
                return
            if line is None:
                self._lines.put(None)  # keep the end marker for later callers
                return
            self._tail.append(line)
            yield line

    def poll_lines(self) -> list[str]:
        """Lines that arrived since the last call, without waiting (for GUI timers)."""
        return list(self.lines(timeout=0))

    @property
    def log_tail(self) -> str:
        return "\n".join(self._tail)

    def poll(self) -> int | None:
        return self.process.poll()

    def cancel(self, grace_seconds: float = 5.0) -> None:
        """Terminates the process group, then kills it if it does not stop in time."""
        if self.process.poll() is not None:
            return
        self.cancelled = True
        for sig, wait in ((signal.SIGTERM, grace_seconds), (signal.SIGKILL, None)):
            try:
                os.killpg(self.process.pid, sig)
            except ProcessLookupError:
                try:  # a forked run cancelled before it made its own session
                    os.kill(self.process.pid, sig)
                except ProcessLookupError:
                    return
            try:
                self.process.wait(timeout=wait)
                return
            except subprocess.TimeoutExpired:
                continue

    def wait(
        self,
        on_line: Callable[[str], None] | None = None,
        on_progress: Callable[[float, str], None] | None = None,
    ) -> int:
        """Streams the output to the callbacks and returns the exit code; raises
        `BundleRunError` (with the log's last lines) when the bundle failed."""
        try:
            for line in self.lines():
                progress = parse_progress(line)
                if progress is not None and on_progress is not None:
                    on_progress(*progress)
                elif on_line is not None:
                    on_line(line)
            returncode = self.process.wait()
        except BaseException:
            # Ctrl-C or a failing callback: the bundle runs in its own session, so it would
            # otherwise outlive us and keep writing to the output folder.
            self.cancel()
            raise
        if returncode != 0 and not self.cancelled:
            raise BundleRunError(f"The bundle failed ({describe_exit(returncode)}): {' '.join(self.command)}",
                                 returncode, self.log_tail)
        return returncode


def describe_exit(returncode: int) -> str:
    """An exit code in words; a signal says what usually sent it."""
    if returncode >= 0:
        return f"exit code {returncode}"
    try:
        name = signal.Signals(-returncode).name
    except ValueError:
        name = f"signal {-returncode}"
    why = {"SIGKILL": "usually the system ran out of memory and killed it; try a smaller batch, fewer inputs "
                      "at a time, or a machine with more memory",
           "SIGTERM": "it was asked to stop", "SIGSEGV": "a crash in native code",
           "SIGINT": "interrupted"}.get(name, "")
    return f"killed by {name}" + (f": {why}" if why else "")


def threads_per_process(nproc: int | None) -> dict[str, str]:
    """CPU threads of each of `nproc` processes on this machine: its cores shared between them
    (torchrun would give each one thread, leaving cores idle when there are fewer processes than
    cores; N processes with all cores each slow each other many times over). Nothing when the user
    set OMP_NUM_THREADS, or for one process (torch takes every core)."""
    if not nproc or nproc < 2 or "OMP_NUM_THREADS" in os.environ:
        return {}
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return {"OMP_NUM_THREADS": str(max(1, cores // nproc))}


def start_bundle(bundle, workflow="inference", overrides=None, demo=None, python=None, cwd=None, env=None, nproc=None):
    return BundleProcess(bundle_command(bundle, workflow, overrides, demo, python, nproc), cwd=cwd,
                         env={**threads_per_process(nproc), **(env or {})})


def run_bundle(bundle, workflow="inference", overrides=None, demo=None, python=None, cwd=None, env=None,
               on_line=None, on_progress=None, nproc=None) -> int:
    """Runs a workflow to its end, streaming its log and progress; raises on failure. `nproc`: the
    workflow in that many processes under torchrun (see `bundle_command`), the cores shared
    between them (`threads_per_process`)."""
    process = start_bundle(bundle, workflow, overrides, demo, python, cwd, env, nproc)
    return process.wait(on_line=on_line, on_progress=on_progress)

