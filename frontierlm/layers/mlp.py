"""The gated feed-forward block shared by dense decoders and by MoE shared experts."""
from __future__ import annotations

import torch
from torch import nn

from frontierlm.layers.activation import GatedActivation
from frontierlm.layers.linear import Linear, MergedLinear


class GatedMLP(nn.Module):
    """down(act(gate(x)) * up(x)), with gate and up merged into one matmul.

    Checkpoints name the halves gate_proj / up_proj; the model's packed_modules_mapping sends them to
    gate_up_proj shards 0 and 1.
    """

    def __init__(self, hidden_size: int, intermediate_size: int, act: str = "silu", bias: bool = False):
        super().__init__()
        self.gate_up_proj = MergedLinear(hidden_size, [intermediate_size] * 2, bias=bias)
        self.down_proj = Linear(intermediate_size, hidden_size, bias=bias)
        self.act = GatedActivation(act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act(self.gate_up_proj(x)))
