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
    if mask is not None:  # [Lq, Lk], shared by the heads
        mask = mask.to(q.dtype)[None, None]
    out, lse = _flash_cpu(q, k, v, 0.0, causal, attn_mask=mask, scale=scale)
    return out, lse


def merge(out_a: torch.Tensor, lse_a: torch.Tensor, out_b: torch.Tensor, lse_b: torch.Tensor,
          may_be_empty: bool = False, need_lse: bool = True):
    """Two softmax-attention results over disjoint key sets -> the result over their union (and its lse when
    need_lse). out [rows, H, D], lse [rows, H]. With may_be_empty, a row may have seen no key in a or b (a
    sliding window's masked parts: lse -inf, output undefined); a row that saw none in either stays at -inf."""
    if may_be_empty:
        lse = torch.logaddexp(lse_a, lse_b)
        ref = torch.where(torch.isinf(lse), 0.0, lse)
        out_a, out_b = torch.nan_to_num(out_a, nan=0.0), torch.nan_to_num(out_b, nan=0.0)
        w_a, w_b = (lse_a - ref).exp_().unsqueeze(-1), (lse_b - ref).exp_().unsqueeze(-1)
        return (out_a * w_a + out_b * w_b).to(out_a.dtype), lse
    # b's share of the union's softmax mass is sigmoid(lse_b - lse_a): one fused lerp does the rest
    w_b = torch.sigmoid(lse_b - lse_a).unsqueeze(-1)
    if out_a.dtype == w_b.dtype:
        out = torch.lerp(out_a, out_b, w_b)
    else:
        out = torch.lerp(out_a.float(), out_b.float(), w_b).to(out_a.dtype)
    return out, torch.logaddexp(lse_a, lse_b) if need_lse else None


class PrefixView:
    """One extend sequence's cached prefix as one window setting sees it: the rows of the flattened cache to read
    (`parts`: each a slice of rows contiguous in memory, read as a view), how many leading queries read them, and
    the masks a window needs."""

    # Runs shorter than this many rows (blocks scattered one by one) are gathered into one copy and attended with
    # one SDPA call instead of one call each; 0 reads every run in place. 64 measured best for tables of
    # single scattered 16-token blocks on CPU (benchmarks/prefix_extend.py, docs/benchmarks.md).
    MIN_VIEW_ROWS = 64

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
        runs: list[list] = []  # [flat start, length, [(logical position, length), ...]]
        for flat, pos, length in pieces:
            if runs and runs[-1][0] + runs[-1][1] == flat:
                runs[-1][1] += length
                runs[-1][2].append((pos, length))
            else:
                runs.append([flat, length, [(pos, length)]])
        short = [r for r in runs if r[1] < self.MIN_VIEW_ROWS]
        runs = [r for r in runs if r[1] >= self.MIN_VIEW_ROWS]
        self.parts: list = [slice(flat, flat + length) for flat, length, _ in runs]
        positions = [p for _, _, p in runs]
        if short:
            self.parts.append(torch.cat([torch.arange(f, f + n, device=device) for f, n, _ in short]))
            positions.append([piece for _, _, ps in short for piece in ps])
        self.masks: list[torch.Tensor | None] = [None] * len(self.parts)  # additive [num_queries, length]
        # [num_queries] bool: queries that see no key of the part (the kernel gives them lse 0, not -inf)
        self.empty: list[torch.Tensor | None] = [None] * len(self.parts)
        self.windowed = window is not None
        if window is not None:
            q_pos = torch.arange(prefix, prefix + self.num_queries, device=device)
            for i, ps in enumerate(positions):
                k_pos = torch.cat([torch.arange(p, p + n, device=device) for p, n in ps])
                allowed = k_pos[None, :] > q_pos[:, None] - window
                if not bool(allowed.all()):
                    self.masks[i] = additive(allowed)
                    blind = ~allowed.any(1)
                    self.empty[i] = blind if bool(blind.any()) else None
        self._folded: dict = {}

    @property
    def ranges(self) -> list[tuple[int, int]]:
        """(first row, rows) of each part read in place."""
        return [(p.start, p.stop - p.start) for p in self.parts if isinstance(p, slice)]

    def read(self, flat: torch.Tensor, i: int) -> torch.Tensor:
        """Part i's rows of a flattened cache [rows, ...]: a view, or the gathered copy of the short runs."""
        part = self.parts[i]
        return flat[part] if isinstance(part, slice) else flat.index_select(0, part)

    def folded_mask(self, i: int, group: int) -> torch.Tensor | None:
        """Part i's mask for query rows folded as (query, head in group): each query's row repeated."""
        mask = self.masks[i]
        if mask is None or group == 1:
            return mask
        if (i, group) not in self._folded:
            self._folded[(i, group)] = mask.repeat_interleave(group, dim=0)
        return self._folded[(i, group)]


def chunk_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
                    mask: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """The chunk attending to itself: q [n, Hq, D], k / v [n, Hkv, Dk / Dv] (the kernel does GQA itself);
    causal, or the additive `mask` [n, n] (sliding window). -> (out [n, Hq, Dv], lse [n, Hq])."""
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
    for i in range(len(view.parts)):
        k = view.read(flat_k, i).to(q.dtype).transpose(0, 1)[None]  # [1, Hkv, L, D], a view
        v = view.read(flat_v, i).to(q.dtype).transpose(0, 1)[None]
        o, s = sdpa_lse(qf, k, v, scale, mask=view.folded_mask(i, group))
        o = o[0].view(num_kv, nq, group, -1).transpose(0, 1).reshape(nq, num_heads, -1)
        s = s[0].view(num_kv, nq, group).transpose(0, 1).reshape(nq, num_heads)
        if view.empty[i] is not None:
            s = s.masked_fill(view.empty[i][:, None], float("-inf"))
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
    if nq <= 0 or not view.parts:
        return out
    p_out, p_lse = prefix_attention(q[:nq], flat_k, flat_v, view, scale)
    if nq == out.shape[0]:
        return merge(out, lse, p_out, p_lse, need_lse=False)[0]
    out = out.contiguous()
    out[:nq] = merge(out[:nq], lse[:nq], p_out, p_lse, need_lse=False)[0]
    return out
