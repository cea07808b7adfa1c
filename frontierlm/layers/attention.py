"""Attention over a paged KV cache, behind a small backend interface.

A backend does two things: `plan(attn_meta)` once per forward (index tensors every layer shares), and
`forward(q, k, v, kv_cache, plan, scale, sliding_window)` per layer (write the new K/V at slot_mapping,
then attend over each sequence's cached context). `TorchAttentionBackend` is the pure-PyTorch reference:
it runs on CPU and CUDA and is the oracle for the fused kernels.

With attn_meta=None the layer does plain causal attention over contiguous sequences (trainer, parity tests).
"""
from __future__ import annotations

import abc
import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from frontierlm.layers.paged_decode import PagedDecodePlan, paged_decode_attention
from frontierlm.layers.paged_extend import PrefixView, additive, extend_attention
from frontierlm.quant.kv_cache import fp8_attention, is_fp8, store_rows


@dataclass
class AttentionMetadata:
    slot_mapping: torch.Tensor     # [num_tokens] int64: cache slot (block_id * block_size + offset); -1 = skip
    query_start_loc: torch.Tensor  # [num_seqs + 1] int32: rows of seq i are query_start_loc[i]:query_start_loc[i+1]
    seq_lens: torch.Tensor         # [num_seqs] int32: context length of seq i after this step
    block_tables: torch.Tensor     # [num_seqs, max_blocks_per_seq] int32, padded with 0
    query_lens_cpu: list[int]      # host copies so the reference backend needs no device sync
    seq_lens_cpu: list[int]
    max_query_len: int
    max_seq_len: int
    block_size: int


def sliding_window_mask(q_pos: torch.Tensor, k_pos: torch.Tensor, window: int | None) -> torch.Tensor:
    """Bool [..., q, k]: causal, and within the window (transformers' rule: k > q - window)."""
    allowed = k_pos[None, :] <= q_pos[:, None]
    if window is not None:
        allowed &= k_pos[None, :] > q_pos[:, None] - window
    return allowed


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
                     sliding_window: int | None = None) -> torch.Tensor:
    """q [(B,) S, Hq, D], k/v [(B,) S, Hkv, D] -> [(B,) S, Hq, D]: causal attention within each sequence."""
    seq, v_dim = q.shape[-3], v.shape[-1]
    if v_dim < q.shape[-1]:
        # MLA's values are narrower than its queries; the fused (flash) SDPA kernels need equal widths and
        # fall back to the masked math path otherwise (3x slower on CPU), so pad the values with zeros.
        v = F.pad(v, (0, q.shape[-1] - v_dim))
    q, k, v = (t.transpose(-3, -2) for t in (q, k, v))
    gqa = q.shape[-3] != k.shape[-3]
    if sliding_window is None or seq <= sliding_window:
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=gqa)
    else:
        pos = torch.arange(seq, device=q.device)
        mask = sliding_window_mask(pos, pos, sliding_window)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=gqa)
    return out.transpose(-3, -2)[..., :v_dim]


class AttentionBackend(abc.ABC):
    """Interface every backend implements (see the module docstring)."""

    name = "base"

    @abc.abstractmethod
    def plan(self, attn_meta: AttentionMetadata):
        """Index tensors shared by every layer of one forward."""

    @abc.abstractmethod
    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_cache: torch.Tensor, plan,
                scale: float, sliding_window: int | None) -> torch.Tensor:
        """Write the new K/V at the plan's slots, then attend over each sequence's cached context."""


