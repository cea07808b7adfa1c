"""Start-up measurement for the adaptive draft length's cost model: a few forwards of decode batches of
different sizes, timed. They write into block 0 of the model's (or the MTP proposer's) cache, which nothing
uses yet (no request has run, the prefix cache is empty), and their outputs are thrown away."""
from __future__ import annotations

import torch

from frontierlm.layers.attention import AttentionMetadata
from frontierlm.spec.adaptive import cost_clock


@torch.inference_mode()
def profile_decode(model, device, block_size: int, sizes, reps: int = 2) -> list[tuple[int, float]]:
    """[(tokens, seconds)] of model forward + logits for `tokens` one-token decodes with a block of context."""
    out, clock = [], cost_clock(device)
    for n in sizes:
        meta = AttentionMetadata(
            slot_mapping=(torch.arange(n) % block_size).to(device),
            query_start_loc=torch.arange(n + 1, dtype=torch.int32).to(device),
            seq_lens=torch.full((n,), block_size, dtype=torch.int32).to(device),
            block_tables=torch.zeros(n, 1, dtype=torch.int32).to(device),
            query_lens_cpu=[1] * n, seq_lens_cpu=[block_size] * n, max_query_len=1, max_seq_len=block_size,
            block_size=block_size)
        ids = torch.zeros(n, dtype=torch.long, device=device)
        pos = torch.full((n,), block_size - 1, dtype=torch.long, device=device)
        for r in range(reps + 1):
            t0 = clock()
            model.compute_logits(model(ids, pos, meta)).float().sum().item()
            if r:  # the first is a warm-up
                out.append((n, clock() - t0))
    return out


@torch.inference_mode()
def profile_mtp(proposer, sizes, reps: int = 2) -> list[tuple[int, float]]:
    """[(requests, seconds)] of one chained MTP step (one row each, a block of context in the proposer's
    own cache, block 0, which no request holds yet) + its logits."""
    from frontierlm.spec.paged import paged_metadata

    out, clock = [], cost_clock(proposer.device)
    model, bs, dev = proposer.model, proposer.block_size, proposer.device
    h = model.config.hidden_size
    for n in sizes:
        meta = paged_metadata([([0], bs - 1, 1)] * n, bs, dev)
        ids = torch.zeros(n, dtype=torch.long, device=dev)
        pos = torch.full((n,), bs - 1, dtype=torch.long, device=dev)
        prev = torch.zeros(n, h, dtype=model.lm_head.weight.dtype, device=dev)
        for r in range(reps + 1):
            t0 = clock()
            head, _ = model.mtp_forward(ids, pos, prev, 0, return_next_hidden=True, attn_meta=meta)
            model.mtp_logits(head).float().sum().item()
            if r:
                out.append((n, clock() - t0))
    return out
