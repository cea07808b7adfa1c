"""Extend attention that reads the paged cache in place: a chunk of n new tokens after P cached ones (chunked
prefill, a prefix-cache hit), for the reference backends on CPU.

The chunk's queries attend to two parts whose softmaxes are merged by their log-sum-exps, as flash attention
merges its tiles:
* the chunk itself, causal, from this step's k / v (the values the cache now holds for those positions);
* the cached prefix, read straight from the cache: the prefix's rows are grouped into ranges that are
  contiguous in the cache tensor, and SDPA reads each range as a view (no index_select copy per layer).
  With no sliding window every query sees every prefix key, so the prefix part needs no mask and the order of
  its keys does not matter (the softmax sums over them): ranges are formed in physical block order, so a
  table handed out in descending order (the free list gets a request's blocks tail-first) is still one view.
  With a window only the prefix rows some query can see are read, only by the queries that can see any of
  them, with a mask built from each row's logical position.
Query heads sharing a KV head are folded into that head's query rows for the prefix part (one K/V head read
feeds G * n rows, and GQA needs no repeat of the cache).

`torch.ops.aten._scaled_dot_product_flash_attention_for_cpu` is the kernel F.scaled_dot_product_attention
runs on CPU; called directly it also returns the log-sum-exp the merge needs.
"""
from __future__ import annotations

import torch

_flash_cpu = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu


def additive(mask: torch.Tensor) -> torch.Tensor:
    """Bool mask -> float 0 / -inf, built once per forward: SDPA would otherwise convert it in every layer."""
    return torch.zeros(mask.shape, device=mask.device).masked_fill_(~mask, float("-inf"))


