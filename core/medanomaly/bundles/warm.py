"""A warm worker: bundle runs that do not pay the interpreter's start-up each time.

Importing torch, MONAI and ignite takes 8-12 s on a small CPU, most of the wait for a 3 s dae
inference. `WarmWorker` starts one background process (`python -m medanomaly.bundles.warm SOCKET`)
that imports them once and then waits. Each run is a `fork()` of it: a fresh child process with
everything imported, its own session (cancel ends it and what it started), its output on a pipe
of the caller's, running `python -m monai.bundle run ...` exactly as the command line would. So a
run in the worker is the same run as a `BundleProcess` of the same command, with the same
progress lines, cancel and exit code, minus the start-up; a crash of one run cannot harm the next.

POSIX only (fork, Unix sockets, passing a file descriptor); Linux is what is tested. Elsewhere,
or for a command that is not `python -m monai.bundle ...` (torchrun), or with
MEDANOMALY_WARM_WORKER=0, `WarmWorker.start_bundle` returns a plain `BundleProcess`.

The worker never runs torch code itself: a forked child of a process whose OpenMP thread pool
was started can hang, so it only imports. This module imports no torch (the Slicer module uses it).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
from pathlib import Path
from typing import Mapping

from medanomaly.bundles.runner import BundleProcess

EXIT_MARKER = "\x00medanomaly-exit "  # the child's last line: its exit code (not shown in the log)
PRELOADED = ("torch", "monai", "monai.bundle", "ignite", "ignite.engine", "medanomaly.bundles.handlers",
            "medanomaly.bundles.method", "medanomaly.bundles.writing", "medanomaly.metrics", "medanomaly.data")


def supported() -> bool:
    """True where a warm worker can run: fork and Unix sockets that pass file descriptors, and not
    switched off with MEDANOMALY_WARM_WORKER=0."""
    return (os.environ.get("MEDANOMALY_WARM_WORKER", "1") != "0" and sys.platform.startswith("linux")
            and hasattr(socket, "send_fds"))


class ForkedRun:
    """What `BundleProcess` needs of a `subprocess.Popen`, for a run forked by the worker: the
    output (`stdout`), `pid`, `poll()`, `wait()`. The exit code comes as the output's last line."""

    def __init__(self, output, pid: int):
        self.pid, self.returncode = pid, None
        self._output, self._ended = output, threading.Event()
        self.stdout = self._lines()

    def _lines(self):
        held = None  # an empty line right before the exit marker is the marker's own line break
        try:
            for line in self._output:
                if line.startswith(EXIT_MARKER):
                    self.returncode, held = int(line[len(EXIT_MARKER):]), None
                    continue
                if held is not None:
                    yield held
                held = None
                if line == "\n":
                    held = line
                    continue
                yield line
            if held is not None:
                yield held
        finally:
            if self.returncode is None:  # killed before it could say: a signal (cancel), or a crash
                self.returncode = -15
            self._output.close()
            self._ended.set()

    def poll(self) -> int | None:
        return self.returncode if self._ended.is_set() else None

    def wait(self, timeout: float | None = None) -> int:
        if not self._ended.wait(timeout):
            raise subprocess.TimeoutExpired("warm worker run", timeout)
        return self.returncode


