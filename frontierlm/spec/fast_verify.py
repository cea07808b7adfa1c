"""Verification steps through the target's static-shape decode path (engine/fast_decode.py).

A step in which every scheduled request is decoding, with or without proposals, is a batch of one-token
decodes: a request with K proposals is K + 1 rows over its own blocks (row j at position c + j attends to the
positions up to its own; every row's K/V is written before any attends), exactly what the eager step computes.
So it can run compiled like a plain decode step. This instance keeps its own ladder (rows, not requests), its
own compiled graphs and warm-up count, and returns the hidden states beside the logits (the MTP proposer needs
them): the compiled forward hands back [rows, vocab + hidden] in one tensor, as FastDecode's run slices one."""
from __future__ import annotations

import torch

from frontierlm.engine.fast_decode import DecodeMeta, FastDecode
from frontierlm.layers.paged_decode import PagedDecodePlan


class _Request:
    __slots__ = ("num_computed_tokens", "all_token_ids")

    def __init__(self, position: int, token: int):
        self.num_computed_tokens, self.all_token_ids = position, (token,)


class _Row:
    """One verification row as FastDecode reads a scheduled request: one new token at `position`."""
    __slots__ = ("request", "block_ids")
    num_new_tokens, samples = 1, True

    def __init__(self, position: int, token: int, block_ids: list[int]):
        self.request, self.block_ids = _Request(position, token), block_ids


class _Rows:
    __slots__ = ("scheduled",)

    def __init__(self, rows: list[_Row]):
        self.scheduled = rows


def decode_rows(chunks) -> _Rows:
    """(first position, tokens, block table) per sequence -> one decode row per token, for FastDecode.run."""
    return _Rows([_Row(start + j, t, table) for start, tokens, table in chunks for j, t in enumerate(tokens)])


class FastVerify(FastDecode):
    def _forward(self, input_ids, positions, slot_mapping, block_tables, seq_lens, real_rows):
        plan = PagedDecodePlan(slot_mapping, block_tables, seq_lens, self.block_size, real_rows)
        hidden = self.model.model(input_ids, positions, DecodeMeta(self.max_model_len, seq_lens), plan)
        logits = self.model.compute_logits(hidden)
        return torch.cat([logits, hidden.to(logits.dtype)], dim=1)

    def step(self, sched) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None] | None:
        """(hidden [rows, H], logits of the requests without proposals, logits of the K + 1 rows of each
        request with proposals), rows in the eager step's order; None when the step is not all decodes, does
        not fit the ladders, or the path is still warming up."""
        chunks, plain, verify, n = [], [], [], 0
        for s in sched.scheduled:
            r = s.request
            if r.num_computed_tokens != r.num_tokens - 1 or s.num_new_tokens != 1 + len(s.spec_token_ids):
                return None
            chunks.append((r.num_computed_tokens, [r.all_token_ids[-1]] + s.spec_token_ids, s.block_ids))
            if s.spec_token_ids:
                verify += range(n, n + 1 + len(s.spec_token_ids))
            else:
                plain.append(n)
            n += 1 + len(s.spec_token_ids)
        out = self.run(decode_rows(chunks))
        if out is None:
            return None
        vocab = out.shape[1] - self.model.config.hidden_size
        logits, hidden = out[:, :vocab], out[:, vocab:].to(self.model.lm_head.weight.dtype)

        def pick(index):
            return logits.index_select(0, torch.tensor(index, device=out.device)) if index else None

        return hidden, pick(plain), pick(verify)
