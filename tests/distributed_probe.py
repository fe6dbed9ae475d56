"""Test-only ignite handler for tests/test_distributed.py: what one rank of a torchrun training holds.

The test adds it to the trainer's handlers through a config overlay; every rank writes
`probe_rank<r>.pt` with its networks' state when training starts and ends and its loss at every
iteration, so the test can compare ranks without touching the bundle's own outputs."""

from __future__ import annotations

from typing import Mapping

import torch
from ignite.engine import Engine, Events


def _state(network: torch.nn.Module) -> dict:
    return {key: value.detach().cpu().clone() for key, value in network.state_dict().items()}


class ParameterProbe:
    def __init__(self, path: str, networks: Mapping[str, torch.nn.Module]):
        self.path, self.networks = path, dict(networks)
        self.record: dict = {"losses": []}

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.STARTED, self._started)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self._iteration)
        engine.add_event_handler(Events.COMPLETED, self._completed)

    def _started(self, engine: Engine) -> None:
        self.record["initial"] = {name: _state(net) for name, net in self.networks.items()}

    def _iteration(self, engine: Engine) -> None:
        output = engine.state.output  # MONAI's iterations: decollated items; a GAN step: one dict
        self.record["losses"].append(float((output[0] if isinstance(output, list) else output)["loss"]))

    def _completed(self, engine: Engine) -> None:
        self.record["final"] = {name: _state(net) for name, net in self.networks.items()}
        self.record["iterations"] = engine.state.iteration
        torch.save(self.record, self.path)
