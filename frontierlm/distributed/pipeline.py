"""Pipeline parallelism: the decoder layers split into contiguous stages, hidden states sent stage to stage.

A stage builds only its own layers; the others are `MissingLayer`s (no parameters, no KV cache) that pass the
activations through, so the model's forward loop is unchanged. The first layer of a later stage receives
(x, residual) from the stage before it (a forward pre-hook) and the last layer of an earlier stage sends them on
(a forward hook, non-blocking). The embedding and the vocab-parallel LM head live on stage 0 (so tied weights
stay one tensor); the last stage sends its final hidden states back to stage 0 for the logits.

A step's sequences are cut into pp_size micro-batches (`split_step`): stage 0 runs micro-batch 1 while
stage 1 runs micro-batch 0, so the stages idle only at the ends of the step (the bubble,
`benchmarks/parallel.py` measures it). Sequences attend independently, so the split changes no result.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from frontierlm.distributed.state import ParallelContext, build_context
from frontierlm.layers.attention import AttentionMetadata


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
    """The sends and receives of one rank's stage; pending sends are waited at the end of each step."""

    def __init__(self, ctx: ParallelContext):
        self.ctx = ctx
        self.pending: list = []

    def receive(self, module, args):
        x, residual = args[0], args[1]
        src = self.ctx.stage_rank(self.ctx.pp_rank - 1)
        x = torch.empty_like(x)
        residual = torch.empty_like(x)
        dist.recv(x, src, group=self.ctx.control_group, tag=0)
        dist.recv(residual, src, group=self.ctx.control_group, tag=1)
        return (x, residual, *args[2:])

    def send(self, module, args, output):
        x, residual = output
        dst = self.ctx.stage_rank(self.ctx.pp_rank + 1)
        group = self.ctx.control_group
        self.pending += [dist.isend(x.contiguous(), dst, group=group, tag=0),
                         dist.isend(residual.contiguous(), dst, group=group, tag=1)]

    def send_final(self, hidden: torch.Tensor) -> None:
        self.pending.append(dist.isend(hidden.contiguous(), self.ctx.stage_rank(0), group=self.ctx.control_group,
                                       tag=2))

    def receive_final(self, like: torch.Tensor) -> torch.Tensor:
        out = torch.empty_like(like)
        dist.recv(out, self.ctx.stage_rank(self.ctx.pp_size - 1), group=self.ctx.control_group, tag=2)
        return out

    def wait(self) -> None:
        for work in self.pending:
            work.wait()
        self.pending.clear()


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


def split_step(meta: AttentionMetadata, num_tokens: int, parts: int) -> list[tuple[int, int, AttentionMetadata]]:
    """(first token, end token, metadata) of up to `parts` micro-batches of whole sequences, balanced by tokens."""
    qlens = meta.query_lens_cpu
    total, seqs = sum(qlens), len(qlens)
    parts = max(1, min(parts, seqs))
    cuts, acc, j = [0], 0, 1
    for i, n in enumerate(qlens):
        acc += n
        if j < parts and acc >= total * j / parts and i + 1 < seqs and seqs - (i + 1) >= parts - j:
            cuts.append(i + 1)
            j += 1
    cuts.append(seqs)
    out, starts = [], [0]
    for n in qlens:
        starts.append(starts[-1] + n)
    for a, b in zip(cuts, cuts[1:]):
        t0, t1 = starts[a], starts[b] if b < seqs else num_tokens  # padding rows ride with the last part
        out.append((t0, t1, AttentionMetadata(
            slot_mapping=meta.slot_mapping[t0:t1], query_start_loc=meta.query_start_loc[a:b + 1] - starts[a],
            seq_lens=meta.seq_lens[a:b], block_tables=meta.block_tables[a:b], query_lens_cpu=qlens[a:b],
            seq_lens_cpu=meta.seq_lens_cpu[a:b], max_query_len=max(qlens[a:b]),
            max_seq_len=max(meta.seq_lens_cpu[a:b]), block_size=meta.block_size)))
    return out


def pipelined_forward(model: nn.Module, ctx: ParallelContext, input_ids: torch.Tensor, positions: torch.Tensor,
                      meta: AttentionMetadata) -> torch.Tensor | None:
    """This rank's part of one step: every micro-batch through its stage. Stage 0 returns the final hidden
    states of the whole step (received from the last stage); other stages return None."""
    if ctx.pp_size == 1:
        return model(input_ids, positions, meta)
    links: StageLinks = ctx.links
    parts = split_step(meta, input_ids.shape[0], ctx.pp_size)
    local = []
    for t0, t1, m in parts:
        hidden = model(input_ids[t0:t1], positions[t0:t1], m)
        if ctx.is_last_stage:
            links.send_final(hidden)
        local.append(hidden)
    out = None
    if ctx.is_first_stage:
        out = torch.cat([links.receive_final(h) for h in local], dim=0)
    links.wait()
    return out
