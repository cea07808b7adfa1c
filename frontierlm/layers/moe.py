"""Mixture of experts: one layer for Mixtral, Qwen2-MoE, Qwen3-MoE and DeepSeek-V2/V3.

A router scores every expert per token, `select_experts` keeps top_k of them (optionally only inside the
best groups, optionally choosing with a bias that does not enter the weights), and `FusedExperts` runs each
chosen expert on its tokens as one grouped computation over all experts' stacked weights. Shared experts, when
a model has them, see every token and are added to the routed output.

Expert weight shard ids (what `weight_loader` accepts; `shard_ids` lists the per-expert ones):
  w13 [E, 2I, H]: (e, 0) = expert e's gate_proj [I, H], (e, 1) = its up_proj [I, H]
  w2  [E, H, I]:  (e, None) = expert e's down_proj [H, I]
  either:         None = every expert at once, in the same layout (transformers 5's in-memory
                  experts.gate_up_proj / experts.down_proj)
A model maps checkpoint names to these with `expert_weights_mapping`, e.g. {"gate_proj": ("w13", 0),
"up_proj": ("w13", 1), "down_proj": ("w2", None)}; the loader reads the expert index from the name.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from frontierlm.layers.activation import GatedActivation
from frontierlm.layers.linear import Linear, default_weight_loader
from frontierlm.layers.mlp import GatedMLP

_SCORING = ("softmax", "sigmoid")
_GROUP_SCORES = ("max", "top2_sum")


@dataclass(frozen=True)
class RoutingConfig:
    """How a router turns logits into top_k (expert, weight) pairs.

    Mixtral: softmax, norm_topk_prob=True. Qwen2/3-MoE: softmax, norm_topk_prob from the config.
    DeepSeek-V2: softmax, routed_scaling_factor, groups with group_score="max" for group_limited_greedy.
    DeepSeek-V3: sigmoid, correction bias, groups with group_score="top2_sum", norm_topk_prob, scaling.
    """

    num_experts: int
    top_k: int
    scoring: str = "softmax"
    norm_topk_prob: bool = False
    routed_scaling_factor: float = 1.0
    num_groups: int | None = None
    topk_groups: int | None = None
    group_score: str = "max"

    def __post_init__(self):
        if self.num_experts < 1:
            raise ValueError(f"num_experts must be >= 1, got {self.num_experts}")
        if not 1 <= self.top_k <= self.num_experts:
            raise ValueError(f"top_k must be in [1, num_experts={self.num_experts}], got {self.top_k}")
        if self.scoring not in _SCORING:
            raise ValueError(f"scoring must be one of {_SCORING}, got {self.scoring!r}")
        if self.group_score not in _GROUP_SCORES:
            raise ValueError(f"group_score must be one of {_GROUP_SCORES}, got {self.group_score!r}")
        if not self.routed_scaling_factor > 0:
            raise ValueError(f"routed_scaling_factor must be > 0, got {self.routed_scaling_factor}")
        if (self.num_groups is None) != (self.topk_groups is None):
            raise ValueError(f"num_groups and topk_groups go together, got num_groups={self.num_groups}, "
                             f"topk_groups={self.topk_groups}")
        if self.num_groups is None:
            return
        if self.num_groups < 1 or self.num_experts % self.num_groups:
            raise ValueError(f"num_groups must divide num_experts={self.num_experts}, got {self.num_groups}")
        if not 1 <= self.topk_groups <= self.num_groups:
            raise ValueError(f"topk_groups must be in [1, num_groups={self.num_groups}], got {self.topk_groups}")
        per_group = self.num_experts // self.num_groups
        if self.topk_groups * per_group < self.top_k:
            raise ValueError(f"topk_groups={self.topk_groups} groups of {per_group} experts cannot hold "
                             f"top_k={self.top_k} experts")
        if self.group_score == "top2_sum" and per_group < 2:
            raise ValueError(f"group_score 'top2_sum' needs >= 2 experts per group, got {per_group}")


def select_experts(router_logits: torch.Tensor, cfg: RoutingConfig,
                   correction_bias: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """[T, E] logits -> (weights [T, k] float32, expert ids [T, k] int64), as transformers' routers compute them.

    The correction bias (DeepSeek-V3) shifts the scores used to choose experts and groups, never the weights.
    """
    logits = router_logits.float()
    scores = logits.softmax(dim=-1) if cfg.scoring == "softmax" else logits.sigmoid()
    choice = scores if correction_bias is None else scores + correction_bias.float()
    if cfg.num_groups is not None and cfg.topk_groups < cfg.num_groups:
        per_group = cfg.num_experts // cfg.num_groups
        grouped = choice.view(-1, cfg.num_groups, per_group)
        if cfg.group_score == "max":  # DeepSeek-V2: a group is as good as its best expert
            group_scores = grouped.max(dim=-1).values
        else:  # DeepSeek-V3: the sum of its two best
            group_scores = grouped.topk(2, dim=-1)[0].sum(dim=-1)
        keep = torch.topk(group_scores, cfg.topk_groups, dim=-1, sorted=False)[1]
        keep_mask = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, keep, True)
        expert_mask = keep_mask.unsqueeze(-1).expand(-1, -1, per_group).reshape(-1, cfg.num_experts)
        choice = choice.masked_fill(~expert_mask, float("-inf"))
    # transformers' Mixtral/Qwen routers keep the top-k in descending order and DeepSeek's do not (sorted=False);
    # we follow, so that norm_topk_prob sums the same numbers in the same order (bit-identical weights).
    deepseek_style = cfg.scoring == "sigmoid" or cfg.num_groups is not None or correction_bias is not None
    ids = torch.topk(choice, cfg.top_k, dim=-1, sorted=not deepseek_style)[1]
    weights = scores.gather(1, ids)
    if cfg.norm_topk_prob:
        weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)  # eps: sigmoid scores can all be ~0
    if cfg.routed_scaling_factor != 1.0:
        weights = weights * cfg.routed_scaling_factor
    return weights, ids


@functools.lru_cache(maxsize=None)
def _grouped_mm_device(device: torch.device) -> bool:
    return (device.type == "cuda" and hasattr(torch, "_grouped_mm")
            and torch.cuda.get_device_capability(device) >= (9, 0))


class FusedExperts(nn.Module):
    """E gated-MLP experts stored as two stacked tensors, run on (token, expert) pairs grouped by expert.

    use_grouped_mm: None = automatic (torch._grouped_mm for bfloat16 on sm90+ and for inference on CPU, else the
    per-expert loop);
    False = the loop (the reference); True = grouped_mm whatever the device (torch has a CPU kernel too).
    """

    quant_method = None  # frontierlm/quant/moe.py: set when the experts hold quantized weights

    def __init__(self, num_experts: int, hidden_size: int, intermediate_size: int, act: str = "silu",
                 use_grouped_mm: bool | None = None):
        super().__init__()
        self.num_experts, self.hidden_size, self.intermediate_size = num_experts, hidden_size, intermediate_size
        self.use_grouped_mm = use_grouped_mm
        self.act = GatedActivation(act)
        # Gate rows first, then up rows: one matmul per expert gives [gate | up] for GatedActivation.
        self.w13 = nn.Parameter(torch.empty(num_experts, 2 * intermediate_size, hidden_size))
        self.w2 = nn.Parameter(torch.empty(num_experts, hidden_size, intermediate_size))
        self.w13.weight_loader = self._load_w13
        self.w2.weight_loader = self._load_w2
        self.w13.shard_ids = tuple((e, part) for e in range(num_experts) for part in (0, 1))
        self.w2.shard_ids = tuple((e, None) for e in range(num_experts))

    def _expert(self, shard_id) -> int:
        if not (isinstance(shard_id, tuple) and len(shard_id) == 2 and isinstance(shard_id[0], int)
                and 0 <= shard_id[0] < self.num_experts):
            raise ValueError(f"unknown expert shard id {shard_id!r}; expected (expert, part) with expert in "
                             f"[0, {self.num_experts}) or None for all experts")
        return shard_id[0]

    def _load_w13(self, param: nn.Parameter, loaded_weight: torch.Tensor, shard_id=None) -> None:
        if shard_id is None:
            return default_weight_loader(param, loaded_weight)
        expert = self._expert(shard_id)
        if shard_id[1] not in (0, 1):
            raise ValueError(f"unknown shard id {shard_id!r} for w13: part must be 0 (gate_proj) or 1 (up_proj)")
        size = self.intermediate_size
        _copy(param.data[expert].narrow(0, shard_id[1] * size, size), loaded_weight, shard_id)

    def _load_w2(self, param: nn.Parameter, loaded_weight: torch.Tensor, shard_id=None) -> None:
        if shard_id is None:
            return default_weight_loader(param, loaded_weight)
        expert = self._expert(shard_id)
        if shard_id[1] is not None:
            raise ValueError(f"unknown shard id {shard_id!r} for w2: expected ({expert}, None) (down_proj)")
        _copy(param.data[expert], loaded_weight, shard_id)

    def forward(self, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """x [T, H], weights/ids [T, k] -> (out [T, H], tokens per expert [E] int64)."""
        T, k = ids.shape
        flat_ids = ids.reshape(-1).long()
        # Sort the T*k (token, expert) pairs by expert so each expert's rows are one contiguous slice.
        order = torch.argsort(flat_ids, stable=True)
        rows = order // k  # the token each sorted pair comes from
        # scatter_add_, not bincount: bincount on CUDA reads the max id back to the host to size its output.
        counts = torch.zeros(self.num_experts, dtype=torch.int64, device=ids.device)
        counts.scatter_add_(0, flat_ids, torch.ones_like(flat_ids))
        xs = x.index_select(0, rows)
        if xs.shape[0] == 0:
            ys = xs
        elif self.quant_method is not None:
            ys = self.quant_method.apply(self, xs, counts, flat_ids.index_select(0, order))
        elif self._use_grouped_mm(x) and (x.dtype == torch.bfloat16 or not torch.compiler.is_compiling()):
            ys = self._grouped(xs, counts)
        elif torch.compiler.is_compiling():  # the loop reads counts on the host; grouped_mm traces only in bf16
            ys = self._gathered(xs, flat_ids.index_select(0, order))
        else:
            ys = self._looped(xs, counts)
        # Like transformers: scale by the float32 routing weight, then sum in x's dtype. Un-sorting is a
        # permutation and the k-way sum a reduction: no atomics (CUDA index_add_ would make runs differ).
        ys = (ys * weights.reshape(-1).index_select(0, order).unsqueeze(-1)).to(x.dtype)
        ys = torch.empty_like(ys).index_copy_(0, order, ys)
        return ys.view(T, k, self.hidden_size).sum(dim=1), counts

    def _use_grouped_mm(self, x: torch.Tensor) -> bool:
        if self.use_grouped_mm is not None:
            return self.use_grouped_mm
        if x.device.type == "cpu":
            # Measured 10-22% faster than the loop on CPU at DeepSeek-V2-Lite's expert shape (docs/benchmarks.md);
            # torch has no CPU backward for it, so training keeps the loop.
            return hasattr(torch, "_grouped_mm") and not torch.is_grad_enabled()
        # The CUDA kernel wants bfloat16 and 16-byte aligned rows.
        return (x.dtype == torch.bfloat16 and self.w13.dtype == torch.bfloat16 and _grouped_mm_device(x.device)
                and self.hidden_size % 8 == 0 and self.intermediate_size % 8 == 0)

    def _grouped(self, xs: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """All experts in two kernel launches; offsets stay on the device (no host sync, graph-capturable)."""
        offs = counts.cumsum(0, dtype=torch.int32)
        h = self.act(torch._grouped_mm(xs, self.w13.transpose(1, 2), offs=offs))
        return torch._grouped_mm(h, self.w2.transpose(1, 2), offs=offs)

    def _gathered(self, xs: torch.Tensor, expert_ids: torch.Tensor) -> torch.Tensor:
        """Each (token, expert) pair against its own expert's weights, gathered: shape-static, so the compiled
        decode step can trace it (it reads an expert's weights once per pair, fine for decode-sized batches)."""
        h = self.act(torch.bmm(self.w13.index_select(0, expert_ids), xs.unsqueeze(-1)).squeeze(-1))
        return torch.bmm(self.w2.index_select(0, expert_ids), h.unsqueeze(-1)).squeeze(-1)

    def _looped(self, xs: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """The reference: one matmul pair per expert that has tokens. split / unbind / cat rather than slicing
        and slice assignment: under autograd each slice's backward writes a zero-filled tensor of the full
        size, which made an 8-expert training step spend more time filling zeros than multiplying."""
        outs = []
        for x_e, w13, w2 in zip(xs.split(counts.tolist()), self.w13.unbind(0), self.w2.unbind(0)):
            if x_e.shape[0]:  # the one host sync of this path is counts.tolist()
                outs.append(F.linear(self.act(F.linear(x_e, w13)), w2))
        return torch.cat(outs)


def _copy(target: torch.Tensor, loaded_weight: torch.Tensor, shard_id) -> None:
    if target.shape != loaded_weight.shape:
        raise ValueError(f"shape mismatch for expert shard {shard_id!r}: expected {tuple(target.shape)}, "
                         f"checkpoint has {tuple(loaded_weight.shape)}")
    target.copy_(loaded_weight)


def load_balancing_loss(router_logits: torch.Tensor, ids: torch.Tensor, cfg: RoutingConfig) -> torch.Tensor:
    """N * sum_i f_i * P_i (Switch Transformer, DeepSeek's expert-level balance loss): f_i is the share of the
    T * k routed slots that went to expert i (counted, no gradient), P_i the mean routing probability of expert i
    (differentiable, so the router learns to spread tokens). Equals 1 when routing is perfectly uniform.
    Sigmoid scores are normalized per token first, as DeepSeek-V3 does."""
    logits = router_logits.float()
    if cfg.scoring == "softmax":
        probs = logits.softmax(dim=-1)
    else:
        probs = logits.sigmoid()
        probs = probs / (probs.sum(dim=-1, keepdim=True) + 1e-20)
    counts = torch.zeros(cfg.num_experts, device=logits.device).scatter_add_(
        0, ids.reshape(-1), torch.ones(ids.numel(), device=logits.device))
    f = counts / max(ids.numel(), 1)
    return cfg.num_experts * (f * probs.mean(dim=0)).sum()


class MoE(nn.Module):
    """Router + routed experts (+ always-on shared experts). x [..., H] -> [..., H].

    Checkpoint names: `gate.weight` (router), `gate.e_score_correction_bias`, `experts.*` (see module doc),
    `<shared_name>.{gate,up,down}_proj.weight`, `shared_expert_gate.weight`.
    """

    def __init__(self, hidden_size: int, intermediate_size: int, routing: RoutingConfig, act: str = "silu",
                 shared_intermediate_size: int = 0, shared_name: str = "shared_experts", shared_gate: bool = False,
                 correction_bias: bool = False, router_fp32: bool = False):
        super().__init__()
        if shared_gate and not shared_intermediate_size:
            raise ValueError("shared_gate needs shared experts (shared_intermediate_size > 0)")
        self.hidden_size, self.routing, self.router_fp32 = hidden_size, routing, router_fp32
        self.gate = Linear(hidden_size, routing.num_experts)
        if correction_bias:
            # float32 whatever the model dtype: it decides between scores that differ in the last bits.
            bias = nn.Parameter(torch.zeros(routing.num_experts, dtype=torch.float32), requires_grad=False)
            bias.weight_loader = default_weight_loader
            self.gate.e_score_correction_bias = bias
        from frontierlm.distributed.moe import make_experts  # (imports this module)
        from frontierlm.distributed.state import build_context, tp_reduce

        ctx = build_context()  # tensor / expert parallel: the experts are sharded, the block reduces once
        self.tp_size, self.tp_group, self.tp_reduce = ctx.tp_size, ctx.tp_group, tp_reduce(ctx)
        self.experts = make_experts(routing.num_experts, hidden_size, intermediate_size, act)
        self.shared_expert_gate = Linear(hidden_size, 1) if shared_gate else None
        # Tokens routed to each expert since the last reset; summed on the device, read when someone asks.
        self.register_buffer("expert_counts", torch.zeros(routing.num_experts, dtype=torch.int64),
                             persistent=False)
        self.last_router_logits = None  # kept in training mode only, for an auxiliary load-balancing loss
        # Training-time balancing (frontierlm/train): aux_loss_coef > 0 sets self.aux_loss each forward;
        # update_correction_bias() is DeepSeek-V3's auxiliary-loss-free alternative.
        self.aux_loss_coef = 0.0
        self.aux_loss: torch.Tensor | None = None
        self.last_counts: torch.Tensor | None = None
        self.shared_name = shared_name if shared_intermediate_size else None
        if self.shared_name:
            if not shared_name.isidentifier() or hasattr(self, shared_name):
                raise ValueError(f"shared_name must be a free attribute name, got {shared_name!r}")
            setattr(self, shared_name, GatedMLP(hidden_size, shared_intermediate_size, act, reduce_results=False))

    def reset_expert_counts(self) -> None:
        self.expert_counts.zero_()

    counts_rows = True  # DecoderLayer passes a padded step's real-row mask

    def forward(self, x: torch.Tensor, real_rows: torch.Tensor | None = None) -> torch.Tensor:
        """real_rows [T] (1 = a request's token, 0 = padding): only real tokens go into expert_counts."""
        shape = x.shape
        x = x.reshape(-1, self.hidden_size)
        if self.router_fp32:  # DeepSeek routes in float32 whatever the model dtype
            logits = F.linear(x.float(), self.gate.weight.float())
        else:
            logits = F.linear(x, self.gate.weight)
        bias = getattr(self.gate, "e_score_correction_bias", None)
        weights, ids = select_experts(logits, self.routing, bias)
        out, counts = self.experts(x, weights, ids)
        if real_rows is not None:
            counts = torch.zeros_like(counts).scatter_add_(
                0, ids.reshape(-1), real_rows.to(counts.dtype)[:, None].expand(ids.shape).reshape(-1))
        self.expert_counts += counts
        if self.shared_name:
            shared = getattr(self, self.shared_name)(x)
            if self.shared_expert_gate is not None:  # Qwen2-MoE: a per-token sigmoid gate on the shared expert
                shared = torch.sigmoid(self.shared_expert_gate(x)) * shared
            out = out + shared
        if self.tp_size > 1:  # the routed (and shared) partial sums of every rank
            self.tp_reduce(out)
        if self.training:
            self.last_router_logits, self.last_counts = logits, counts
            if self.aux_loss_coef > 0:
                self.aux_loss = self.aux_loss_coef * load_balancing_loss(logits, ids, self.routing)
        return out.view(shape)

    @torch.no_grad()
    def update_correction_bias(self, gamma: float) -> None:
        """DeepSeek-V3's auxiliary-loss-free balancing, once per training step: nudge each expert's selection
        bias by gamma toward balance (down if it got more than the mean load in the last forward, up if less).
        The bias only decides selection, so the gating weights and the loss are untouched."""
        bias = getattr(self.gate, "e_score_correction_bias", None)
        if bias is None:
            raise ValueError("auxiliary-loss-free balancing needs a correction bias (MoE(correction_bias=True))")
        if self.last_counts is not None:
            load = self.last_counts.float()
            bias += gamma * torch.sign(load.mean() - load)
