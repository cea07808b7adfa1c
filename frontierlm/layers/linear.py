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


# Compiled one-row products as a reduction (see `linear`); False keeps the BLAS kernels everywhere.
ONE_ROW_REDUCTION = True
# ... and each such product in this many slices of rows, so that its input has several readers (see
# `_one_row_product`); 1 keeps one product.
ONE_ROW_SPLIT = 4


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear, except for one row inside a compiled CPU graph, where it is written as multiply-and-sum.

    Why: one row makes the product a matrix-vector product whose cost is reading the weights. The BLAS
    libraries' one-row kernels stream them at about half the memory bandwidth on some CPUs (MKL's and
    oneDNN's: 9-13 GB/s at 2 threads on an AMD EPYC Zen 4 where a plain reduction reads 25-30 GB/s;
    docs/benchmarks.md, "One-row products"), while inductor turns the multiply-and-sum into a vectorised
    reduction over each weight row, split across threads by output row, and fuses it with its neighbours.
    float32 weights only: with bfloat16 the whole compiled step measured slower than oneDNN's bfloat16 kernel
    (8.7-11.6 vs 6.6-6.8 ms at 1 thread). Eager code (and any shape that is not one static row) keeps
    F.linear: there the sum would materialise the whole product."""
    if (ONE_ROW_REDUCTION and weight.dtype == torch.float32 and x.device.type == "cpu"
            and torch.compiler.is_compiling()):
        rows = x.numel() // x.shape[-1] if x.shape[-1] else 0
        if type(rows) is int and rows == 1:  # a static one-row shape (a symbolic batch stays a GEMM)
            y = _one_row_product(x, weight)
            return y if bias is None else y + bias
    return F.linear(x, weight, bias)


def _one_row_product(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x [..., K] times weight [N, K]^T as multiply-and-sum. Inductor inlines a pointwise producer of x (the
    RMSNorm scaling, the residual adds before it) into the reduction loop, where it is recomputed for every one
    of the N rows: 28-43% slower than reading a stored x (docs/benchmarks.md, "Float32 batch 1: the norm
    prologue inside every weight row"). Slices of rows give x several readers, and with
    `realize_reads_threshold=1` (fast_decode.CPU_INDUCTOR_OPTIONS) inductor then stores x once; it also fuses the
    slices into one loop that walks ONE_ROW_SPLIT weight rows at a time, each with its own accumulator."""
    if ONE_ROW_SPLIT < 2 or weight.shape[0] < ONE_ROW_SPLIT:
        return (x.unsqueeze(-2) * weight).sum(-1)
    return torch.cat([(x.unsqueeze(-2) * w).sum(-1) for w in weight.chunk(ONE_ROW_SPLIT)], -1)


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
        return linear(x, self.weight, self.bias)


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
