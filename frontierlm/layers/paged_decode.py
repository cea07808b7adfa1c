"""Decode attention that reads the paged KV cache in place, for the static-shape decode step.

Every row of a decode step is one sequence with one new token. The plan holds fixed-shape tensors (batch B
padded to a ladder size, block-table width W padded likewise), so the same code runs for every step of a
ladder size: torch.compile traces it once, and on CUDA it can be captured in a graph.

The scores are written as a product and a sum over the head dim rather than as a matmul over a gathered copy
of the context: `cache[block_tables]` then appears only inside a reduction, and inductor turns that into one
loop that loads each cached row through the block table (no [B, W * block_size, Hkv, D] copy per layer).
The new K/V are written with one index_put_ on the cache tensor itself: inductor turns that into an
in-place scatter, where a write through a view of the cache would become a copy of the whole cache.
Padding rows write their K/V into a scratch block the cache manager never hands out and attend to that one
slot, so they produce finite numbers that nobody reads.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class PagedDecodePlan:
    """What every layer of one decode step shares. All tensors have the ladder's static shapes."""
    slot_mapping: torch.Tensor  # [B] int64: where each row's new K/V goes
    block_tables: torch.Tensor  # [B, W] int64
    seq_lens: torch.Tensor      # [B] int64: context length including the new token
    block_size: int
    real_rows: torch.Tensor | None = None  # [B] int64: 1 for a request, 0 for padding (MoE load counters)

    @property
    def key_mask(self) -> torch.Tensor:
        """[B, W * block_size] bool: which context positions each row may attend to."""
        width = self.block_tables.shape[1] * self.block_size
        pos = torch.arange(width, device=self.seq_lens.device)
        return pos[None, :] < self.seq_lens[:, None]

    def window_mask(self, window: int | None) -> torch.Tensor:
        mask = self.key_mask
        if window is not None:  # transformers' rule: key positions > query position - window
            width = mask.shape[1]
            pos = torch.arange(width, device=self.seq_lens.device)
            mask = mask & (pos[None, :] > self.seq_lens[:, None] - 1 - window)
        return mask


def _context(cache: torch.Tensor, plan: PagedDecodePlan) -> torch.Tensor:
    """cache [num_blocks, block_size, ...] -> [B, W * block_size, ...] (a view inductor folds into its loads)."""
    rows = cache[plan.block_tables]  # [B, W, block_size, ...]
    return rows.flatten(1, 2)


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, scale: float) -> torch.Tensor:
    """q [B, Hkv, G, D], k [B, L, Hkv, D], v [B, L, Hkv, Dv], mask [B, L] -> [B, Hkv, G, Dv] (float32 math)."""
    scores = (q.float().unsqueeze(1) * k.float().unsqueeze(3)).sum(-1) * scale  # [B, L, Hkv, G]
    scores = scores.masked_fill(~mask[:, :, None, None], float("-inf"))
    probs = torch.softmax(scores, dim=1)
    return (probs.unsqueeze(-1) * v.float().unsqueeze(3)).sum(1)  # [B, Hkv, G, Dv]


def paged_decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_cache: torch.Tensor,
                           plan: PagedDecodePlan, scale: float, sliding_window: int | None) -> torch.Tensor:
    """Dense / GQA decode: q [B, Hq, D], k/v [B, Hkv, D] (this step's), kv_cache [2, blocks, bs, Hkv, D]."""
    num_kv_heads, head_dim = k.shape[-2], k.shape[-1]
    block, offset = plan.slot_mapping // plan.block_size, plan.slot_mapping % plan.block_size
    kv_half = torch.arange(2, device=k.device)[:, None]
    kv_cache.index_put_((kv_half, block[None, :], offset[None, :]), torch.stack([k, v]).to(kv_cache.dtype))
    B, num_heads = q.shape[0], q.shape[1]
    qg = q.view(B, num_kv_heads, num_heads // num_kv_heads, head_dim)
    out = _attend(qg, _context(kv_cache[0], plan), _context(kv_cache[1], plan),
                  plan.window_mask(sliding_window), scale)
    return out.reshape(B, num_heads, head_dim).to(q.dtype)


def paged_decode_mla(layer, q_nope: torch.Tensor, q_pe: torch.Tensor, latent: torch.Tensor, k_pe: torch.Tensor,
                     cache: torch.Tensor, plan: PagedDecodePlan) -> torch.Tensor:
    """MLA decode in latent space (see layers/mla.py): the cache row [latent | k_pe] is both the key (against
    [W_UK^T q_nope | q_pe]) and, in its first kv_lora_rank numbers, the value. Returns [B, H, v_head_dim]."""
    r = layer.kv_lora_rank
    block, offset = plan.slot_mapping // plan.block_size, plan.slot_mapping % plan.block_size
    cache.index_put_((block, offset), torch.cat([latent, k_pe], dim=-1).to(cache.dtype))
    w_uk, w_uv = layer.absorbed_weights()
    q_lat = torch.bmm(q_nope.transpose(0, 1), w_uk).transpose(0, 1)  # [B, H, r]
    q_abs = torch.cat([q_lat, q_pe], dim=-1).unsqueeze(1)  # [B, 1 (latent "kv head"), H, r + dr]
    ctx = _context(cache, plan).unsqueeze(2)  # [B, L, 1, r + dr]
    o_lat = _attend(q_abs, ctx, ctx[..., :r], plan.window_mask(layer.sliding_window), layer.scale)
    o_lat = o_lat.squeeze(1).to(q_nope.dtype)  # [B, H, r]
    return torch.bmm(o_lat.transpose(0, 1), w_uv).transpose(0, 1)
