"""Loading trained weights into a network, and finding the checkpoint a training resumes from."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from medanomaly.bundles.model_info import MODEL_FILE


def load_weights(network: torch.nn.Module, model_dir: str | os.PathLike, device=None,
                 filename: str = MODEL_FILE) -> torch.nn.Module:
    """Loads `model_dir/filename` (default `model.pt`) into the network, with errors that say what to do."""
    path = Path(model_dir) / filename
    if not path.is_file():
        raise FileNotFoundError(f"No weights at {path}: train the bundle first (medanomaly train ...), "
                                "or pass --model_dir pointing to a folder with model.pt.")
    state = torch.load(path, map_location="cpu", weights_only=True)
    state = state.get("model", state) if isinstance(state, dict) else state
    try:
        network.load_state_dict(state)
    except RuntimeError as error:
        raise RuntimeError(f"The weights in {path} do not fit this network configuration (weights trained "
                           f"with the demo overlay need configs/demo.yaml too): {error}") from error
    return network.to(device) if device is not None else network


def latest_checkpoint(model_dir: str | os.PathLike) -> str | None:
    """The checkpoint to resume from: the final one, else the newest periodic one."""
    model_dir = Path(model_dir)
    if (model_dir / "checkpoint.pt").is_file():
        return str(model_dir / "checkpoint.pt")
    periodic = sorted(model_dir.glob("checkpoint_epoch=*.pt"), key=lambda p: int(p.stem.split("=")[1]))
    return str(periodic[-1]) if periodic else None
