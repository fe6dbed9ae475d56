"""PyTorch distributed for the bundles' multi-process overlays (docs/DISTRIBUTED.md): the process
group, the evaluation shards and the exact merge of what each rank collected.

Training (`multi_gpu_train.yaml`) and evaluation / calibration (`multi_gpu_evaluate.yaml`) start
the same process group. An evaluation gives rank r the volumes r, r + N, r + 2N, ... of the
datalist (`shard_sampler`); at the end `gather_in_order` puts every rank's records back into the
datalist's order, so the cohort metrics of N processes are those of one process, bit for bit.
"""

from __future__ import annotations

import datetime
import os
from typing import Sequence

import torch
import torch.distributed as dist


def process_device() -> torch.device:
    """This process's device under torchrun: `cuda:<LOCAL_RANK>` when CUDA is available, else the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return torch.device("cpu")


def start_process_group(device: torch.device | str, timeout_minutes: float = 60) -> int:
    """Joins the process group torchrun describes (NCCL on CUDA, gloo on CPUs) unless already
    joined, and ignite's distributed helpers with it (their first use runs collectives, which a
    handler on rank 0 alone would leave hanging). Returns this process's rank."""
    import ignite.distributed

    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo",
                                timeout=datetime.timedelta(minutes=timeout_minutes))
    ignite.distributed.sync()
    return dist.get_rank()


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def is_main_process() -> bool:
    return rank() == 0


def shard_sampler(dataset: Sequence):
    """Rank r's volumes of `dataset` for an evaluation: r, r + N, r + 2N, ... (no shuffling, no
    padding: no volume is scored twice). Every rank needs one volume at least."""
    from monai.data import DistributedSampler

    if len(dataset) < world_size():
        raise ValueError(f"{len(dataset)} volume(s) for {world_size()} processes: every process needs one volume "
                         f"at least; run with --nproc {max(len(dataset), 1)} or fewer.")
    return DistributedSampler(dataset, even_divisible=False, shuffle=False, num_replicas=world_size(), rank=rank())


def gather_in_order(items: Sequence) -> list:
    """Every rank's `items` (the ones of its `shard_sampler` shard, in order) merged into the
    dataset's order, on every rank; `items` itself outside a process group. A collective: every
    rank calls it."""
    if world_size() < 2:
        return list(items)
    shards: list = [None] * world_size()
    dist.all_gather_object(shards, list(items))
    merged, longest = [], max(len(shard) for shard in shards)
    for index in range(longest):  # rank r held the dataset's items r, r + N, r + 2N, ...
        merged += [shard[index] for shard in shards if index < len(shard)]
    return merged


def shard_progress(sampler):
    """The progress of an evaluation shard: rank 0 reports its volumes (the largest shard, so
    the last to finish, or nearly); the other ranks are silent, so one progress line is printed."""
    from medanomaly.bundles.progress import VolumeProgress

    return VolumeProgress(len(sampler), **({} if is_main_process() else {"report": lambda *_: None}))


# --------------------------------------------------------------------------- training without DDP's wrapper
# For trainers whose steps call a network's own methods (PHANES' encode / decode) rather than its
# forward, where DistributedDataParallel's hooks never run: the same guarantees by hand.
def broadcast_from_rank0(*modules: torch.nn.Module, buffers_only: bool = False) -> None:
    """Every rank takes rank 0's parameters and buffers (DDP does so at the start), or only its
    buffers (BatchNorm's running statistics: DDP broadcasts them before every forward)."""
    if world_size() < 2:
        return
    for module in modules:
        tensors = list(module.buffers()) if buffers_only else [*module.parameters(), *module.buffers()]
        for tensor in tensors:
            dist.broadcast(tensor.data, src=0)


def average_gradients(optimizer: torch.optim.Optimizer) -> None:
    """The mean over the ranks of the gradients of `optimizer`'s parameters (DDP's all-reduce),
    before its step: with identical starting weights the ranks then stay identical."""
    if world_size() < 2:
        return
    for group in optimizer.param_groups:
        for parameter in group["params"]:
            if parameter.grad is not None:
                dist.all_reduce(parameter.grad, op=dist.ReduceOp.SUM)
                parameter.grad /= world_size()
