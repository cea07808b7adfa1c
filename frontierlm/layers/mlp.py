"""The gated feed-forward block shared by dense decoders and by MoE shared experts."""
from __future__ import annotations

import torch
from torch import nn

from frontierlm.distributed.layers import MergedColumnParallelLinear, RowParallelLinear
from frontierlm.layers.activation import GatedActivation


class GatedMLP(nn.Module):
    """down(act(gate(x)) * up(x)), with gate and up merged into one matmul.

    Checkpoints name the halves gate_proj / up_proj; the model's packed_modules_mapping sends them to
    gate_up_proj shards 0 and 1.
    """

    def __init__(self, hidden_size: int, intermediate_size: int, act: str = "silu", bias: bool = False,
                 reduce_results: bool = True):
        super().__init__()
        # tensor-parallel: gate/up split by columns, down by rows (one all-reduce; none for a MoE shared expert,
        # whose partial sum joins the routed experts' before the block's one reduce)
        self.gate_up_proj = MergedColumnParallelLinear(hidden_size, [intermediate_size] * 2, bias=bias)
        self.down_proj = RowParallelLinear(intermediate_size, hidden_size, bias=bias, reduce_results=reduce_results)
        self.act = GatedActivation(act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act(self.gate_up_proj(x)))
