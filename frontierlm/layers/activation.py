"""Gated activations over a merged [gate | up] projection."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

_ACTS = {
    "silu": F.silu,
    "gelu": F.gelu,
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
}


class GatedActivation(nn.Module):
    """act(x[..., :d]) * x[..., d:]: one matmul produced both halves (gate_up_proj)."""

    def __init__(self, act: str = "silu"):
        super().__init__()
        if act not in _ACTS:
            raise ValueError(f"unsupported hidden_act {act!r}; supported: {sorted(_ACTS)}")
        self.act = _ACTS[act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = x.chunk(2, dim=-1)
        return self.act(gate) * up
