"""How many KV-cache blocks fit: the budget (kv_cache_memory_gb, the free CUDA memory under
gpu_memory_utilization, or on CPU what max_num_seqs full-length sequences need, at most 2 GiB) over the bytes of
one block. A parallel run asks every rank with its own device and its own share of the cache
(frontierlm/distributed/executor.py) and keeps the fewest blocks."""
from __future__ import annotations

import torch

CPU_DEFAULT_KV_BYTES = 2 * 2**30


def kv_budget_bytes(config, model_config, device: torch.device, bytes_per_block: int, max_model_len: int) -> float:
    if config.kv_cache_memory_gb is not None:
        return config.kv_cache_memory_gb * 2**30
    if device.type == "cuda":
        free, total = torch.cuda.mem_get_info(device)
        # leave room for activations of the largest step (hidden states + logits, generously)
        reserve = config.max_num_batched_tokens * (model_config.hidden_size * 64 + model_config.vocab_size * 8)
        return total * config.gpu_memory_utilization - (total - free) - reserve
    wanted = config.max_num_seqs * max_model_len * bytes_per_block / config.block_size
    return min(CPU_DEFAULT_KV_BYTES, wanted)


def num_kv_blocks(config, model_config, device: torch.device, bytes_per_block: int, max_model_len: int,
                  where: str = "") -> int:
    budget = kv_budget_bytes(config, model_config, device, bytes_per_block, max_model_len)
    num_blocks = int(budget // bytes_per_block)
    if num_blocks < 1:
        raise ValueError(f"the KV-cache budget{where} ({budget / 2**30:.3f} GiB) holds no block of "
                         f"{bytes_per_block} bytes; raise kv_cache_memory_gb or gpu_memory_utilization")
    return num_blocks


def bytes_per_block(model, block_size: int, dtype: torch.dtype) -> int:
    """What one block costs the model in this process (a parallel rank: its KV heads and its stage's layers)."""
    elem = torch.empty((), dtype=dtype).element_size()
    total = 0
    for shape in model.kv_cache_shapes(1, block_size):
        n = 1
        for d in shape:
            n *= d
        total += n * elem
    return total
