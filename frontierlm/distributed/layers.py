"""Tensor-parallel linears and the vocab-parallel embedding / LM head.

Each class is the single-device layer with its output (column) or input (row) dimension cut into tp_size
equal shards; with tp_size 1 it is exactly that layer. A Megatron-style pair (column then row) needs one
all-reduce: attention (qkv column-parallel by heads, o_proj row-parallel) and the MLP (gate_up column, down
row) each reduce once, in the row-parallel layer. Loaders take either a tensor or a safetensors slice and
read only this rank's rows or columns, so a rank never holds the whole checkpoint tensor. Each layer says
which part of a checkpoint tensor it holds (`shard_region(shard_id)`, a quant/sharding.py `Region`); the float
loaders here and the quantized checkpoint loaders (quant/linear_methods.py) both read that region.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from frontierlm.distributed.state import build_context, tp_reduce
from frontierlm.layers.embedding import LMHead, VocabEmbedding
from frontierlm.layers.linear import Linear, MergedLinear, QKVLinear, default_weight_loader, linear
from frontierlm.quant.sharding import Region


def read_shard(loaded, dim: int, start: int, size: int) -> torch.Tensor:
    """Rows / columns [start, start + size) along `dim` of a tensor or of a safetensors slice (read lazily)."""
    if isinstance(loaded, torch.Tensor):
        return loaded.narrow(dim, start, size)
    index = [slice(None)] * len(loaded.get_shape())
    index[dim] = slice(start, start + size)
    return loaded[tuple(index)]


def materialize(loaded) -> torch.Tensor:
    return loaded if isinstance(loaded, torch.Tensor) else loaded[:]


def _divide(total: int, parts: int, what: str) -> int:
    if total % parts:
        raise ValueError(f"tensor_parallel_size={parts} does not divide {what} ({total})")
    return total // parts


def _mark_sliced(module: nn.Module) -> None:
    for p in module.parameters(recurse=False):
        p.loads_slices = True  # models/loader.py hands these loaders a safetensors slice, not the whole tensor


def all_reduce(x: torch.Tensor, size: int, reduce) -> torch.Tensor:
    """reduce: the TP group's shm.TPAllReduce (shared memory on one host, else the backend's all-reduce)."""
    return reduce(x) if size > 1 else x


class ColumnParallelLinear(Linear):
    """Output features split over the TP ranks: rank r computes rows [r * out/T, (r + 1) * out/T)."""

    def __init__(self, input_size: int, output_size: int, bias: bool = False, what: str = "output features"):
        ctx = build_context()
        self.tp_rank, self.tp_size = ctx.tp_rank, ctx.tp_size
        super().__init__(input_size, _divide(output_size, ctx.tp_size, what), bias)
        _mark_sliced(self)

    def shard_region(self, shard_id=None) -> Region:
        n, k = self.output_size, self.input_size
        return Region(self.tp_rank * n, n, 0, k, n * self.tp_size, k)

    def weight_loader(self, param: nn.Parameter, loaded_weight, shard_id=None) -> None:
        r = self.shard_region()
        default_weight_loader(param, read_shard(loaded_weight, 0, r.row0, r.rows), shard_id)


class RowParallelLinear(Linear):
    """Input features split over the TP ranks; partial products are summed by one all-reduce (unless
    reduce_results=False: the caller sums several partials with one reduce). The bias is added once, after."""

    def __init__(self, input_size: int, output_size: int, bias: bool = False, reduce_results: bool = True,
                 what: str = "input features"):
        ctx = build_context()
        self.tp_rank, self.tp_size, self.tp_group = ctx.tp_rank, ctx.tp_size, ctx.tp_group
        self.reduce_results, self.tp_reduce = reduce_results, tp_reduce(ctx)
        super().__init__(_divide(input_size, ctx.tp_size, what), output_size, bias)
        _mark_sliced(self)
        if ctx.tp_size > 1:  # frontierlm/quant quantizing this shard asks for the whole rows' absmax
            self.reduce_absmax = self._reduce_absmax

    def _reduce_absmax(self, absmax: torch.Tensor, group_size: int | None) -> torch.Tensor:
        """Per-channel scales span every rank's columns: the max over the TP group makes each rank's scales
        those of the unsplit matrix. Groups must not straddle two ranks (then they are the unsplit groups)."""
        if group_size is None:
            dist.all_reduce(absmax, op=dist.ReduceOp.MAX, group=self.tp_group)
        elif self.input_size % group_size:
            raise ValueError(f"tensor_parallel_size={self.tp_size} leaves {self.input_size} input columns per rank "
                             f"in a row-parallel layer, not a multiple of the quantization group size {group_size}")
        return absmax

    def weight_loader(self, param: nn.Parameter, loaded_weight, shard_id=None) -> None:
        if param.dim() == 1:  # the bias is whole on every rank
            return default_weight_loader(param, materialize(loaded_weight), shard_id)
        r = self.shard_region()
        default_weight_loader(param, read_shard(loaded_weight, 1, r.col0, r.cols), shard_id)

    def shard_region(self, shard_id=None) -> Region:
        n, k = self.output_size, self.input_size
        return Region(0, n, self.tp_rank * k, k, n, k * self.tp_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.tp_size == 1:
            return super().forward(x)
        y = self.quant_method.apply(self, x, None) if self.quant_method is not None else linear(x, self.weight)
        if self.reduce_results:
            all_reduce(y, self.tp_size, self.tp_reduce)
        return y if self.bias is None else y + self.bias


class QKVParallelLinear(QKVLinear):
    """q/k/v packed, split by heads. With fewer KV heads than ranks each KV head is replicated on
    tp_size / num_kv_heads ranks (rank r uses KV head r * num_kv_heads // tp_size)."""

    def __init__(self, hidden_size: int, head_dim: int, num_heads: int, num_kv_heads: int, bias: bool = False):
        ctx = build_context()
        t = self.tp_size = ctx.tp_size
        self.tp_rank = ctx.tp_rank
        local_q = _divide(num_heads, t, "the attention heads")
        if num_kv_heads >= t:
            local_kv = _divide(num_kv_heads, t, "the KV heads")
            self.kv_head_start = ctx.tp_rank * local_kv
        else:
            if t % num_kv_heads:
                raise ValueError(f"tensor_parallel_size={t} must be a multiple of the KV heads ({num_kv_heads}) "
                                 f"when there are fewer KV heads than ranks")
            local_kv, self.kv_head_start = 1, ctx.tp_rank * num_kv_heads // t
        self.head_dim, self.global_sizes = head_dim, (num_heads * head_dim, num_kv_heads * head_dim)
        self.num_heads, self.num_kv_heads = local_q, local_kv  # this rank's heads
        super().__init__(hidden_size, head_dim, local_q, local_kv, bias)
        _mark_sliced(self)

    def shard_region(self, shard_id) -> Region:
        if shard_id is None and self.tp_size == 1:
            return Region.whole(self.output_size, self.input_size)
        if shard_id not in ("q", "k", "v"):
            raise ValueError(f"a packed qkv tensor (shard {shard_id!r}) of a quantized checkpoint cannot be split "
                             f"over tensor-parallel ranks; store q_proj, k_proj and v_proj")
        d, k = self.head_dim, self.input_size
        if shard_id == "q":
            return Region(self.tp_rank * self.num_heads * d, self.num_heads * d, 0, k, self.global_sizes[0], k)
        return Region(self.kv_head_start * d, self.num_kv_heads * d, 0, k, self.global_sizes[1], k)

    def _part(self, loaded, shard_id):
        r = self.shard_region(shard_id)
        return read_shard(loaded, 0, r.row0, r.rows)

    def weight_loader(self, param: nn.Parameter, loaded_weight, shard_id=None) -> None:
        if shard_id is None:  # an already packed qkv tensor: cut each part
            q, kv = self.global_sizes
            full = materialize(loaded_weight)
            parts = full.split([q, kv, kv], dim=0)
            loaded_weight = torch.cat([self._part(p, s) for p, s in zip(parts, "qkv")], dim=0)
            return super().weight_loader(param, loaded_weight, None)
        if shard_id not in ("q", "k", "v"):
            return super().weight_loader(param, materialize(loaded_weight), shard_id)  # its error message
        super().weight_loader(param, self._part(loaded_weight, shard_id), shard_id)


class MergedColumnParallelLinear(MergedLinear):
    """gate/up packed, each part split over the TP ranks."""

    def __init__(self, input_size: int, output_sizes: list[int], bias: bool = False):
        ctx = build_context()
        self.tp_rank, self.tp_size = ctx.tp_rank, ctx.tp_size
        self.global_sizes = list(output_sizes)
        super().__init__(input_size, [_divide(s, ctx.tp_size, "the MLP intermediate size") for s in output_sizes],
                         bias)
        _mark_sliced(self)

    def weight_loader(self, param: nn.Parameter, loaded_weight, shard_id=None) -> None:
        if shard_id is None:
            parts = materialize(loaded_weight).split(self.global_sizes, dim=0)
            loaded_weight = torch.cat([p.narrow(0, self.tp_rank * (s // self.tp_size), s // self.tp_size)
                                       for p, s in zip(parts, self.global_sizes)], dim=0)
            return super().weight_loader(param, loaded_weight, None)
        if shard_id not in self.shard_offsets:
            return super().weight_loader(param, materialize(loaded_weight), shard_id)
        r = self.shard_region(shard_id)
        super().weight_loader(param, read_shard(loaded_weight, 0, r.row0, r.rows), shard_id)

    def shard_region(self, shard_id) -> Region:
        if shard_id is None and self.tp_size == 1:
            return Region.whole(self.output_size, self.input_size)
        if shard_id not in self.shard_offsets:
            raise ValueError(f"a packed gate_up tensor (shard {shard_id!r}) of a quantized checkpoint cannot be "
                             f"split over tensor-parallel ranks; store gate_proj and up_proj")
        size, k = self.shard_offsets[shard_id][1], self.input_size
        return Region(self.tp_rank * size, size, 0, k, self.global_sizes[shard_id], k)


def _vocab_loader(vocab_size: int, rank: int):
    def load(param: nn.Parameter, loaded_weight, shard_id=None) -> None:
        per = param.shape[0]
        start = rank * per
        n = max(min(per, vocab_size - start), 0)
        if shard_id is not None:
            raise ValueError(f"parameter of shape {tuple(param.shape)} is not packed, got shard id {shard_id!r}")
        full_shape = tuple(loaded_weight.shape if isinstance(loaded_weight, torch.Tensor) else loaded_weight.get_shape())
        if full_shape != (vocab_size, param.shape[1]):
            raise ValueError(f"shape mismatch: parameter ({vocab_size}, {param.shape[1]}) vs checkpoint {full_shape}")
        param.data.zero_()  # padding rows past the vocabulary stay 0
        if n:
            param.data[:n].copy_(read_shard(loaded_weight, 0, start, n))
    return load


def _shard_vocab(module: nn.Module, ctx, vocab_size: int, per_rank: int) -> None:
    """The vocabulary split shared by the embedding and the LM head: this rank holds rows
    [tp_rank * per_rank, (tp_rank + 1) * per_rank) and its loader reads only those."""
    module.tp_rank, module.tp_size, module.tp_group = ctx.tp_rank, ctx.tp_size, ctx.tp_group
    module.tp_reduce = tp_reduce(ctx)
    module.vocab_size, module.per_rank = vocab_size, per_rank
    if ctx.tp_size > 1:
        module.weight.weight_loader = _vocab_loader(vocab_size, ctx.tp_rank)
        module.weight.loads_slices = True


class VocabParallelEmbedding(VocabEmbedding):
    """Rows of the vocabulary split over the TP ranks (padded to a multiple of tp_size); each rank embeds the
    ids in its range, zeros the rest, and one all-reduce assembles the embeddings."""

    def __init__(self, vocab_size: int, hidden_size: int):
        ctx = build_context()
        per_rank = -(-vocab_size // ctx.tp_size)
        super().__init__(per_rank, hidden_size)
        _shard_vocab(self, ctx, vocab_size, per_rank)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        if self.tp_size == 1:
            return super().forward(input_ids)
        local = input_ids - self.tp_rank * self.per_rank
        inside = (local >= 0) & (local < self.per_rank)
        out = F.embedding(local.clamp(0, self.per_rank - 1), self.weight) * inside.unsqueeze(-1).to(self.weight.dtype)
        return all_reduce(out, self.tp_size, self.tp_reduce)


class ParallelLMHead(LMHead):
    """The vocabulary split like VocabParallelEmbedding (so tied weights share one shard); each rank computes
    its logits columns and they are gathered on the driver only (rank 0 samples). Other ranks return None."""

    def __init__(self, vocab_size: int, hidden_size: int):
        ctx = build_context()
        per_rank = -(-vocab_size // ctx.tp_size)
        super().__init__(per_rank, hidden_size)
        _shard_vocab(self, ctx, vocab_size, per_rank)

    def shard_region(self, shard_id=None) -> Region:
        """This rank's vocabulary rows (the last rank's padding rows past the vocabulary are not read)."""
        start, h = self.tp_rank * self.per_rank, self.input_size
        return Region(start, max(min(self.per_rank, self.vocab_size - start), 0), 0, h, self.vocab_size, h)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor | None:
        logits = super().forward(hidden_states)
        if self.tp_size == 1:
            return logits
        parts = self.tp_reduce.gather(logits, self.tp_rank, self.tp_size)  # shared memory on one host
        return torch.cat(parts, dim=-1)[..., :self.vocab_size] if parts is not None else None