class _TorchPlan:
    """Per-forward index tensors for the reference backend: decode groups and extend sequences."""

    GROUP_BYTES = 1 << 20  # gathered K bytes per decode group on CPU (fits in L2 with its V)

    def __init__(self, meta: AttentionMetadata, extend_in_place: bool | None = None):
        self.meta = meta
        # Extends over a cached prefix read the cache in place (layers/paged_extend.py) on CPU; elsewhere, or
        # with extend_in_place=False, the prefix's blocks are gathered into a contiguous copy per layer.
        on_cpu = meta.slot_mapping.device.type == "cpu"
        self.extend_in_place = on_cpu if extend_in_place is None else extend_in_place and on_cpu
        bs = meta.block_size
        slots = meta.slot_mapping.long()
        valid = slots >= 0
        if bool(valid.all()):
            self.write_rows, self.write_slots = None, slots
        else:
            self.write_rows = valid.nonzero().squeeze(1)
            self.write_slots = slots[self.write_rows]
        starts = [0]
        for n in meta.query_lens_cpu:
            starts.append(starts[-1] + n)
        self.has_padding = starts[-1] < slots.shape[0]  # rows past the last sequence get zeros
        tables = meta.block_tables.long()
        # Decodes (query_len == 1) are attended together in groups: see decode_groups.
        self.decodes = sorted((i for i, n in enumerate(meta.query_lens_cpu) if n == 1),
                              key=lambda i: meta.seq_lens_cpu[i])
        self.num_decodes = len(self.decodes)
        self._starts, self._tables, self._groups = starts, tables, {}
        # Prefills / extends (query_len > 1): one SDPA each, causal with the cached prefix in front.
        self.extends, self._host_blocks = [], []
        for i, n in enumerate(meta.query_lens_cpu):
            if n > 1:
                slen = meta.seq_lens_cpu[i]
                blocks = tables[i, :-(-slen // bs)] if slen > n else None  # None: no prefix, use k/v directly
                self.extends.append((starts[i], n, slen, blocks))
                # block_tables lives on the host here (CPU), so reading it costs no device sync
                in_place = self.extend_in_place and blocks is not None
                self._host_blocks.append(blocks[:-(-(slen - n) // bs)].tolist() if in_place else None)
        self._masks: dict = {}
        self._views: dict = {}

    def decode_groups(self, token_bytes: int) -> list[tuple]:
        """Decode sequences sorted by length, cut into groups of at most ~GROUP_BYTES of gathered K per group
        (one gather + one SDPA each). On CPU small groups stay in cache and pad little: 3-4x faster than one
        big gather for 64 sequences of 65-512 tokens. On CUDA: one group (launch-bound)."""
        if token_bytes not in self._groups:
            meta, bs, device = self.meta, self.meta.block_size, self.meta.slot_mapping.device
            budget = float("inf") if device.type == "cuda" else max(self.GROUP_BYTES // token_bytes, 1)
            groups, a, dec = [], 0, self.decodes
            while a < len(dec):
                b = a + 1  # sorted ascending, so the last member sets the padded length
                while b < len(dec) and (b + 1 - a) * -(-meta.seq_lens_cpu[dec[b]] // bs) * bs <= budget:
                    b += 1
                groups.append(self._decode_group(dec[a:b]))
                a = b
            self._groups[token_bytes] = groups
        return self._groups[token_bytes]

    def _decode_group(self, seqs: list[int]) -> tuple:
        meta, device = self.meta, self.meta.slot_mapping.device
        rows = [self._starts[i] for i in seqs]
        contiguous = rows == list(range(rows[0], rows[0] + len(rows)))
        rows = slice(rows[0], rows[0] + len(rows)) if contiguous else torch.tensor(rows, device=device)
        idx = torch.tensor(seqs, device=device)
        nblk = -(-max(meta.seq_lens_cpu[i] for i in seqs) // meta.block_size)
        lens = meta.seq_lens.long()[idx][:, None]
        pos = torch.arange(nblk * meta.block_size, device=device)[None, :]
        # masks[window]: [n, 1 (kv heads), 1 (q heads per kv head), L], built on first use
        return rows, self._tables[idx, :nblk].flatten(), lens, pos, {}

    @staticmethod
    def decode_mask(group: tuple, window: int | None) -> torch.Tensor:
        _, _, lens, pos, masks = group
        if window not in masks:
            mask = pos < lens
            if window is not None:
                mask &= pos > lens - 1 - window
            masks[window] = _additive(mask[:, None, None, :])
        return masks[window]

    def extend_mask(self, j: int, window: int | None) -> torch.Tensor:
        key = (j, window)
        if key not in self._masks:
            _, n, slen, _ = self.extends[j]
            device = self.meta.slot_mapping.device
            k_pos = torch.arange(slen, device=device)
            self._masks[key] = _additive(sliding_window_mask(k_pos[slen - n:], k_pos, window))
        return self._masks[key]

    def prefix_view(self, j: int, window: int | None) -> PrefixView | None:
        """Extend j's cached prefix to read in place, or None: no prefix, or the gathering path."""
        blocks = self._host_blocks[j]
        if blocks is None:
            return None
        if (j, window) not in self._views:
            _, n, slen, _ = self.extends[j]
            self._views[(j, window)] = PrefixView(blocks, slen - n, n, self.meta.block_size, window,
                                                  self.meta.slot_mapping.device)
        return self._views[(j, window)]

    def chunk_mask(self, j: int, window: int | None) -> torch.Tensor | None:
        """Additive [n, n] mask of extend j's chunk attending to itself: None (plain causal) unless a window
        is shorter than the chunk."""
        n = self.extends[j][1]
        if window is None or n <= window:
            return None
        key = ("chunk", j, window)
        if key not in self._masks:
            pos = torch.arange(n, device=self.meta.slot_mapping.device)
            self._masks[key] = _additive(sliding_window_mask(pos, pos, window))
        return self._masks[key]


_additive = additive  # bool mask -> float 0 / -inf, built once per forward (layers/paged_extend.py)


def _gather_blocks(cache: torch.Tensor, blocks: torch.Tensor) -> torch.Tensor:
    """Whole blocks of one [num_blocks, block_size, Hkv, D] cache: index_select over flat rows is several
    times faster on CPU than advanced indexing or selecting along an inner dim."""
    return cache.reshape(cache.shape[0], -1).index_select(0, blocks)


class TorchAttentionBackend(AttentionBackend):
    name = "torch"

    def __init__(self, extend_in_place: bool | None = None):
        self.extend_in_place = extend_in_place  # None: in place on CPU (see _TorchPlan)

    def plan(self, attn_meta: AttentionMetadata) -> _TorchPlan:
        return _TorchPlan(attn_meta, self.extend_in_place)

    def forward(self, q, k, v, kv_cache, plan: _TorchPlan, scale, sliding_window):
        num_kv_heads, head_dim = k.shape[-2], k.shape[-1]
        # kv_cache: [2, num_blocks, block_size, Hkv, D]; slots index the flattened (block, offset) dims.
        flat_k, flat_v = kv_cache[0].view(-1, num_kv_heads, head_dim), kv_cache[1].view(-1, num_kv_heads, head_dim)
        if plan.write_rows is None:
            new_k, new_v = k, v
        else:
            new_k, new_v = k[plan.write_rows], v[plan.write_rows]
        store_rows(flat_k, plan.write_slots, new_k)
        store_rows(flat_v, plan.write_slots, new_v)

        out = torch.zeros_like(q) if plan.has_padding else torch.empty_like(q)
        num_heads = q.shape[-2]
        group_size = num_heads // num_kv_heads
        token_bytes = num_kv_heads * head_dim * kv_cache.element_size()
        for group in plan.decode_groups(token_bytes) if plan.num_decodes else ():
            rows, blocks = group[0], group[1]
            # Query heads sharing a KV head become that head's query rows: GQA with no repeat of K/V.
            qd = q[rows].reshape(-1, num_kv_heads, group_size, head_dim)
            nd = qd.shape[0]
            kd = _gather_blocks(kv_cache[0], blocks).view(nd, -1, num_kv_heads, head_dim)
            vd = _gather_blocks(kv_cache[1], blocks).view(nd, -1, num_kv_heads, head_dim)
            kd, vd = kd.transpose(1, 2).to(q.dtype), vd.transpose(1, 2).to(q.dtype)  # [n, Hkv, L, D]
            mask = plan.decode_mask(group, sliding_window).to(q.dtype)
            od = F.scaled_dot_product_attention(qd, kd, vd, attn_mask=mask, scale=scale)
            out[rows] = od.reshape(nd, num_heads, head_dim)
        for j, (start, n, slen, blocks) in enumerate(plan.extends):
            view = plan.prefix_view(j, sliding_window)
            if view is not None:  # the cached prefix read in place (layers/paged_extend.py)
                rows = slice(start, start + n)
                out[rows] = extend_attention(q[rows], k[rows], v[rows], flat_k, flat_v, view,
                                             plan.chunk_mask(j, sliding_window), scale)
                continue
            qs = q[start:start + n].transpose(0, 1)
            if blocks is None:
                ks, vs = k[start:start + n].transpose(0, 1), v[start:start + n].transpose(0, 1)
            else:
                ks = _gather_blocks(kv_cache[0], blocks).view(-1, num_kv_heads, head_dim)[:slen]
                vs = _gather_blocks(kv_cache[1], blocks).view(-1, num_kv_heads, head_dim)[:slen]
                ks, vs = ks.transpose(0, 1).to(q.dtype), vs.transpose(0, 1).to(q.dtype)
            if blocks is None and (sliding_window is None or n <= sliding_window):
                o = F.scaled_dot_product_attention(qs, ks, vs, is_causal=True, scale=scale, enable_gqa=True)
            else:
                mask = plan.extend_mask(j, sliding_window).to(q.dtype)
                o = F.scaled_dot_product_attention(qs, ks, vs, attn_mask=mask, scale=scale, enable_gqa=True)
            out[start:start + n] = o.transpose(0, 1)
        return out


def get_attn_backend(device: torch.device | str | None = None) -> AttentionBackend:
    """The backend for a device: Triton kernels on CUDA when triton imports, else the reference.

    `FRONTIERLM_ATTENTION_BACKEND=torch|triton` forces one whatever the device (`triton` raises if triton is
    missing; off CUDA it needs `TRITON_INTERPRET=1`). With no device and no variable: the reference backend.
    """
    choice = os.environ.get("FRONTIERLM_ATTENTION_BACKEND", "").strip().lower()
    if choice not in ("", "torch", "triton"):
        raise ValueError(f"FRONTIERLM_ATTENTION_BACKEND must be 'torch' or 'triton', got {choice!r}")
    on_cuda = device is not None and torch.device(device).type == "cuda"
    if choice == "triton" or (not choice and on_cuda):
        try:
            from frontierlm.layers.triton_attention import TritonAttentionBackend
        except ImportError:
            if choice:
                raise
        else:
            return TritonAttentionBackend()
    return TorchAttentionBackend()


class Attention(nn.Module):
    """One layer's attention: owns its slice of the KV cache, delegates the math to the backend."""

    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int, scale: float,
                 sliding_window: int | None = None, backend: AttentionBackend | None = None):
        super().__init__()
        if num_heads % num_kv_heads:
            raise ValueError(f"num_heads ({num_heads}) must be a multiple of num_kv_heads ({num_kv_heads})")
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.scale = scale
        self.sliding_window = sliding_window
        self.backend = backend or TorchAttentionBackend()
        self.kv_cache: torch.Tensor | None = None  # [2, num_blocks, block_size, Hkv, D], bound by the engine

    def kv_cache_shape(self, num_blocks: int, block_size: int) -> tuple[int, ...]:
        return (2, num_blocks, block_size, self.num_kv_heads, self.head_dim)

    def bind_kv_cache(self, cache: torch.Tensor) -> None:
        if cache.dim() != 5 or tuple(cache.shape) != self.kv_cache_shape(cache.shape[1], cache.shape[2]):
            raise ValueError(f"KV cache must be [2, num_blocks, block_size, {self.num_kv_heads}, "
                             f"{self.head_dim}], got {tuple(cache.shape)}")
        self.kv_cache = cache

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, plan=None) -> torch.Tensor:
        """q [..., Hq, D], k/v [..., Hkv, D]; plan = backend.plan(attn_meta) or None for plain causal."""
        if plan is None:
            return causal_attention(q, k, v, self.scale, self.sliding_window)
        if self.kv_cache is None:
            raise RuntimeError("attention got attn_meta but no KV cache is bound (call model.bind_kv_cache)")
        if is_fp8(self.kv_cache):  # scaled, clamped K/V (frontierlm/quant/kv_cache.py)
            return fp8_attention(self, q, k, v, plan, lambda q, k, v, scale: self._attend(q, k, v, plan, scale))
        return self._attend(q, k, v, plan, self.scale)

    def _attend(self, q, k, v, plan, scale: float) -> torch.Tensor:
        if isinstance(plan, PagedDecodePlan):  # the static-shape decode step (engine/fast_decode.py)
            return paged_decode_attention(q, k, v, self.kv_cache, plan, scale, self.sliding_window)
        return self.backend.forward(q, k, v, self.kv_cache, plan, scale, self.sliding_window)
