"""SamplingParams.prompt_logprobs: the log-probability of every prompt token after the first, plus the top-N
alternatives, from the logits the prefill computes anyway (the raw model distribution: no bias, penalties or
temperature, as in vLLM). Works chunk by chunk under chunked prefill; requests that ask skip the prefix cache
(engine/kv_cache.py), since cached positions have no logits."""
from __future__ import annotations

import torch

# (token ids, log-probs, rank of the prompt token): ids[0] / lps[0] are the prompt token itself, then the top N
Entry = tuple[list[int], list[float], int]


def compute_prompt_logprobs(model, hidden: torch.Tensor, scheduled) -> dict[str, list[Entry]]:
    """Entries for the prompt positions this step computed, per request id (only requests that ask). Position
    p's logits score prompt token p + 1; positions already scored before a preemption are skipped."""
    out: dict[str, list[Entry]] = {}
    offset = 0
    for s in scheduled:
        req, q = s.request, s.num_new_tokens
        n = req.sampling_params.prompt_logprobs
        start = req.num_computed_tokens
        if n is not None:
            first = max(start, len(req.prompt_logprobs))  # positions 0 .. len-1 are already scored
            last = min(start + q, req.num_prompt_tokens - 1)
            if first < last:
                rows = hidden[offset + first - start:offset + last - start]
                out[req.request_id] = _entries(model.compute_logits(rows), req.all_token_ids[first + 1:last + 1], n)
        offset += q
    return out


def _entries(logits: torch.Tensor, targets: list[int], n: int) -> list[Entry]:
    logp = torch.log_softmax(logits.float(), dim=-1)
    tgt = torch.tensor(targets, dtype=torch.int64, device=logp.device).unsqueeze(1)
    tok_lp = logp.gather(1, tgt)
    ranks = ((logp > tok_lp).sum(dim=-1) + 1).tolist()
    ids, lps = tgt, tok_lp
    if n > 0:
        top_lp, top_ids = logp.topk(min(n, logp.shape[1]), dim=-1)
        ids, lps = torch.cat([tgt, top_ids], dim=1), torch.cat([tok_lp, top_lp], dim=1)
    return list(zip(ids.tolist(), lps.tolist(), ranks))
