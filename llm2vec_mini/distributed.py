"""Several processes, one training run: who am I, how many are we, and joining the group.

`torchrun --nproc_per_node=N` starts N copies of the same command and sets RANK, WORLD_SIZE and
LOCAL_RANK; `init_distributed` joins them into one process group (gloo on CPUs, NCCL on GPUs).
Without torchrun everything here is the identity: rank 0 of a world of 1.

Reference: PyTorch, "Getting started with distributed data parallel",
https://pytorch.org/tutorials/intermediate/ddp_tutorial.html
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist


def world() -> tuple[int, int]:
    """(rank, world size); (0, 1) without torch.distributed."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def all_reduce_sum(x: torch.Tensor) -> torch.Tensor:
    """The sum of `x` over every process (a new tensor, no gradient); `x` itself under one process."""
    if world()[1] == 1:
        return x
    total = x.detach().clone()
    dist.all_reduce(total)
    return total


def sum_over_processes(share: torch.Tensor) -> torch.Tensor:
    """The sum of every process's `share` as the value, this process's `share` as the gradient.

    A loss that is a sum over the global batch (each process holding its part) gets the same value on
    every process, while backward still reaches only this process's examples; DDP then adds up the
    gradients (as a mean, which the trainer undoes). Under one process: `share` itself.
    """
    if world()[1] == 1:
        return share
    return share + (all_reduce_sum(share) - share.detach())


def init_distributed(device: str = "cpu") -> bool:
    """Join the process group when launched by torchrun (gloo on CPU, NCCL on GPUs)."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or dist.is_initialized():
        return dist.is_initialized()
    dist.init_process_group(backend="nccl" if device.startswith("cuda") else "gloo")
    if device.startswith("cuda"):
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    return True


def barrier() -> None:
    """Wait until every process gets here; nothing under one process."""
    if world()[1] > 1:
        dist.barrier()
