"""Sharded experts for MoE layers: tensor parallelism cuts every expert's intermediate size, expert parallelism
(`enable_expert_parallel`) places whole experts on the ranks.

Both keep the tokens replicated on every rank of the TP group (attention is tensor-parallel, so every rank
holds the same hidden states): with TP each rank runs every routed pair through its slice of the expert; with
EP each rank runs only the pairs routed to its own experts. Either way a rank's output is a partial sum over
the experts, and the MoE block's one all-reduce combines them (shared experts add their partial first). Dispatch
is therefore a local selection and combine the all-reduce; an all-to-all would only pay off with tokens sharded
across ranks (data-parallel attention), which FrontierLM does not do.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from frontierlm.distributed.layers import materialize, read_shard
from frontierlm.distributed.state import build_context
from frontierlm.layers.moe import FusedExperts
from frontierlm.quant.sharding import Region


def make_experts(num_experts: int, hidden_size: int, intermediate_size: int, act: str) -> FusedExperts:
    ctx = build_context()
    if ctx.tp_size == 1:
        return FusedExperts(num_experts, hidden_size, intermediate_size, act)
    if ctx.enable_expert_parallel:
        return ExpertParallelExperts(num_experts, hidden_size, intermediate_size, act, ctx.tp_rank, ctx.tp_size)
    return TensorParallelExperts(num_experts, hidden_size, intermediate_size, act, ctx.tp_rank, ctx.tp_size,
                                 ctx.tp_group)


class TensorParallelExperts(FusedExperts):
    """Every expert's gate/up rows and down columns [r * I/T, (r + 1) * I/T) on rank r.

    Quantized (frontierlm/quant/moe.py), each rank quantizes its own slice: w13's rows are whole rows, so its
    scales are those of one process; w2's rows are cut, so its per-channel scales take the max over the TP
    group (`reduce_absmax`) and its groups must not straddle two ranks (`check_quantization`)."""

    def __init__(self, num_experts, hidden_size, intermediate_size, act, rank: int, size: int, group=None):
        if intermediate_size % size:
            raise ValueError(f"tensor_parallel_size={size} does not divide the experts' intermediate size "
                             f"({intermediate_size}); try enable_expert_parallel")
        self.rank, self.size, self.group, self.full_intermediate = rank, size, group, intermediate_size
        super().__init__(num_experts, hidden_size, intermediate_size // size, act)
        self.w13.loads_slices = self.w2.loads_slices = True

    def check_quantization(self, fused: str, scheme) -> None:
        """Refuse a scheme whose scale blocks would span two ranks' slices."""
        if scheme.strategy in ("block", "tensor"):
            raise ValueError(f"FP8 {scheme.strategy} scales on tensor-parallel experts are not supported (they "
                             f"span the {self.intermediate_size} intermediate rows / columns of each rank's slice); "
                             f"use fp8 (per channel) or enable_expert_parallel")
        if fused == "w2" and scheme.strategy == "group" and self.intermediate_size % scheme.group_size:
            raise ValueError(f"tensor_parallel_size={self.size} leaves {self.intermediate_size} of the experts' "
                             f"{self.full_intermediate} intermediate columns per rank in the down projection, "
                             f"not a multiple of the quantization group size {scheme.group_size}; try "
                             f"enable_expert_parallel")

    def reduce_absmax(self, absmax: torch.Tensor) -> torch.Tensor:
        """absmax [E, H, 1] of this rank's w2 columns -> that of the whole rows (every rank gets the same)."""
        dist.all_reduce(absmax, op=dist.ReduceOp.MAX, group=self.group)
        return absmax

    def shard_region(self, fused: str) -> Region:
        """This rank's part of one expert's checkpoint tensor (gate / up: rows; down: columns)."""
        i, h, full = self.intermediate_size, self.hidden_size, self.full_intermediate
        if fused == "w13":
            return Region(self.rank * i, i, 0, h, full, h)
        return Region(0, h, self.rank * i, i, h, full)

    def _load_w13(self, param, loaded_weight, shard_id=None):
        r = self.shard_region("w13")
        if shard_id is None:  # [E, 2I, H] stacked: cut the gate and the up half
            full = materialize(loaded_weight)
            gate, up = full.split(self.full_intermediate, dim=1)
            return super()._load_w13(param, torch.cat([g.narrow(1, r.row0, r.rows) for g in (gate, up)], 1))
        super()._load_w13(param, read_shard(loaded_weight, 0, r.row0, r.rows), shard_id)

    def _load_w2(self, param, loaded_weight, shard_id=None):
        r = self.shard_region("w2")
        if shard_id is None:
            return super()._load_w2(param, read_shard(loaded_weight, 2, r.col0, r.cols))
        super()._load_w2(param, read_shard(loaded_weight, 1, r.col0, r.cols), shard_id)


