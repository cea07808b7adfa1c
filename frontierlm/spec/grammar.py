"""Grammar masks for verification rows. Row j of a request is masked with the matcher's state after proposals
s_1..s_j: the matcher accepts them one by one, fills each row, then rolls back (xgrammar's
GrammarMatcher.rollback), so the matcher only ever advances by tokens the scheduler appends. A proposal the
grammar refuses has target probability 0 there, so it is rejected; the rows after it are never used and keep an
all-allowed mask."""
from __future__ import annotations

import torch


def fill_spec_bitmask(matchers: list, proposals: list[list[int]], vocab_size: int) -> torch.Tensor | None:
    """[sum(K_i + 1), ceil(V / 32)] bitmask, or None when no request has a grammar."""
    import xgrammar as xgr

    if all(m is None for m in matchers):
        return None
    bitmask = xgr.allocate_token_bitmask(sum(len(p) + 1 for p in proposals), vocab_size)
    row = 0
    for m, tokens in zip(matchers, proposals):
        if m is None:
            row += len(tokens) + 1
            continue
        advanced = 0
        for j in range(len(tokens) + 1):
            if m.is_terminated():  # the grammar ended at an accepted stop token: the request stops there
                break
            m.fill_next_token_bitmask(bitmask, row + j)
            if j == len(tokens) or not m.accept_token(tokens[j]):
                break
            advanced += 1
        if advanced:
            m.rollback(advanced)
        row += len(tokens) + 1
    return bitmask


def grammar_rows(matchers: list, proposals: list[list[int]]) -> list[int]:
    rows, row = [], 0
    for m, tokens in zip(matchers, proposals):
        if m is not None:
            rows += range(row, row + len(tokens) + 1)
        row += len(tokens) + 1
    return rows


def apply_spec_bitmask(logits: torch.Tensor, bitmask: torch.Tensor, matchers: list, proposals: list[list[int]]):
    import xgrammar as xgr

    xgr.apply_token_bitmask_inplace(logits, bitmask.to(logits.device, non_blocking=True),
                                    indices=grammar_rows(matchers, proposals))
