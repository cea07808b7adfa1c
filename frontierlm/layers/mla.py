"""DeepSeek Multi-head Latent Attention (MLA) with a latent paged KV cache.

Per token and layer the cache holds only the normalized KV latent c (kv_lora_rank) and the shared, already
rotated RoPE key k_pe (qk_rope_head_dim): one row of r + dr numbers instead of 2 * heads * head_dim.

Keys and values come back from the latent through kv_b_proj = [W_UK; W_UV] per head:
  k_nope_h = W_UK_h c,  v_h = W_UV_h c.
* Prefill / extend (query_len > 1): the chunk attends to itself decompressed; on CPU a cached prefix is read
  in place (layers/paged_extend.py) and attended either absorbed (as decode does, no decompression: cheaper
  while the chunk is short next to kv_lora_rank) or decompressed range by range, the two parts merged by
  their log-sum-exps. Elsewhere the context's latents are gathered and decompressed whole.
* Decode (query_len == 1) never decompresses: W_UK is absorbed into the query (q_lat_h = W_UK_h^T q_nope_h) and
  W_UV into the output, so attention is MQA over the cached rows with one "head" of r + dr dims whose first r
  dims are also the value: score = q_lat . c + q_pe . k_pe, o_h = W_UV_h (sum_t p_t c_t).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from frontierlm.distributed.layers import ColumnParallelLinear, RowParallelLinear
from frontierlm.distributed.state import build_context
from frontierlm.layers.attention import AttentionMetadata, _gather_blocks, _TorchPlan, causal_attention
from frontierlm.layers.linear import Linear
from frontierlm.layers.norm import RMSNorm
from frontierlm.layers.paged_decode import PagedDecodePlan, paged_decode_mla
from frontierlm.layers.paged_extend import chunk_attention, merge, sdpa_lse
from frontierlm.layers.rotary import RotaryEmbedding, rope_parameters
from frontierlm.quant.kv_cache import is_fp8, round_trip_fp8, store_rows


def _yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def mla_softmax_scale(hf_config) -> float:
    """1/sqrt(qk_head_dim), times DeepSeek's YaRN correction mscale(factor, mscale_all_dim)^2: the rotary
    tables already carry mscale/mscale_all_dim, and the nope part needs the same temperature change."""
    scale = (hf_config.qk_nope_head_dim + hf_config.qk_rope_head_dim) ** -0.5
    p = rope_parameters(hf_config)
    if p["rope_type"] != "default" and p.get("mscale_all_dim"):
        m = _yarn_mscale(p["factor"], p["mscale_all_dim"])
        scale *= m * m
    return scale


def mla_rotary(hf_config, max_position: int) -> RotaryEmbedding:
    return RotaryEmbedding(hf_config.qk_rope_head_dim, max_position, rope_parameters(hf_config),
                           rotary_dim=hf_config.qk_rope_head_dim)


class TorchMLABackend:
    """Reference MLA attention over the latent cache; shares the plan (decode groups, extend masks, slots)
    with the dense reference backend."""

    name = "torch-mla"

    def __init__(self, extend_in_place: bool | None = None):
        self.extend_in_place = extend_in_place  # None: in place on CPU (see _TorchPlan)

    def plan(self, attn_meta: AttentionMetadata) -> _TorchPlan:
        return _TorchPlan(attn_meta, self.extend_in_place)

    def forward(self, layer: "MLAAttention", q_nope, q_pe, latent, k_pe, cache: torch.Tensor, plan: _TorchPlan):
        """q_nope [T, H, dn], q_pe [T, H, dr], latent [T, r], k_pe [T, dr]; cache [blocks, block_size, r + dr].
        Returns [T, H, dv]."""
        r = layer.kv_lora_rank
        rows = torch.cat([latent, k_pe], dim=-1)
        flat = cache.view(-1, cache.shape[-1])
        new = rows if plan.write_rows is None else rows[plan.write_rows]
        store_rows(flat, plan.write_slots, new)

        num_tokens, num_heads = q_nope.shape[:2]
        out = q_nope.new_zeros(num_tokens, num_heads, layer.v_head_dim) if plan.has_padding else \
            q_nope.new_empty(num_tokens, num_heads, layer.v_head_dim)
        if plan.num_decodes:
            w_uk, w_uv = layer.absorbed_weights()
            # [H, T, dn] @ [H, dn, r] -> the query in latent space; q_pe rides along for the rope part.
            q_lat = torch.bmm(q_nope.transpose(0, 1), w_uk).transpose(0, 1)
            q_abs = torch.cat([q_lat, q_pe], dim=-1)  # [T, H, r + dr]
            for group in plan.decode_groups(cache.shape[-1] * cache.element_size()):
                idx, blocks = group[0], group[1]
                qd = q_abs[idx].unsqueeze(1)  # [n, 1 (the single latent "kv head"), H, r + dr]
                n = qd.shape[0]
                kv = _gather_blocks(cache, blocks).view(n, 1, -1, cache.shape[-1]).to(q_nope.dtype)
                mask = plan.decode_mask(group, layer.sliding_window).to(q_nope.dtype)
                o_lat = F.scaled_dot_product_attention(qd, kv, kv[..., :r], attn_mask=mask, scale=layer.scale)
                o_lat = o_lat.squeeze(1)  # [n, H, r]
                out[idx] = torch.bmm(o_lat.transpose(0, 1), w_uv).transpose(0, 1)  # [n, H, dv]
        for j, (start, n, slen, blocks) in enumerate(plan.extends):
            view = plan.prefix_view(j, layer.sliding_window)
            if view is not None:  # the cached prefix read in place
                rows = slice(start, start + n)
                out[rows] = self._extend_in_place(layer, q_nope[rows], q_pe[rows], latent[rows], k_pe[rows],
                                                  flat, view)
                continue
            if blocks is None:  # no cached prefix: this chunk's own latents
                ctx_latent, ctx_pe = latent[start:start + n], k_pe[start:start + n]
            else:
                ctx = _gather_blocks(cache, blocks).view(-1, cache.shape[-1])[:slen].to(q_nope.dtype)
                ctx_latent, ctx_pe = ctx[:, :r], ctx[:, r:]
            q = torch.cat([q_nope[start:start + n], q_pe[start:start + n]], dim=-1)
            k, v = layer.decompress(ctx_latent, ctx_pe)
            q, k, v = q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1)
            if blocks is None and layer.sliding_window is None:
                o = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=layer.scale)
            else:
                mask = plan.extend_mask(j, layer.sliding_window).to(q.dtype)
                o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=layer.scale)
            out[start:start + n] = o.transpose(0, 1)
        return out

    @staticmethod
    def _extend_in_place(layer: "MLAAttention", q_nope, q_pe, latent, k_pe, flat: torch.Tensor, view):
        """One sequence's chunk (q_nope [n, H, dn], q_pe [n, H, dr], its latent [n, r] and k_pe [n, dr]) over
        its cached prefix, whose rows [latent | k_pe] are read from `flat` [rows, r + dr] through `view`."""
        n, num_heads = q_nope.shape[:2]
        r, dv = layer.kv_lora_rank, layer.v_head_dim
        q = torch.cat([q_nope, q_pe], dim=-1)
        k, v = layer.decompress(latent, k_pe)
        # the fused kernel wants values as wide as the queries (see causal_attention): pad with zeros
        out, lse = chunk_attention(q, k, F.pad(v, (0, q.shape[-1] - dv)), layer.scale, None)
        out = out[..., :dv]
        if absorb_prefix(layer, n):
            # MQA in latent space: every head's [W_UK^T q_nope | q_pe] against the cached row [c | k_pe], which
            # is also the value (its first r numbers; the rest of the output is dropped)
            w_uk, w_uv = layer.absorbed_weights()
            q_lat = torch.bmm(q_nope.transpose(0, 1), w_uk).transpose(0, 1)
            q_abs = torch.cat([q_lat, q_pe], dim=-1).reshape(1, 1, n * num_heads, -1)
            o_lat = lse_lat = None
            for i in range(len(view.parts)):
                ctx = view.read(flat, i).to(q.dtype)[None, None]  # [1, 1, L, r + dr], a view
                o, s = sdpa_lse(q_abs, ctx, ctx, layer.scale)
                o, s = o.view(n, num_heads, -1)[..., :r], s.view(n, num_heads)
                o_lat, lse_lat = (o, s) if o_lat is None else merge(o_lat, lse_lat, o, s)
            p_out = torch.bmm(o_lat.transpose(0, 1), w_uv).transpose(0, 1)  # [n, H, dv]
            return merge(out, lse, p_out, lse_lat, need_lse=False)[0]
        qh = q.transpose(0, 1)[None]  # [1, H, n, dn + dr]
        for i in range(len(view.parts)):  # decompress the prefix part by part, reading the cache in place
            ctx = view.read(flat, i).to(q.dtype)
            kc, vc = layer.decompress(ctx[:, :r], ctx[:, r:])
            vc = F.pad(vc, (0, q.shape[-1] - dv))
            o, s = sdpa_lse(qh, kc.transpose(0, 1)[None], vc.transpose(0, 1)[None], layer.scale)
            out, lse = merge(out, lse, o[0].transpose(0, 1)[..., :dv], s[0].transpose(0, 1))
        return out


def absorb_prefix(layer: "MLAAttention", num_queries: int) -> bool:
    """Attend the cached prefix absorbed (no decompression) when that costs fewer multiply-adds per prefix
    token: absorbed reads rows of r + dr numbers as keys and values for every query; decompressed first spends
    r (dn + dv) per token and head, then dn + dr per query for the keys and as much for the padded values."""
    r, dn, dr, dv = layer.kv_lora_rank, layer.qk_nope_head_dim, layer.qk_rope_head_dim, layer.v_head_dim
    return num_queries * 2 * (r + dr) < r * (dn + dv) + num_queries * 2 * (dn + dr)


class MLAAttention(nn.Module):
    """Projections and RoPE of DeepSeek-V2/V3 attention; checkpoint names as in the HF checkpoints."""

    sliding_window = None

    def __init__(self, hf_config, hidden_size: int, num_heads: int, backend: TorchMLABackend,
                 rope_interleave: bool = True):
        super().__init__()
        c = hf_config
        # tensor parallel: heads split over the ranks (q / kv_b column-parallel, o_proj row-parallel); the latent
        # projections, and so the latent cache, are whole on every rank
        tp = build_context().tp_size
        if num_heads % tp:
            raise ValueError(f"tensor_parallel_size={tp} does not divide the attention heads ({num_heads})")
        self.num_heads = num_heads // tp
        self.q_lora_rank = getattr(c, "q_lora_rank", None)
        self.kv_lora_rank = c.kv_lora_rank
        self.qk_nope_head_dim, self.qk_rope_head_dim, self.v_head_dim = (
            c.qk_nope_head_dim, c.qk_rope_head_dim, c.v_head_dim)
        qk_head_dim = self.qk_nope_head_dim + self.qk_rope_head_dim
        bias = bool(getattr(c, "attention_bias", False))
        if self.q_lora_rank:
            self.q_a_proj = Linear(hidden_size, self.q_lora_rank, bias=bias)
            self.q_a_layernorm = RMSNorm(self.q_lora_rank)  # DeepSeek's latent norms use eps 1e-6
            self.q_b_proj = ColumnParallelLinear(self.q_lora_rank, num_heads * qk_head_dim)
        else:
            self.q_proj = ColumnParallelLinear(hidden_size, num_heads * qk_head_dim)
        self.kv_a_proj_with_mqa = Linear(hidden_size, self.kv_lora_rank + self.qk_rope_head_dim, bias=bias)
        self.kv_a_layernorm = RMSNorm(self.kv_lora_rank)
        self.kv_b_proj = ColumnParallelLinear(self.kv_lora_rank, num_heads * (self.qk_nope_head_dim + self.v_head_dim))
        self.o_proj = RowParallelLinear(num_heads * self.v_head_dim, hidden_size, bias=bias)
        self.scale = mla_softmax_scale(c)
        self.backend = backend
        # DeepSeek checkpoints lay the rope dims out as interleaved pairs (x0, x1), (x2, x3), ...: gathering
        # evens then odds turns that into the half-split layout our rotary expects (same q.k products).
        dr = self.qk_rope_head_dim
        perm = torch.cat([torch.arange(0, dr, 2), torch.arange(1, dr, 2)]) if rope_interleave else None
        self.register_buffer("rope_perm", perm, persistent=False)
        self.kv_cache: torch.Tensor | None = None  # [num_blocks, block_size, kv_lora_rank + qk_rope_head_dim]

    def kv_cache_shape(self, num_blocks: int, block_size: int) -> tuple[int, ...]:
        return (num_blocks, block_size, self.kv_lora_rank + self.qk_rope_head_dim)

    def bind_kv_cache(self, cache: torch.Tensor) -> None:
        if cache.dim() != 3 or tuple(cache.shape) != self.kv_cache_shape(cache.shape[0], cache.shape[1]):
            raise ValueError(f"MLA KV cache must be [num_blocks, block_size, "
                             f"{self.kv_lora_rank + self.qk_rope_head_dim}], got {tuple(cache.shape)}")
        self.kv_cache = cache

    def absorbed_weights(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(W_UK [H, dn, r], W_UV^T [H, r, dv]): views of kv_b_proj's weight, no copies."""
        w = self.kv_b_proj.weight.view(self.num_heads, self.qk_nope_head_dim + self.v_head_dim, self.kv_lora_rank)
        w_uk, w_uv = w.split([self.qk_nope_head_dim, self.v_head_dim], dim=1)
        return w_uk, w_uv.transpose(1, 2)

    def decompress(self, latent: torch.Tensor, k_pe: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """latent [..., r], k_pe [..., dr] -> k [..., H, dn + dr], v [..., H, dv]."""
        kv = self.kv_b_proj(latent).view(*latent.shape[:-1], self.num_heads, -1)
        k_nope, v = kv.split([self.qk_nope_head_dim, self.v_head_dim], dim=-1)
        k = torch.cat([k_nope, k_pe.unsqueeze(-2).expand(*k_nope.shape[:-1], self.qk_rope_head_dim)], dim=-1)
        return k, v

    def _rope(self, x: torch.Tensor, rotary: RotaryEmbedding, cos_sin) -> torch.Tensor:
        if self.rope_perm is not None:
            x = x.index_select(-1, self.rope_perm)
        return rotary(x, cos_sin)

    def forward(self, x: torch.Tensor, cos_sin, rotary: RotaryEmbedding, plan) -> torch.Tensor:
        lead = x.shape[:-1]
        if self.q_lora_rank:
            q = self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x)))
        else:
            q = self.q_proj(x)
        q_nope, q_pe = q.view(*lead, self.num_heads, -1).split([self.qk_nope_head_dim, self.qk_rope_head_dim], -1)
        latent, k_pe = self.kv_a_proj_with_mqa(x).split([self.kv_lora_rank, self.qk_rope_head_dim], dim=-1)
        latent = self.kv_a_layernorm(latent)
        q_pe = self._rope(q_pe, rotary, cos_sin)
        k_pe = self._rope(k_pe.unsqueeze(-2), rotary, cos_sin).squeeze(-2)
        if plan is None:  # contiguous batch (trainer, parity): decompress everything
            k, v = self.decompress(latent, k_pe)
            o = causal_attention(torch.cat([q_nope, q_pe], dim=-1), k, v, self.scale)
        else:
            if self.kv_cache is None:
                raise RuntimeError("MLA attention got attn_meta but no KV cache is bound (call model.bind_kv_cache)")
            if is_fp8(self.kv_cache):  # FP8 latent cache at scale 1 (frontierlm/quant/kv_cache.py)
                latent, k_pe = round_trip_fp8(latent, self.kv_cache.dtype), round_trip_fp8(k_pe, self.kv_cache.dtype)
            if isinstance(plan, PagedDecodePlan):  # the static-shape decode step (engine/fast_decode.py)
                o = paged_decode_mla(self, q_nope, q_pe, latent, k_pe, self.kv_cache, plan)
            else:
                o = self.backend.forward(self, q_nope, q_pe, latent, k_pe, self.kv_cache, plan)
        return self.o_proj(o.reshape(*lead, self.num_heads * self.v_head_dim))
