"""Linear layers whose parameters know how to load themselves (`param.weight_loader`).

Packed layers (QKV, gate/up) hold several checkpoint tensors in one matrix so one matmul does the work;
the loader hands each checkpoint tensor over with a shard id and the layer copies it into its rows.
Tensor parallelism will later add sharding here; today every layer is replicated.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def default_weight_loader(param: nn.Parameter, loaded_weight: torch.Tensor, shard_id=None) -> None:
    if shard_id is not None:
        raise ValueError(f"parameter of shape {tuple(param.shape)} is not packed, got shard id {shard_id!r}")
    if param.shape != loaded_weight.shape:
        raise ValueError(f"shape mismatch: parameter {tuple(param.shape)} vs checkpoint {tuple(loaded_weight.shape)}")
    param.data.copy_(loaded_weight)


class Linear(nn.Module):
    """y = x W^T (+ b). Parameters start uninitialized: they are always overwritten by the loader."""

    quant_method = None  # frontierlm/quant/linear_methods.py: set when the layer holds quantized weights

    def __init__(self, input_size: int, output_size: int, bias: bool = False):
        super().__init__()
        self.input_size, self.output_size = input_size, output_size
        self.weight = nn.Parameter(torch.empty(output_size, input_size))
        self.weight.weight_loader = self.weight_loader
        if bias:
            self.bias = nn.Parameter(torch.empty(output_size))
            self.bias.weight_loader = self.weight_loader
        else:
            self.register_parameter("bias", None)

    def weight_loader(self, param: nn.Parameter, loaded_weight: torch.Tensor, shard_id=None) -> None:
        default_weight_loader(param, loaded_weight, shard_id)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.quant_method is not None:
            return self.quant_method.apply(self, x, self.bias)
        return F.linear(x, self.weight, self.bias)


class PackedLinear(Linear):
    """Several projections of the same input stacked along the output dim; shard ids name the parts."""

    def __init__(self, input_size: int, shard_sizes: dict, bias: bool = False):
        super().__init__(input_size, sum(shard_sizes.values()), bias)
        self.shard_offsets, offset = {}, 0
        for sid, size in shard_sizes.items():
            self.shard_offsets[sid] = (offset, size)
            offset += size
        # The loader checks that every shard of a packed parameter was loaded.
        for p in self.parameters():
            p.shard_ids = tuple(shard_sizes)

    def weight_loader(self, param: nn.Parameter, loaded_weight: torch.Tensor, shard_id=None) -> None:
        if shard_id is None:  # a checkpoint that is already packed
            return default_weight_loader(param, loaded_weight)
        if shard_id not in self.shard_offsets:
            raise ValueError(f"unknown shard id {shard_id!r}; expected one of {list(self.shard_offsets)}")
        offset, size = self.shard_offsets[shard_id]
        target = param.data.narrow(0, offset, size)
        if target.shape != loaded_weight.shape:
            raise ValueError(f"shape mismatch for shard {shard_id!r}: expected {tuple(target.shape)}, "
                             f"checkpoint has {tuple(loaded_weight.shape)}")
        target.copy_(loaded_weight)


class QKVLinear(PackedLinear):
    """q_proj, k_proj, v_proj -> qkv_proj (shard ids "q", "k", "v")."""

    def __init__(self, hidden_size: int, head_dim: int, num_heads: int, num_kv_heads: int, bias: bool = False):
        super().__init__(hidden_size, {"q": num_heads * head_dim, "k": num_kv_heads * head_dim,
                                       "v": num_kv_heads * head_dim}, bias)
        self.q_size, self.kv_size = num_heads * head_dim, num_kv_heads * head_dim

    def forward(self, x: torch.Tensor):
        return self.packed(x).split([self.q_size, self.kv_size, self.kv_size], dim=-1)

    def packed(self, x: torch.Tensor) -> torch.Tensor:
        """The unsplit [..., q | k | v] output."""
        return super().forward(x)


class MergedLinear(PackedLinear):
    """gate_proj, up_proj -> gate_up_proj (shard ids 0, 1)."""

    def __init__(self, input_size: int, output_sizes: list[int], bias: bool = False):
        super().__init__(input_size, dict(enumerate(output_sizes)), bias)
