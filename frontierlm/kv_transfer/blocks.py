"""Packing KV blocks: every layer's slice of a block, in one contiguous row per block, and back. Works for any
per-layer cache layout whose block dimension it is told: dense K/V ([2, blocks, ...]) and MLA's latent
([blocks, ...]) alike, so MLA models move their compressed latent blocks."""
from __future__ import annotations

import math

import torch


class BlockIO:
    def __init__(self, kv_caches: list[torch.Tensor]):
        # a view of each layer with the block dimension first (dense caches hold K and V on dim 0)
        self.views = [c.transpose(0, 1) if c.dim() == 5 else c for c in kv_caches]
        self.numels = [math.prod(v.shape[1:]) for v in self.views]
        self.numel = sum(self.numels)
        self.dtype = kv_caches[0].dtype
        self.device = kv_caches[0].device
        self.bytes_per_block = self.numel * kv_caches[0].element_size()
        # an FP8 cache (frontierlm/quant/kv_cache.py) travels as its bytes: gloo has no float8 types
        self.wire_dtype = torch.uint8 if kv_caches[0].element_size() == 1 else self.dtype

    def empty(self, num_blocks: int) -> torch.Tensor:
        return torch.empty(num_blocks, self.numel, dtype=self.wire_dtype, device=self.device)

    def gather(self, block_ids: list[int]) -> torch.Tensor:
        idx = torch.tensor(block_ids, dtype=torch.long, device=self.device)
        packed = torch.cat([v.index_select(0, idx).reshape(len(block_ids), -1) for v in self.views], dim=1)
        return packed.view(self.wire_dtype)

    def scatter(self, block_ids: list[int], packed: torch.Tensor) -> None:
        packed = packed.view(self.dtype)
        idx = torch.tensor(block_ids, dtype=torch.long, device=self.device)
        offset = 0
        for v, n in zip(self.views, self.numels):
            v[idx] = packed[:, offset:offset + n].reshape(len(block_ids), *v.shape[1:])
            offset += n
