"""Data parallelism for training: under torchrun (WORLD_SIZE > 1) join the process group (gloo on CPU, nccl on
CUDA), wrap the model in DistributedDataParallel, and let only rank 0 write files.

FSDP is not used: the models this trainer targets fit on one device, and DDP keeps checkpoints plain
state dicts. Sharding parameters would change saving and resuming, not the training loop.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn


def resolve_device(spec: str, local_rank: int = 0) -> torch.device:
    if spec == "auto":
        spec = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(spec)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", local_rank)
    return device


@dataclass
class DistContext:
    rank: int
    world_size: int
    device: torch.device
    owns_group: bool = False  # we initialised the process group, so we tear it down

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @classmethod
    def from_env(cls, device_spec: str) -> "DistContext":
        """Single process unless torchrun's WORLD_SIZE > 1 (then RANK / LOCAL_RANK / MASTER_* are set)."""
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world <= 1:
            return cls(0, 1, resolve_device(device_spec))
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        device = resolve_device(device_spec, local_rank)
        owns = not dist.is_initialized()
        if owns:
            if device.type == "cuda":
                torch.cuda.set_device(device)
            dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        return cls(dist.get_rank(), dist.get_world_size(), device, owns)

    def check_batch(self, batch_size: int) -> None:
        if batch_size % self.world_size:
            raise ValueError(f"data.batch_size ({batch_size}) must be divisible by the number of "
                             f"data-parallel processes ({self.world_size})")

    def wrap(self, module: nn.Module) -> nn.Module:
        if self.world_size == 1:
            return module
        from torch.nn.parallel import DistributedDataParallel

        return DistributedDataParallel(module, device_ids=[self.device.index] if self.device.type == "cuda" else None)

    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        if self.world_size > 1:
            dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        return tensor

    def barrier(self) -> None:
        if self.world_size > 1:
            dist.barrier()

    def close(self) -> None:
        if self.owns_group and dist.is_initialized():
            dist.destroy_process_group()
            self.owns_group = False
