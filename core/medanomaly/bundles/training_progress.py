"""Progress of a training as `[medanomaly] progress` lines: the CLI's and the Slicer module's bar
moves during `medanomaly train`, not only during inference."""

from __future__ import annotations

import time

from ignite.engine import Engine, Events

from medanomaly.bundles.progress import report_progress


def training_fraction(iteration: int, total: int, seconds: float = 0.0, max_seconds: float | None = None) -> float:
    """How far a training is: iterations done / planned, or, with a wall-clock budget that will end
    it first, seconds used / budget (the larger of the two); below 1 until it has finished."""
    fraction = iteration / max(total, 1)
    if max_seconds:
        fraction = max(fraction, seconds / max_seconds)
    return min(fraction, 0.999)


class TrainingProgress:
    """Reports `iteration i/n` of an ignite trainer at most every `every_seconds` (and once at the
    start and the end). `max_seconds`: the run's wall-clock budget (`max_train_seconds`), if any."""

    def __init__(self, max_seconds: float | None = None, every_seconds: float = 5.0, label: str = "training",
                 report=report_progress):
        self.max_seconds, self.every_seconds, self.label, self.report = max_seconds, every_seconds, label, report
        self.started = self.last = 0.0

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.STARTED, self.start)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self.iteration_completed)
        engine.add_event_handler(Events.COMPLETED, self.completed)

    def start(self, engine: Engine) -> None:
        self.started = time.monotonic()
        self.last = -float("inf")
        self.iteration_completed(engine)

    def iteration_completed(self, engine: Engine) -> None:
        now = time.monotonic()
        if now - self.last < self.every_seconds:
            return
        self.last = now
        state = engine.state
        total = (state.max_epochs or 1) * (state.epoch_length or 1)
        fraction = training_fraction(state.iteration, total, now - self.started, self.max_seconds)
        self.report(fraction, f"{self.label}: iteration {state.iteration}/{total}")

    def completed(self, engine: Engine) -> None:
        self.report(1.0, f"{self.label}: done after {engine.state.iteration} iterations")
