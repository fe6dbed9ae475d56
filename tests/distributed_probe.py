"""Test-only helpers of tests/test_distributed.py, run inside its distributed processes: what one
rank of a torchrun training holds (`ParameterProbe`), and ranks that stop apart (`stop_one_rank`).

The test adds the probe to the trainer's handlers through a config overlay; every rank writes
`probe_rank<r>.pt` with its networks' state when training starts and ends and its loss at every
iteration, so the test can compare ranks without touching the bundle's own outputs."""

from __future__ import annotations

from pathlib import Path
from typing import Mapping

import torch
from ignite.engine import Engine, Events


def _state(network: torch.nn.Module) -> dict:
    return {key: value.detach().cpu().clone() for key, value in network.state_dict().items()}


class ParameterProbe:
    """`stop_after`: this rank alone stops its trainer after that iteration (as its own TimeLimit would)."""

    def __init__(self, path: str, networks: Mapping[str, torch.nn.Module], stop_after: int | None = None):
        self.path, self.networks, self.stop_after = path, dict(networks), stop_after
        self.record: dict = {"losses": []}

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.STARTED, self._started)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self._iteration)
        engine.add_event_handler(Events.COMPLETED, self._completed)

    def _started(self, engine: Engine) -> None:
        self.record["initial"] = {name: _state(net) for name, net in self.networks.items()}

    def _iteration(self, engine: Engine) -> None:
        output = engine.state.output  # MONAI's iterations: decollated items; a GAN step: one dict
        losses = output[0] if isinstance(output, list) else output
        self.record["losses"].append(float(losses["loss"] if "loss" in losses else next(iter(losses.values()))))
        if engine.state.iteration == self.stop_after:
            engine.terminate()

    def _completed(self, engine: Engine) -> None:
        self.record["final"] = {name: _state(net) for name, net in self.networks.items()}
        self.record["iterations"] = engine.state.iteration
        torch.save(self.record, self.path)


def stop_one_rank(local_rank: int, folder: str) -> None:
    """In each of two gloo processes: an ignite engine of 2 epochs x 5 iterations where rank 1 alone
    is told to stop after iteration 3 (a TimeLimit of its own) and rank 0 alone after epoch 1 of a
    second run (an early stop decided on rank 0)."""
    import ignite.distributed as idist

    from medanomaly.bundles.handlers import DistributedTermination

    rank, ended = idist.get_rank(), []
    for stopping_rank, event in ((1, Events.ITERATION_COMPLETED(once=3)), (0, Events.EPOCH_COMPLETED(once=1))):
        engine = Engine(lambda engine, batch: None)
        if rank == stopping_rank:
            engine.add_event_handler(event, lambda engine: engine.terminate())
        DistributedTermination().attach(engine)  # last, as in the overlays' `run`
        engine.run(range(5), max_epochs=2)
        ended.append(engine.state.iteration)
    Path(folder, f"rank{rank}.txt").write_text(" ".join(map(str, ended)))