class ExpertParallelExperts(FusedExperts):
    """Experts [r * E/T, (r + 1) * E/T) whole on rank r; the other ranks' checkpoint tensors are never read."""

    def __init__(self, num_experts, hidden_size, intermediate_size, act, rank: int, size: int):
        if num_experts % size:
            raise ValueError(f"enable_expert_parallel: {size} ranks do not divide the {num_experts} experts")
        self.global_experts, self.local = num_experts, num_experts // size
        self.first = rank * self.local
        super().__init__(self.local, hidden_size, intermediate_size, act)
        self.w13.loads_slices = self.w2.loads_slices = True
        # the loader checks these shard ids: this rank's experts, under their global numbers
        self.w13.shard_ids = tuple((e, p) for e in range(self.first, self.first + self.local) for p in (0, 1))
        self.w2.shard_ids = tuple((e, None) for e in range(self.first, self.first + self.local))

    def owns(self, shard_id) -> bool:
        return shard_id is None or self.first <= shard_id[0] < self.first + self.local

    def _localize(self, shard_id):
        if shard_id is None:
            return None
        return (shard_id[0] - self.first, shard_id[1])

    def _load_w13(self, param, loaded_weight, shard_id=None):
        if shard_id is None:
            return super()._load_w13(param, read_shard(loaded_weight, 0, self.first, self.local))
        if self.owns(shard_id):
            super()._load_w13(param, materialize(loaded_weight), self._localize(shard_id))

    def _load_w2(self, param, loaded_weight, shard_id=None):
        if shard_id is None:
            return super()._load_w2(param, read_shard(loaded_weight, 0, self.first, self.local))
        if self.owns(shard_id):
            super()._load_w2(param, materialize(loaded_weight), self._localize(shard_id))

    def forward(self, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor):
        """Only the (token, expert) pairs routed to this rank's experts; returns this rank's partial output and
        the tokens per expert of all experts (every rank routes every token, so the counts agree)."""
        T, k = ids.shape
        flat = ids.reshape(-1).long()
        counts = torch.zeros(self.global_experts, dtype=torch.int64, device=ids.device)
        counts.scatter_add_(0, flat, torch.ones_like(flat))
        mine = ((flat >= self.first) & (flat < self.first + self.local)).nonzero().squeeze(1)
        out = x.new_zeros(T, self.hidden_size)
        if mine.numel():
            local_ids = (flat.index_select(0, mine) - self.first).view(-1, 1)
            ys, _ = super().forward(x.index_select(0, mine // k), weights.reshape(-1, 1).index_select(0, mine),
                                    local_ids)
            out.index_add_(0, mine // k, ys)
        return out, counts


def load_per_rank(expert_load: list[list[int]], ranks: int) -> list[list[int]]:
    """Per MoE layer: the tokens routed to each EP rank's experts (rank r holds a contiguous 1/ranks of them)."""
    out = []
    for row in expert_load:
        per = len(row) // ranks
        out.append([sum(row[r * per:(r + 1) * per]) for r in range(ranks)])
    return out
