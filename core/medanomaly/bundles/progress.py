"""The one-line progress protocol between a running bundle and whoever launched it.

A bundle prints `[medanomaly] progress 0.421 volume 2/5 sub-0003: slices 40/96` on stdout;
the CLI, the benchmark and the Slicer module parse it with `parse_progress`.
"""

from __future__ import annotations

import re
import sys

PREFIX = "[medanomaly] progress"
_LINE = re.compile(r"^\[medanomaly\] progress (?P<fraction>[01](?:\.\d+)?)(?: (?P<message>.*))?$")


def format_progress(fraction: float, message: str = "") -> str:
    fraction = min(max(float(fraction), 0.0), 1.0)
    return f"{PREFIX} {fraction:.3f} {message}".rstrip()


def report_progress(fraction: float, message: str = "", stream=None) -> None:
    stream = stream or sys.stdout
    print(format_progress(fraction, message), file=stream, flush=True)


def parse_progress(line: str) -> tuple[float, str] | None:
    """(fraction, message) of a progress line, None for any other line. A progress line may follow a
    progress bar's carriage-return output on the same line (stderr and stdout share one pipe): the
    part from the last progress prefix on counts."""
    start = line.rfind(PREFIX)
    match = _LINE.match(line[start:].strip()) if start >= 0 else None
    if match is None:
        return None
    return float(match["fraction"]), match["message"] or ""


class VolumeProgress:
    """Overall progress of a run over `n_volumes`, each made of slice batches."""

    def __init__(self, n_volumes: int = 1, report=report_progress):
        self.n_volumes, self.report = max(int(n_volumes), 1), report
        self.index, self.name = 0, ""

    def start_volume(self, index: int, name: str = "") -> None:
        self.index, self.name = index, name
        self.update(0, 1)

    def update(self, done: int, total: int) -> None:
        fraction = (self.index + done / max(total, 1)) / self.n_volumes
        label = f"volume {self.index + 1}/{self.n_volumes}" + (f" {self.name}" if self.name else "")
        self.report(fraction, f"{label}: slices {done}/{total}")