def sdpa_lse(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, causal: bool = False,
             mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """q [1, H, Lq, D], k / v [1, H, Lk, D] (any strides with a unit last dim) -> (out [1, H, Lq, Dv],
    log-sum-exp of the scaled scores [1, H, Lq], float32)."""
    if mask is not None:
        mask = mask.to(q.dtype)
    out, lse = _flash_cpu(q, k, v, 0.0, causal, attn_mask=mask, scale=scale)
    return out, lse


def merge(out_a: torch.Tensor, lse_a: torch.Tensor, out_b: torch.Tensor, lse_b: torch.Tensor,
          may_be_empty: bool = False):
    """Two softmax-attention results over disjoint key sets -> the result over their union.
    out [rows, H, D], lse [rows, H]. With may_be_empty, a row may have seen no key in a or b (a sliding
    window's masked ranges: lse -inf, output undefined); a row that saw none in either stays at lse -inf."""
    lse = torch.logaddexp(lse_a, lse_b)
    ref = lse
    if may_be_empty:
        ref = torch.where(torch.isinf(lse), 0.0, lse)
        out_a, out_b = torch.nan_to_num(out_a, nan=0.0), torch.nan_to_num(out_b, nan=0.0)
    w_a, w_b = (lse_a - ref).exp_().unsqueeze(-1), (lse_b - ref).exp_().unsqueeze(-1)
    return (out_a * w_a + out_b * w_b).to(out_a.dtype), lse


class PrefixView:
    """One extend sequence's cached prefix as one window setting sees it: the ranges of flattened-cache rows to
    read (each contiguous in memory), how many leading queries read them, and the masks a window needs."""

    def __init__(self, blocks: list[int], prefix: int, num_queries: int, block_size: int,
                 window: int | None, device: torch.device):
        bs = block_size
        first = 0 if window is None else max(0, prefix - window + 1)  # keys at or before prefix - window: unseen
        # query prefix + i sees key prefix - 1 while prefix + i - window < prefix - 1
        self.num_queries = num_queries if window is None else min(num_queries, window - 1)
        pieces = []  # (flat row, logical position, length), one per block the prefix touches
        for b in range(first // bs, -(-prefix // bs)):
            lo, hi = max(first, b * bs), min(prefix, (b + 1) * bs)
            pieces.append((blocks[b] * bs + lo - b * bs, lo, hi - lo))
        pieces.sort()
        ranges: list[list] = []  # [flat start, length, [(logical position, length), ...]]
        for flat, pos, length in pieces:
            if ranges and ranges[-1][0] + ranges[-1][1] == flat:
                ranges[-1][1] += length
                ranges[-1][2].append((pos, length))
            else:
                ranges.append([flat, length, [(pos, length)]])
        self.ranges = [(flat, length) for flat, length, _ in ranges]
        self.masks: list[torch.Tensor | None] = [None] * len(ranges)  # additive [num_queries, length]
        self.windowed = window is not None
        if window is not None:
            q_pos = torch.arange(prefix, prefix + self.num_queries, device=device)
            for i, (_, _, parts) in enumerate(ranges):
                k_pos = torch.cat([torch.arange(p, p + n, device=device) for p, n in parts])
                allowed = k_pos[None, :] > q_pos[:, None] - window
                if not bool(allowed.all()):
                    self.masks[i] = additive(allowed)
        self._folded: dict = {}

    def folded_mask(self, i: int, group: int) -> torch.Tensor | None:
        """Range i's mask for query rows folded as (query, head in group): each query's row repeated."""
        mask = self.masks[i]
        if mask is None or group == 1:
            return mask
        if (i, group) not in self._folded:
            self._folded[(i, group)] = mask.repeat_interleave(group, dim=0)
        return self._folded[(i, group)]


def chunk_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
                    mask: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """The chunk attending to itself: q [n, Hq, D], k / v [n, Hkv, Dk / Dv]; causal, or the additive `mask`
    [n, n] (sliding window). -> (out [n, Hq, Dv], lse [n, Hq])."""
    group = q.shape[1] // k.shape[1]
    if group > 1:  # this step's rows only (not the cache): the kernel wants as many K/V heads as query heads
        k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    out, lse = sdpa_lse(q.transpose(0, 1)[None], k.transpose(0, 1)[None], v.transpose(0, 1)[None], scale,
                        causal=mask is None, mask=mask)
    return out[0].transpose(0, 1), lse[0].transpose(0, 1)


def prefix_attention(q: torch.Tensor, flat_k: torch.Tensor, flat_v: torch.Tensor, view: PrefixView,
                     scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The first view.num_queries queries q [nq, Hq, D] against the cached prefix, read in place from
    flat_k / flat_v [rows, Hkv, D] (the flattened cache) -> (out [nq, Hq, Dv], lse [nq, Hq])."""
    nq, num_heads, dim = q.shape
    num_kv = flat_k.shape[1]
    group = num_heads // num_kv
    qf = q.reshape(nq, num_kv, group, dim).transpose(0, 1).reshape(1, num_kv, nq * group, dim)
    out = lse = None
    for i, (start, length) in enumerate(view.ranges):
        k = flat_k[start:start + length].to(q.dtype).transpose(0, 1)[None]  # [1, Hkv, L, D], a view
        v = flat_v[start:start + length].to(q.dtype).transpose(0, 1)[None]
        o, s = sdpa_lse(qf, k, v, scale, mask=view.folded_mask(i, group))
        o = o[0].view(num_kv, nq, group, -1).transpose(0, 1).reshape(nq, num_heads, -1)
        s = s[0].view(num_kv, nq, group).transpose(0, 1).reshape(nq, num_heads)
        out, lse = (o, s) if out is None else merge(out, lse, o, s, view.windowed)
    if view.windowed:  # rows that saw no key at all get weight 0 in the final merge; keep them finite
        out = torch.nan_to_num(out, nan=0.0)
    return out, lse


def extend_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, flat_k: torch.Tensor,
                     flat_v: torch.Tensor, view: PrefixView, chunk_mask: torch.Tensor | None,
                     scale: float) -> torch.Tensor:
    """Dense / GQA extend of one sequence: q [n, Hq, D], k / v [n, Hkv, D] (the chunk's), the prefix read from
    the flattened cache through `view`. -> [n, Hq, D]."""
    out, lse = chunk_attention(q, k, v, scale, chunk_mask)
    nq = view.num_queries
    if nq <= 0 or not view.ranges:
        return out
    p_out, p_lse = prefix_attention(q[:nq], flat_k, flat_v, view, scale)
    if nq == out.shape[0]:
        return merge(out, lse, p_out, p_lse)[0]
    out = out.contiguous()
    out[:nq] = merge(out[:nq], lse[:nq], p_out, p_lse)[0]
    return out