class WarmWorker:
    """One background process with torch, MONAI and ignite imported; `start_bundle` forks a run
    from it. It starts on first use (or `start()`) in the background and never makes a caller wait:
    until it is ready, runs start as processes of their own (`wait_ready` waits, for scripts and
    tests); `close()` ends it."""

    def __init__(self, python: str | None = None, env: Mapping[str, str] | None = None,
                 modules: tuple[str, ...] = PRELOADED):
        """`env`: what the worker's environment adds to this process's (PYTHONPATH, the bundle
        search path): read when the worker starts, so a run's own `env` cannot change imports."""
        self.python, self.env, self.modules = python or sys.executable, dict(env or {}), tuple(modules)
        self._server: subprocess.Popen | None = None
        self._folder = None
        self._lock = threading.Lock()
        self._is_ready, self._ready_event = False, threading.Event()

    @property
    def socket_path(self) -> Path:
        return Path(self._folder.name) / "worker.sock"

    def start(self) -> None:
        """Starts the worker process (once), without waiting; it is ready when it has imported everything."""
        with self._lock:
            if self._server is not None and self._server.poll() is None:
                return
            self._folder = tempfile.TemporaryDirectory(prefix="medanomaly-worker-")
            self._is_ready = False
            self._server = subprocess.Popen(
                [self.python, "-m", "medanomaly.bundles.warm", str(self.socket_path), *self.modules],
                stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                encoding="utf-8", errors="replace", start_new_session=True, env={**os.environ, **self.env})
            self._ready_event = threading.Event()
            threading.Thread(target=self._read_until_ready, args=(self._server, self._ready_event),
                             daemon=True).start()

    def _read_until_ready(self, server: subprocess.Popen, ready: threading.Event) -> None:
        for line in server.stdout:  # import warnings may come first
            if line.strip() == "ready":
                self._is_ready = True
                break
        ready.set()  # ready, or the worker ended (then runs start processes of their own)

    @property
    def ready(self) -> bool:
        return self._is_ready and self._server is not None and self._server.poll() is None

    def wait_ready(self, timeout: float = 120.0) -> bool:
        """Starts the worker if needed and waits until it is ready (its imports done); False when it
        is not after `timeout` seconds or could not start."""
        self.start()
        self._ready_event.wait(timeout)
        return self.ready

    def can_run(self, command: list[str]) -> bool:
        return (supported() and len(command) > 3 and command[0] == self.python
                and command[1:3] == ["-m", "monai.bundle"])

    def start_bundle(self, command: list[str], cwd: str | None = None,
                     env: Mapping[str, str] | None = None) -> BundleProcess:
        """The run of `command` (`runner.bundle_command`'s), forked from the worker where it can be,
        else in a process of its own (also while the worker is still importing: nobody waits for it)."""
        if not self.can_run(command):
            return BundleProcess(command, cwd=cwd, env=env)
        self.start()
        if not self.ready:
            return BundleProcess(command, cwd=cwd, env=env)
        return BundleProcess(command, cwd=cwd, env=env, spawn=self._fork)

    def _fork(self, command: list[str], cwd: str | None, env: Mapping[str, str]) -> ForkedRun:
        read_end, write_end = os.pipe()
        request = {"module": command[2], "argv": command[3:], "cwd": cwd, "env": dict(env)}
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as connection:
            connection.connect(str(self.socket_path))
            socket.send_fds(connection, [json.dumps(request).encode("utf-8")], [write_end])
            os.close(write_end)
            pid = int(json.loads(connection.makefile("r", encoding="utf-8").readline())["pid"])
        output = open(read_end, "r", encoding="utf-8", errors="replace", buffering=1)
        return ForkedRun(output, pid)

    def close(self) -> None:
        with self._lock:
            if self._server is not None and self._server.poll() is None:
                self._server.terminate()
                try:
                    self._server.wait(timeout=5)
                except subprocess.TimeoutExpired:
                    self._server.kill()
            self._server = None
            if self._folder is not None:
                self._folder.cleanup()
                self._folder = None


# --------------------------------------------------------------------------- the worker process
def _run_child(request: dict, output_fd: int) -> None:
    """In the forked child: its own session, the caller's pipe as stdout / stderr, folder and
    environment, then `python -m <module> <argv>`; reports the exit code as the last line."""
    import runpy
    import signal
    import traceback

    os.setsid()
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)  # the worker ignores it; data-loader workers need it
    os.dup2(output_fd, 1)
    os.dup2(output_fd, 2)
    os.close(output_fd)
    sys.stdout = sys.stderr = open(1, "w", encoding="utf-8", errors="replace", buffering=1, closefd=False)
    code = 1
    try:
        if request.get("cwd"):
            os.chdir(request["cwd"])
        sys.path[0] = os.getcwd()  # as `python -m` started in that folder would have it
        os.environ.update(request.get("env") or {})
        sys.argv = [request["module"], *request["argv"]]
        runpy.run_module(request["module"], run_name="__main__", alter_sys=True)
        code = 0
    except SystemExit as stop:
        code = stop.code if isinstance(stop.code, int) else (0 if stop.code is None else 1)
    except BaseException:
        traceback.print_exc()
    finally:
        sys.stdout.flush()
        os.write(1, f"\n{EXIT_MARKER}{code}\n".encode())
        os._exit(code)


def serve(socket_path: str, modules: tuple[str, ...] = PRELOADED) -> None:
    """The worker: imports `modules` once, then forks one child per request."""
    import importlib
    import signal

    for name in modules:
        importlib.import_module(name)
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # the system reaps the children; exit codes go by pipe
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(socket_path)
    server.listen(8)
    server.settimeout(5.0)
    parent = os.getppid()
    print("ready", flush=True)
    while True:
        try:
            connection, _ = server.accept()
        except socket.timeout:
            if os.getppid() != parent:  # the application that started it is gone (even if it crashed)
                return
            continue
        connection.settimeout(None)
        with connection:
            message, fds, _, _ = socket.recv_fds(connection, 1 << 20, 1)
            request = json.loads(message.decode("utf-8"))
            pid = os.fork()
            if pid == 0:
                server.close()
                _run_child(request, fds[0])
            os.close(fds[0])
            connection.sendall((json.dumps({"pid": pid}) + "\n").encode("utf-8"))


if __name__ == "__main__":
    serve(sys.argv[1], tuple(sys.argv[2:]))
