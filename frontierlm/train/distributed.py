"""Data parallelism for training: under torchrun (WORLD_SIZE > 1) join the process group (gloo on CPU, nccl on
CUDA), replicate or shard the model, and let only rank 0 write files.

`parallel: ddp` (default) wraps the model in DistributedDataParallel: every rank holds the whole model and
optimizer state. `parallel: fsdp` shards parameters, gradients and optimizer state over the ranks with FSDP2
(torch.distributed.fsdp.fully_shard; CPU/gloo and CUDA/nccl), one unit per decoder layer plus the root for the
rest. Checkpoints stay what one process writes: saving gathers full state dicts on rank 0, and resuming loads
the full model weights before sharding and cuts each rank's shard out of the full optimizer state.
"""
from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from frontierlm.train.config import PARALLEL_MODES


def resolve_device(spec: str, local_rank: int = 0) -> torch.device:
    if spec == "auto":
        spec = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(spec)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", local_rank)
    return device


def _is_dtensor(value) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(value, DTensor)


@dataclass
class DistContext:
    rank: int
    world_size: int
    device: torch.device
    owns_group: bool = False  # we initialised the process group, so we tear it down
    parallel: str = "ddp"  # one of PARALLEL_MODES

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def sharded(self) -> bool:
        """FSDP over several processes: parameters, gradients and optimizer state are DTensor shards (one
        process trains the plain model whatever `parallel` says)."""
        return self.parallel == "fsdp" and self.world_size > 1

    @classmethod
    def from_env(cls, device_spec: str, parallel: str = "ddp") -> "DistContext":
        """Single process unless torchrun's WORLD_SIZE > 1 (then RANK / LOCAL_RANK / MASTER_* are set)."""
        if parallel not in PARALLEL_MODES:
            raise ValueError(f"parallel must be one of {PARALLEL_MODES}, got {parallel!r}")
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world <= 1:
            return cls(0, 1, resolve_device(device_spec), parallel=parallel)
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        device = resolve_device(device_spec, local_rank)
        owns = not dist.is_initialized()
        if owns:
            if device.type == "cuda":
                torch.cuda.set_device(device)
            dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        return cls(dist.get_rank(), dist.get_world_size(), device, owns, parallel)

    def check_batch(self, batch_size: int) -> None:
        if batch_size % self.world_size:
            raise ValueError(f"data.batch_size ({batch_size}) must be divisible by the number of "
                             f"data-parallel processes ({self.world_size})")

    def wrap(self, module: nn.Module, blocks=(), keep=()) -> nn.Module:
        """The module to train. DDP: a DistributedDataParallel wrapper. FSDP: `module` itself, sharded in
        place: each of `blocks` (the decoder layers) is a unit whose weights are gathered only around its own
        forward / backward, the root holds the rest. `keep`: parameters left whole on every rank because code
        outside autograd updates them (MoE correction biases; every rank applies the same update).
        Build the optimizer afterwards: fully_shard replaces the parameters with DTensor shards."""
        if self.world_size == 1:
            return module
        if self.parallel == "fsdp":
            from torch.distributed.device_mesh import init_device_mesh
            from torch.distributed.fsdp import fully_shard

            mesh = init_device_mesh(self.device.type, (self.world_size,))
            ignored = set(keep) or None
            for block in blocks:
                fully_shard(block, mesh=mesh, ignored_params=ignored)
            fully_shard(module, mesh=mesh, ignored_params=ignored)
            return module
        from torch.nn.parallel import DistributedDataParallel

        return DistributedDataParallel(module, device_ids=[self.device.index] if self.device.type == "cuda" else None)

    @contextlib.contextmanager
    def grad_sync(self, wrapped: nn.Module, sync: bool):
        """Around one micro-batch's backward: reduce gradients over ranks only when `sync` (the last
        micro-batch); until then each rank accumulates its own (FSDP: unsharded, so memory for a full set of
        gradients buys one reduce-scatter per step instead of one per micro-batch)."""
        if self.world_size == 1 or sync:
            yield
        elif self.sharded:
            wrapped.set_requires_gradient_sync(False)
            try:
                yield
            finally:
                wrapped.set_requires_gradient_sync(True)
        else:
            with wrapped.no_sync():
                yield

    def clip_grad_norm_(self, parameters, max_norm: float) -> float:
        """Clip to a global grad norm; returns the norm before clipping. FSDP: the norm of DTensor gradient
        shards is reduced over the ranks, so it is the norm of the whole gradient."""
        if not self.sharded:
            return float(torch.nn.utils.clip_grad_norm_(parameters, max_norm))
        parameters = list(parameters)
        norm = torch.nn.utils.get_total_norm([p.grad for p in parameters if p.grad is not None])
        if _is_dtensor(norm):
            norm = norm.full_tensor()
        torch.nn.utils.clip_grads_with_norm_(parameters, max_norm, norm)
        return float(norm)

    # ----- full state dicts under FSDP (collectives: every rank calls them, rank 0 gets the result) -----

    def full_model_state(self, module: nn.Module) -> dict[str, torch.Tensor] | None:
        """The full state dict of a sharded `module` as CPU tensors on rank 0 ({} on the others); None when
        not sharded (the module's own state_dict() is already full)."""
        if not self.sharded:
            return None
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        return get_model_state_dict(module, options=StateDictOptions(full_state_dict=True, cpu_offload=True))

    def full_optimizer_state(self, optimizer: torch.optim.Optimizer) -> dict | None:
        """optimizer.state_dict() as one process holding the whole model would return it (parameters by
        index, full tensors on CPU) on rank 0 ({} on the others); None when not sharded."""
        if not self.sharded:
            return None
        state = optimizer.state_dict()
        full = {}
        for idx, values in state["state"].items():  # the same order on every rank: the all-gathers pair up
            full[idx] = {k: (v.full_tensor().cpu() if _is_dtensor(v) else v) for k, v in values.items()}
        return {"state": full, "param_groups": state["param_groups"]} if self.is_main else {}

    def shard_optimizer_state(self, optimizer: torch.optim.Optimizer, state: dict) -> dict:
        """The inverse for resuming: a full optimizer state dict (every rank read the file) -> this rank's
        shards, ready for optimizer.load_state_dict. Unchanged when not sharded."""
        if not self.sharded:
            return state
        from torch.distributed.tensor import distribute_tensor

        # load_state_dict pairs saved parameter indices with parameters by position in param_groups.
        params = {i: p for saved, group in zip(state["param_groups"], optimizer.param_groups)
                  for i, p in zip(saved["params"], group["params"])}
        out = {}
        for idx, values in state["state"].items():
            p = params.get(idx)
            if p is None or not _is_dtensor(p):
                out[idx] = values
                continue
            # src_data_rank=None: each rank holds the full tensor and keeps its own shard, no communication.
            out[idx] = {k: distribute_tensor(v.to(p.device), p.device_mesh, p.placements, src_data_rank=None)
                        if isinstance(v, torch.Tensor) and v.shape == p.shape else v for k, v in values.items()}
        return {**state, "state": out}

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
