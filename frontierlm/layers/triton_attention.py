"""Triton attention over the paged KV cache: the CUDA backend behind `get_attn_backend`.

Three kernels, all over `kv_cache: [2, num_blocks, block_size, Hkv, D]` (slot = block_id * block_size + offset):

* `_write_kv_kernel`, grid (tokens, kv-head groups): copies each new token's K/V row to its slot; slot -1 is skipped.
* `_decode_kernel`, grid (decode seqs, Hkv, splits): one query token per sequence. A program owns one KV head and
  all `group = Hq // Hkv` query heads that share it, so each K/V tile is read once for the whole group (q tile
  [group, D], padded to 16 rows for `tl.dot`; MHA uses a multiply + sum GEMV instead). Online softmax over
  BLOCK_N-token tiles gathered through the block table; with splits > 1 (few sequences, long contexts: flash-
  decoding) each program covers a slice of the context and `_reduce_kernel` merges the partial (m, l, acc).
* `_extend_kernel`, grid (query tiles, Hkv): prefills, chunked prefills and prefix-cache hits (query_len > 1).
  A tile is BLOCK_M consecutive query tokens x the group's heads (rows = token-major), causal with the cached-
  prefix offset (query i sits at position seq_len - query_len + i) and the sliding window; key tiles wholly
  after the tile's last query or before its window are never visited.

K/V are gathered per token (page = pos // block_size), so tile sizes do not depend on the cache block size and
an unaligned sliding-window start costs nothing. Scores and accumulators are fp32; softmax uses exp2 with the
scale folded into log2(e). The K/V of the current step are written first and then read back from the cache, so
fresh prefills and extends take the same path.
"""
from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from frontierlm.layers.attention import AttentionBackend, AttentionMetadata

_LOG2E = 1.4426950408889634


