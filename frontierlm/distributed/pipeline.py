"""Pipeline parallelism: the decoder layers split into contiguous stages, hidden states sent stage to stage.

A stage builds only its own layers; the others are `MissingLayer`s (no parameters, no KV cache) that pass the
activations through, so the model's forward loop is unchanged. The first layer of a later stage receives
(x, residual) from the stage before it (a forward pre-hook) and the last layer of an earlier stage sends them on
(a forward hook, non-blocking). The embedding and the vocab-parallel LM head live on stage 0 (so tied weights
stay one tensor); the last stage sends its final hidden states back to stage 0 for the logits.

Batches move through the stages one tick at a time (`StageQueue`): every rank sees every tick (the driver's
step header), and at tick t stage k runs the batch that entered at tick t - k, so while stage 1 runs batch A
stage 0 already runs batch B. Stage 0 gets a batch's final hidden states back at tick t + pp - 1; the driver
keeps up to pp batches in flight (virtual_engines.py) and sends empty ticks to drain the pipeline. Each stage
runs its batches in the order they entered, so a KV block written by an earlier batch (a prefix-cache hit, a
freed block handed on) is written at every stage before a later batch reads it there.
"""
from __future__ import annotations

from collections import deque

import torch
import torch.distributed as dist
from torch import nn

from frontierlm.distributed.state import ParallelContext, build_context


class MissingLayer(nn.Module):
    """A decoder layer another stage holds: passes (x, residual) through."""

    is_missing = True

    def forward(self, x, residual, *args):
        return x, residual


class MissingEmbedding(nn.Module):
    """Stage > 0 has no embedding: the first layer's input arrives from the previous stage instead."""

    is_missing = True

    def __init__(self, hidden_size: int):
        super().__init__()
        self.hidden_size = hidden_size
        self.register_buffer("like", torch.empty(0), persistent=False)  # dtype and device of the activations

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.like.new_empty(*input_ids.shape, self.hidden_size)


class StageLinks:
    """The sends and receives of one rank's stage. A send is waited a tick later, when its receiver (which
    runs that batch one tick after this stage) has posted the matching receive."""

    def __init__(self, ctx: ParallelContext):
        self.ctx = ctx
        self.tick = 0
        self.pending: list = []  # (tick, work, tensor kept alive until sent)

    def receive(self, module, args):
        x, residual = args[0], args[1]
        src = self.ctx.stage_rank(self.ctx.pp_rank - 1)
        x = torch.empty_like(x)
        residual = torch.empty_like(x)
        dist.recv(x, src, group=self.ctx.control_group, tag=0)
        dist.recv(residual, src, group=self.ctx.control_group, tag=1)
        return (x, residual, *args[2:])

    def _isend(self, t: torch.Tensor, dst: int, tag: int, group) -> None:
        t = t.contiguous()
        self.pending.append((self.tick, dist.isend(t, dst, group=group, tag=tag), t))

    def send(self, module, args, output):
        x, residual = output
        dst = self.ctx.stage_rank(self.ctx.pp_rank + 1)
        self._isend(x, dst, 0, self.ctx.control_group)
        self._isend(residual, dst, 1, self.ctx.control_group)

    def send_final(self, hidden: torch.Tensor) -> None:
        self._isend(hidden, self.ctx.stage_rank(0), 2, self.ctx.return_group)

    def receive_final(self, shape, dtype) -> torch.Tensor:
        out = torch.empty(shape, dtype=dtype, device=self.ctx.device)
        dist.recv(out, self.ctx.stage_rank(self.ctx.pp_size - 1), group=self.ctx.return_group, tag=2)
        return out

    def wait_before(self, tick: int) -> None:
        keep = []
        for entry in self.pending:
            if entry[0] < tick:
                entry[1].wait()
            else:
                keep.append(entry)
        self.pending = keep


def stage_layers(num_layers: int, build) -> nn.ModuleList:
    """`build(i)` for the layers of this rank's stage, MissingLayer for the rest, hooks at the stage edges."""
    ctx = build_context()
    if ctx.pp_size == 1:
        return nn.ModuleList(build(i) for i in range(num_layers))
    if num_layers < ctx.pp_size:
        raise ValueError(f"pipeline_parallel_size={ctx.pp_size} is more than the model's {num_layers} layers")
    ctx.num_layers = num_layers
    mine = ctx.stage_layers()
    layers = nn.ModuleList(build(i) if i in mine else MissingLayer() for i in range(num_layers))
    links = ctx.links = ctx.links or StageLinks(ctx)
    if not ctx.is_first_stage:
        layers[mine.start].register_forward_pre_hook(links.receive)
    if not ctx.is_last_stage:
        layers[mine.stop - 1].register_forward_hook(links.send)
    return layers


def first_stage_only(build):
    """The embedding (and head): built on stage 0, a stand-in elsewhere."""
    ctx = build_context()
    return build() if ctx.is_first_stage else None


class StageQueue:
    """One rank's side of the ticks. `tick(batch)` (batch: (input_ids, positions, attn_meta), or None for a
    tick that brings no new batch) runs this stage's batch of the tick and returns, on stage 0, the final
    hidden states of the batch that entered pp - 1 ticks ago (None when that tick brought none); later stages
    return None. With one stage a tick is just the forward."""

    def __init__(self, model: nn.Module, ctx: ParallelContext):
        self.model, self.ctx, self.links = model, ctx, ctx.links
        self.waiting: deque = deque()  # batches this stage runs in a later tick (stage k holds k)
        self.finals: deque = deque()   # stage 0: (shape, dtype) of each tick's batch, until it comes back
        self.ticks = 0

    def tick(self, batch) -> torch.Tensor | None:
        ctx = self.ctx
        if ctx.pp_size == 1:
            return self.model(*batch) if batch is not None else None
        self.links.tick = self.ticks
        self.waiting.append(batch)
        mine = self.waiting.popleft() if len(self.waiting) > ctx.pp_rank else None
        hidden = self.model(*mine) if mine is not None else None
        if ctx.is_last_stage and hidden is not None:
            self.links.send_final(hidden)
        out = None
        if ctx.is_first_stage:
            self.finals.append(None if hidden is None else (hidden.shape, hidden.dtype))
            if len(self.finals) == ctx.pp_size:
                done = self.finals.popleft()
                out = self.links.receive_final(*done) if done is not None else None
        self.links.wait_before(self.ticks)
        self.ticks += 1
        return out
