"""Who this process is in a parallel run, and the process groups it talks over.

A run of `world = tensor_parallel_size * pipeline_parallel_size` processes: rank = stage * tp + tp_rank, so the
ranks of one pipeline stage are consecutive (on one node with the default placement: TP inside a node, PP
across nodes, as vLLM advises). Rank 0 is the driver (scheduler, tokenizer, sampler, server); the others are
workers. Layers read the context once, when the model is built (`building(ctx)`), and keep what they need
(their rank, size and group) as attributes: nothing is looked up globally during a forward.
"""
from __future__ import annotations

import contextlib
import datetime
import os
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

DEFAULT_TIMEOUT_S = 120.0  # a collective that waits longer than this means a peer died or hangs
STARTUP_TIMEOUT_S = 900.0  # joining and loading the shards (imports, reading weights) may take much longer


def positive_env(name: str, default: float, unit: str) -> float:
    """A positive number from environment variable `name` (unset or empty: `default`), else a ValueError naming it."""
    value = os.environ.get(name)
    if not value:
        return default
    try:
        number = float(value)
    except ValueError:
        raise ValueError(f"{name} must be a number of {unit}, got {value!r}") from None
    if not number > 0:
        raise ValueError(f"{name} must be > 0, got {value!r}")
    return number


def collective_timeout_s() -> float:
    """FRONTIERLM_DIST_TIMEOUT_S, else DEFAULT_TIMEOUT_S: how long any rank waits for the others."""
    return positive_env("FRONTIERLM_DIST_TIMEOUT_S", DEFAULT_TIMEOUT_S, "seconds")


@dataclass
class ParallelContext:
    """One process's place in the run. With world_size 1 every layer behaves exactly as the unsharded one."""

    rank: int = 0
    tp_size: int = 1
    pp_size: int = 1
    enable_expert_parallel: bool = False
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    tp_group: object = None       # this stage's TP ranks
    tp_reduce: object = None      # shm.TPAllReduce over tp_group: shared memory on one host (CPU), else gloo/NCCL
    head_group: object = None     # stage 0's TP ranks (the embedding and vocab-parallel LM head live there)
    num_layers: int = 0           # the model's layers, split into pp_size contiguous stages
    links: object = None          # pipeline.StageLinks of this rank's stage (pp_size > 1)
    control_group: object = None  # every rank, with the collective timeout: step messages and stage transfers
    return_group: object = None   # every rank (pp_size > 1): the last stage's hidden states back to stage 0, on
    #                               their own NCCL communicator so they never queue behind the forward sends

    @property
    def world_size(self) -> int:
        return self.tp_size * self.pp_size

    @property
    def tp_rank(self) -> int:
        return self.rank % self.tp_size

    @property
    def pp_rank(self) -> int:
        return self.rank // self.tp_size

    @property
    def is_driver(self) -> bool:
        return self.rank == 0

    @property
    def is_first_stage(self) -> bool:
        return self.pp_rank == 0

    @property
    def is_last_stage(self) -> bool:
        return self.pp_rank == self.pp_size - 1

    def stage_rank(self, stage: int) -> int:
        """The rank holding this process's TP shard in another stage."""
        return stage * self.tp_size + self.tp_rank

    def stage_layers(self, stage: int | None = None) -> range:
        """The layers of a stage: contiguous, the first stages take one more when they do not divide evenly."""
        stage = self.pp_rank if stage is None else stage
        base, extra = divmod(self.num_layers, self.pp_size)
        start = stage * base + min(stage, extra)
        return range(start, start + base + (1 if stage < extra else 0))


SINGLE = ParallelContext()
_building: list[ParallelContext] = []


@contextlib.contextmanager
def building(ctx: ParallelContext):
    """Layers constructed inside this block shard themselves for `ctx`."""
    _building.append(ctx)
    try:
        yield ctx
    finally:
        _building.pop()


def build_context() -> ParallelContext:
    """The context of the model being built (SINGLE outside `building`)."""
    return _building[-1] if _building else SINGLE


def backend_for(device: torch.device) -> str:
    return "nccl" if device.type == "cuda" else "gloo"


def init_process_groups(ctx: ParallelContext, master_addr: str, master_port: int) -> ParallelContext:
    """Join the run (torch.distributed's env rendezvous at MASTER_ADDR:MASTER_PORT) and make the TP groups of
    every stage plus the head group; every rank creates every group, in the same order."""
    # The rendezvous of env:// (a TCP store on MASTER_ADDR:MASTER_PORT), named explicitly: setting RANK /
    # WORLD_SIZE in os.environ would make anything else in this process (the trainer) think it runs under torchrun.
    host = f"[{master_addr}]" if ":" in master_addr else master_addr
    timeout = datetime.timedelta(seconds=collective_timeout_s())
    kwargs = {"device_id": ctx.device} if ctx.device.type == "cuda" else {}
    # the default group only waits for everyone at start-up (barrier after loading); steps use the groups below
    dist.init_process_group(backend_for(ctx.device), init_method=f"tcp://{host}:{master_port}", rank=ctx.rank,
                            world_size=ctx.world_size,
                            timeout=datetime.timedelta(seconds=max(STARTUP_TIMEOUT_S, timeout.total_seconds())),
                            **kwargs)
    ctx.control_group = dist.new_group(list(range(ctx.world_size)), timeout=timeout)
    if ctx.pp_size > 1:
        ctx.return_group = dist.new_group(list(range(ctx.world_size)), timeout=timeout)
    for stage in range(ctx.pp_size):
        ranks = list(range(stage * ctx.tp_size, (stage + 1) * ctx.tp_size))
        group = dist.new_group(ranks, timeout=timeout)
        if stage == ctx.pp_rank:
            ctx.tp_group = group
        if stage == 0:
            ctx.head_group = group
    if ctx.tp_size > 1:
        from frontierlm.distributed.shm import TPAllReduce, setup

        shm = None  # (CUDA: NCCL all-reduces; every rank of a run has the same device type)
        if ctx.device.type == "cpu":
            shm = setup(ctx.tp_group, ctx.tp_rank, ctx.tp_size, ctx.pp_rank * ctx.tp_size, timeout.total_seconds())
        ctx.tp_reduce = TPAllReduce(ctx.tp_group, shm)
    return ctx


def tp_reduce(ctx: ParallelContext):
    """The TP all-reduce a layer keeps (gloo / NCCL over tp_group when the run set up none)."""
    from frontierlm.distributed.shm import TPAllReduce

    return ctx.tp_reduce if ctx.tp_reduce is not None else TPAllReduce(ctx.tp_group)


def step_broadcast(ctx: ParallelContext, x: torch.Tensor, group) -> torch.Tensor:
    """The driver's (global rank 0) `x` into every rank's `x` over `group` (the control or the head group).
    Without pipeline stages both groups hold exactly the TP ranks in the same order, so the broadcast can take the
    TP group's shared memory (about 7 us where gloo takes milliseconds on a VM, docs/benchmarks.md)."""
    if ctx.pp_size == 1 and ctx.tp_reduce is not None:
        return ctx.tp_reduce.broadcast(x, root=ctx.rank == 0)
    dist.broadcast(x, 0, group=group)
    return x