@triton.jit
def _write_kv_kernel(k_ptr, v_ptr, cache_ptr, slot_ptr,
                     stride_kt, stride_kh, stride_vt, stride_vh, stride_c_kv, stride_c_slot, stride_c_head,
                     NUM_KV_HEADS, HEAD_DIM, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr):
    tok = tl.program_id(0)
    slot = tl.load(slot_ptr + tok).to(tl.int64)
    if slot < 0:  # padding row
        return
    h = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    d = tl.arange(0, BLOCK_D)
    mask = (h[:, None] < NUM_KV_HEADS) & (d[None, :] < HEAD_DIM)
    k = tl.load(k_ptr + tok * stride_kt + h[:, None] * stride_kh + d[None, :], mask=mask)
    v = tl.load(v_ptr + tok * stride_vt + h[:, None] * stride_vh + d[None, :], mask=mask)
    dst = cache_ptr + slot * stride_c_slot + h[:, None] * stride_c_head + d[None, :]
    tl.store(dst, k.to(cache_ptr.dtype.element_ty), mask=mask)
    tl.store(dst + stride_c_kv, v.to(cache_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _load_kv_tile(cache_ptr, tables_ptr, seq, pos, valid, kvh, d, d_mask,
                  stride_table, stride_c_kv, stride_c_slot, stride_c_head, PAGE: tl.constexpr):
    """K and V rows [BLOCK_N, BLOCK_D] of token positions `pos` of one sequence, gathered via its block table."""
    page = tl.load(tables_ptr + seq * stride_table + pos // PAGE, mask=valid, other=0).to(tl.int64)
    slot = page * PAGE + pos % PAGE
    off = slot[:, None] * stride_c_slot + kvh * stride_c_head + d[None, :]
    mask = valid[:, None] & d_mask[None, :]
    k = tl.load(cache_ptr + off, mask=mask, other=0.0)
    v = tl.load(cache_ptr + stride_c_kv + off, mask=mask, other=0.0)
    return k, v


@triton.jit
def _decode_kernel(q_ptr, cache_ptr, out_ptr, part_acc_ptr, part_m_ptr, part_l_ptr,
                   seq_idx_ptr, qsl_ptr, seq_lens_ptr, tables_ptr,
                   stride_qt, stride_qh, stride_ot, stride_oh, stride_table,
                   stride_c_kv, stride_c_slot, stride_c_head,
                   qk_scale, window, NUM_HEADS, GROUP, HEAD_DIM,
                   PAGE: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
                   NUM_SPLITS: tl.constexpr, SLIDING: tl.constexpr, USE_DOT: tl.constexpr,
                   DOT_PREC: tl.constexpr):
    i = tl.program_id(0)
    kvh = tl.program_id(1)
    split = tl.program_id(2)
    seq = tl.load(seq_idx_ptr + i)
    row = tl.load(qsl_ptr + seq)
    seq_len = tl.load(seq_lens_ptr + seq)
    lo = seq_len * 0
    if SLIDING:  # the query sits at seq_len - 1: keys k > seq_len - 1 - window
        lo = tl.maximum(seq_len - window, 0)
    # This split's slice of [lo, seq_len), whole tiles so only the last tile of the context is ragged.
    per_split = (seq_len - lo + NUM_SPLITS - 1) // NUM_SPLITS
    chunk = (per_split + BLOCK_N - 1) // BLOCK_N * BLOCK_N
    start = lo + split * chunk
    end = tl.minimum(start + chunk, seq_len)

    g = tl.arange(0, BLOCK_G)
    d = tl.arange(0, BLOCK_D)
    g_mask = g < GROUP
    d_mask = d < HEAD_DIM
    head = kvh * GROUP + g
    q = tl.load(q_ptr + row * stride_qt + head[:, None] * stride_qh + d[None, :],
                mask=g_mask[:, None] & d_mask[None, :], other=0.0)

    # Finite start for m: a tile with every key masked then gives exp2(-inf - m) = 0, never NaN.
    m_i = tl.full([BLOCK_G], -1.0e30, dtype=tl.float32)
    l_i = tl.zeros([BLOCK_G], dtype=tl.float32)
    acc = tl.zeros([BLOCK_G, BLOCK_D], dtype=tl.float32)
    for tile in range(start, end, BLOCK_N):
        pos = tile + tl.arange(0, BLOCK_N)
        valid = pos < end
        k, v = _load_kv_tile(cache_ptr, tables_ptr, seq, pos, valid, kvh, d, d_mask,
                             stride_table, stride_c_kv, stride_c_slot, stride_c_head, PAGE)
        if USE_DOT:
            s = tl.dot(q, tl.trans(k.to(q.dtype)), input_precision=DOT_PREC)
        else:  # GEMV: too few query rows to feed tensor cores
            s = tl.sum(q.to(tl.float32)[:, None, :] * k.to(tl.float32)[None, :, :], axis=2)
        s = tl.where(valid[None, :], s * qk_scale, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        if USE_DOT:
            pv = tl.dot(p.to(q.dtype), v.to(q.dtype), input_precision=DOT_PREC)
        else:
            pv = tl.sum(p[:, :, None] * v.to(tl.float32)[None, :, :], axis=1)
        acc = acc * alpha[:, None] + pv
        m_i = m_new

    if NUM_SPLITS == 1:
        out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
        tl.store(out_ptr + row * stride_ot + head[:, None] * stride_oh + d[None, :],
                 out.to(out_ptr.dtype.element_ty), mask=g_mask[:, None] & d_mask[None, :])
    else:  # partials [num_decodes, Hq, NUM_SPLITS(, D)], merged by _reduce_kernel
        part = (i * NUM_HEADS + head) * NUM_SPLITS + split
        tl.store(part_m_ptr + part, m_i, mask=g_mask)
        tl.store(part_l_ptr + part, l_i, mask=g_mask)
        tl.store(part_acc_ptr + part[:, None] * HEAD_DIM + d[None, :], acc,
                 mask=g_mask[:, None] & d_mask[None, :])


@triton.jit
def _reduce_kernel(out_ptr, part_acc_ptr, part_m_ptr, part_l_ptr, seq_idx_ptr, qsl_ptr,
                   stride_ot, stride_oh, NUM_HEADS, HEAD_DIM,
                   NUM_SPLITS: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr):
    i = tl.program_id(0)
    h = tl.program_id(1)
    row = tl.load(qsl_ptr + tl.load(seq_idx_ptr + i))
    s = tl.arange(0, BLOCK_S)
    d = tl.arange(0, BLOCK_D)
    s_mask = s < NUM_SPLITS
    base = (i * NUM_HEADS + h) * NUM_SPLITS
    m = tl.load(part_m_ptr + base + s, mask=s_mask, other=float("-inf"))
    l = tl.load(part_l_ptr + base + s, mask=s_mask, other=0.0)
    acc = tl.load(part_acc_ptr + (base + s)[:, None] * HEAD_DIM + d[None, :],
                  mask=s_mask[:, None] & (d[None, :] < HEAD_DIM), other=0.0)
    w = tl.exp2(m - tl.max(m, axis=0))  # empty splits carry m = -1e30, l = 0: weight 0
    out = tl.sum(acc * w[:, None], axis=0) / tl.sum(l * w, axis=0)
    tl.store(out_ptr + row * stride_ot + h * stride_oh + d, out.to(out_ptr.dtype.element_ty), mask=d < HEAD_DIM)


@triton.jit
def _extend_kernel(q_ptr, cache_ptr, out_ptr, tiles_ptr, qsl_ptr, seq_lens_ptr, tables_ptr,
                   stride_qt, stride_qh, stride_ot, stride_oh, stride_table,
                   stride_c_kv, stride_c_slot, stride_c_head,
                   qk_scale, window, GROUP, HEAD_DIM,
                   PAGE: tl.constexpr, BLOCK_M: tl.constexpr, GROUP_PAD: tl.constexpr, BLOCK_D: tl.constexpr,
                   BLOCK_N: tl.constexpr, SLIDING: tl.constexpr, DOT_PREC: tl.constexpr):
    t = tl.program_id(0)
    kvh = tl.program_id(1)
    seq = tl.load(tiles_ptr + 2 * t)
    m0 = tl.load(tiles_ptr + 2 * t + 1)  # first query of this tile, counted within the chunk
    q_start = tl.load(qsl_ptr + seq)
    q_len = tl.load(qsl_ptr + seq + 1) - q_start
    seq_len = tl.load(seq_lens_ptr + seq)
    prefix = seq_len - q_len

    # Rows are (token, head-in-group) pairs, token-major: one K/V tile serves every head of the group.
    r = tl.arange(0, BLOCK_M * GROUP_PAD)
    tok = m0 + r // GROUP_PAD
    g = r % GROUP_PAD
    row_mask = (tok < q_len) & (g < GROUP)
    d = tl.arange(0, BLOCK_D)
    d_mask = d < HEAD_DIM
    head = kvh * GROUP + g
    q = tl.load(q_ptr + (q_start + tok)[:, None] * stride_qt + head[:, None] * stride_qh + d[None, :],
                mask=row_mask[:, None] & d_mask[None, :], other=0.0)
    q_pos = prefix + tok

    # Keys past the tile's last query are invisible to all its rows; with a window, so are those before
    # the first query's window.
    hi = tl.minimum(seq_len, prefix + m0 + BLOCK_M)
    lo = seq_len * 0
    if SLIDING:
        lo = tl.maximum(prefix + m0 - window + 1, 0)

    m_i = tl.full([BLOCK_M * GROUP_PAD], -1.0e30, dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M * GROUP_PAD], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M * GROUP_PAD, BLOCK_D], dtype=tl.float32)
    for tile in range(lo, hi, BLOCK_N):
        pos = tile + tl.arange(0, BLOCK_N)
        valid = pos < hi
        k, v = _load_kv_tile(cache_ptr, tables_ptr, seq, pos, valid, kvh, d, d_mask,
                             stride_table, stride_c_kv, stride_c_slot, stride_c_head, PAGE)
        s = tl.dot(q, tl.trans(k.to(q.dtype)), input_precision=DOT_PREC) * qk_scale
        visible = valid[None, :] & (pos[None, :] <= q_pos[:, None])
        if SLIDING:
            visible = visible & (pos[None, :] > q_pos[:, None] - window)
        s = tl.where(visible, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + tl.dot(p.to(q.dtype), v.to(q.dtype), input_precision=DOT_PREC)
        m_i = m_new

    out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]  # l = 0 only on masked-off padding rows
    tl.store(out_ptr + (q_start + tok)[:, None] * stride_ot + head[:, None] * stride_oh + d[None, :],
             out.to(out_ptr.dtype.element_ty), mask=row_mask[:, None] & d_mask[None, :])


@functools.lru_cache(maxsize=None)
def _num_sms(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


class _TritonPlan:
    """Per-forward work lists (decode sequences, extend query tiles) built from the host lengths, so no layer
    syncs with the device; the index tensors and split-K scratch are shared by every layer."""

    def __init__(self, meta: AttentionMetadata):
        self.meta = meta
        qlens, slens = meta.query_lens_cpu, meta.seq_lens_cpu
        self.has_padding = sum(qlens) < meta.slot_mapping.shape[0]  # rows past the last sequence get zeros
        self.decodes = [i for i, n in enumerate(qlens) if n == 1]
        self.extends = [i for i, n in enumerate(qlens) if n > 1]
        self.max_decode_len = max((slens[i] for i in self.decodes), default=0)
        self._tiles: dict[int, tuple] = {}
        self._scratch: dict[tuple, tuple] = {}

    def work(self, block_m: int) -> tuple[torch.Tensor, torch.Tensor, int]:
        """(decode seq indices [n], extend tiles [t, 2] of (seq, first query), t): one host-to-device copy."""
        if block_m not in self._tiles:
            tiles = [(i, m0) for i in self.extends for m0 in range(0, self.meta.query_lens_cpu[i], block_m)]
            host = torch.tensor(self.decodes + [x for tile in tiles for x in tile], dtype=torch.int32)
            dev = host.to(self.meta.slot_mapping.device, non_blocking=True)
            nd = len(self.decodes)
            self._tiles[block_m] = dev[:nd], dev[nd:], len(tiles)
        return self._tiles[block_m]

    def scratch(self, num_heads: int, head_dim: int, splits: int, device) -> tuple:
        key = (num_heads, head_dim, splits)
        if key not in self._scratch:
            shape = (len(self.decodes), num_heads, splits)
            self._scratch[key] = (torch.empty(*shape, head_dim, dtype=torch.float32, device=device),
                                  torch.empty(shape, dtype=torch.float32, device=device),
                                  torch.empty(shape, dtype=torch.float32, device=device))
        return self._scratch[key]


class TritonAttentionBackend(AttentionBackend):
    """Paged attention in Triton kernels (see the module docstring). Tile sizes are constructor arguments so
    tests can force many tiles and splits; `num_splits=None` picks split-K from the SM count on CUDA."""

    name = "triton"

    def __init__(self, block_n: int = 64, block_rows: int = 64, num_splits: int | None = None,
                 split_min_tokens: int = 256, max_splits: int = 16):
        if block_n < 16 or block_rows < 16 or block_n & (block_n - 1) or block_rows & (block_rows - 1):
            raise ValueError(f"block_n ({block_n}) and block_rows ({block_rows}) must be powers of two >= 16")
        if num_splits is not None and num_splits < 1:
            raise ValueError(f"num_splits must be >= 1, got {num_splits}")
        self.block_n, self.block_rows, self.num_splits = block_n, block_rows, num_splits
        self.split_min_tokens, self.max_splits = split_min_tokens, max_splits

    def plan(self, attn_meta: AttentionMetadata) -> _TritonPlan:
        return _TritonPlan(attn_meta)

    def _splits(self, plan: _TritonPlan, num_kv_heads: int, device: torch.device) -> int:
        """Split-K only when the (decode, kv head) grid cannot fill the GPU and contexts are long."""
        if self.num_splits is not None:
            return self.num_splits
        if device.type != "cuda" or not plan.decodes:
            return 1
        programs = len(plan.decodes) * num_kv_heads
        sms = _num_sms(device.index if device.index is not None else torch.cuda.current_device())
        by_grid = -(-2 * sms // programs)
        by_len = -(-plan.max_decode_len // self.split_min_tokens)
        return max(1, min(by_grid, by_len, self.max_splits))

    def forward(self, q, k, v, kv_cache, plan: _TritonPlan, scale, sliding_window):
        meta = plan.meta
        q_shape = q.shape
        num_heads, head_dim = q.shape[-2], q.shape[-1]
        num_kv_heads = k.shape[-2]
        q, k, v = (t.reshape(-1, t.shape[-2], head_dim) for t in (q, k, v))
        q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
        num_tokens = q.shape[0]
        if kv_cache.stride(-1) != 1 or kv_cache.stride(1) != kv_cache.shape[2] * kv_cache.stride(2):
            raise ValueError("kv_cache must be contiguous within [block, offset, head, dim]")
        tables = meta.block_tables
        if tables.stride(-1) != 1:
            tables = tables.contiguous()
        page = meta.block_size
        cs = (kv_cache.stride(0), kv_cache.stride(2), kv_cache.stride(3))  # kv, slot, head
        block_d = max(16, triton.next_power_of_2(head_dim))
        block_h = min(triton.next_power_of_2(num_kv_heads), max(1, 2048 // block_d))  # <= 2048 elements each
        if num_tokens:
            _write_kv_kernel[(num_tokens, triton.cdiv(num_kv_heads, block_h))](
                k, v, kv_cache, meta.slot_mapping, k.stride(0), k.stride(1), v.stride(0), v.stride(1), *cs,
                num_kv_heads, head_dim, BLOCK_H=block_h, BLOCK_D=block_d, num_warps=4)

        out = torch.zeros_like(q) if plan.has_padding else torch.empty_like(q)
        group = num_heads // num_kv_heads
        group_pad = triton.next_power_of_2(group)
        block_m = max(1, self.block_rows // group_pad)  # query tokens per extend tile
        decode_idx, tiles, num_tiles = plan.work(block_m)
        qk_scale = scale * _LOG2E
        sliding = sliding_window is not None
        window = sliding_window if sliding else 0
        prec = "ieee" if q.dtype == torch.float32 else "tf32"  # fp32 must not silently drop to tf32

        if plan.decodes:
            splits = self._splits(plan, num_kv_heads, q.device)
            use_dot = group > 1  # pad the group to 16 rows for tensor cores; MHA stays a GEMV
            block_g = max(16, group_pad) if use_dot else group_pad
            # The GEMV's [1, BLOCK_N, D] product lives in registers: keep its tile smaller.
            block_n = self.block_n if use_dot else min(self.block_n, 32)
            part_acc = part_m = part_l = out  # unused unless split
            if splits > 1:
                part_acc, part_m, part_l = plan.scratch(num_heads, head_dim, splits, q.device)
            _decode_kernel[(len(plan.decodes), num_kv_heads, splits)](
                q, kv_cache, out, part_acc, part_m, part_l,
                decode_idx, meta.query_start_loc, meta.seq_lens, tables,
                q.stride(0), q.stride(1), out.stride(0), out.stride(1), tables.stride(0), *cs,
                qk_scale, window, num_heads, group, head_dim,
                PAGE=page, BLOCK_G=block_g, BLOCK_D=block_d, BLOCK_N=block_n,
                NUM_SPLITS=splits, SLIDING=sliding, USE_DOT=use_dot, DOT_PREC=prec, num_warps=4)
            if splits > 1:
                _reduce_kernel[(len(plan.decodes), num_heads)](
                    out, part_acc, part_m, part_l, decode_idx, meta.query_start_loc,
                    out.stride(0), out.stride(1), num_heads, head_dim,
                    NUM_SPLITS=splits, BLOCK_S=triton.next_power_of_2(splits), BLOCK_D=block_d, num_warps=4)

        if num_tiles:
            _extend_kernel[(num_tiles, num_kv_heads)](
                q, kv_cache, out, tiles, meta.query_start_loc, meta.seq_lens, tables,
                q.stride(0), q.stride(1), out.stride(0), out.stride(1), tables.stride(0), *cs,
                qk_scale, window, group, head_dim,
                PAGE=page, BLOCK_M=block_m, GROUP_PAD=group_pad, BLOCK_D=block_d, BLOCK_N=self.block_n,
                SLIDING=sliding, DOT_PREC=prec, num_warps=4 if block_m * group_pad <= 64 else 8)
        return out.view(q_shape)
