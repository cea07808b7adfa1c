"""Lossless verification of proposals, and drawing proposals from a draft's logits.

Both run every stage of the engine's sampler (bias, bans, penalties, temperature, top-k / top-p / min-p /
typical-p) on each row, with the row's view of the request: row j of a request with proposals s_1..s_K sees
s_1..s_j as already generated, so penalties, bad words and min_tokens count exactly the tokens that will precede
it if it is used. Greedy rows accept a proposal iff it is the argmax. Sampled rows use rejection sampling
(Leviathan et al. 2023; Chen et al. 2023): accept s_j with probability min(1, p_j(s_j) / q_j(s_j)), otherwise
draw from the normalised max(p_j - q_j, 0) and stop; when every proposal is accepted, draw one more token from
p_{K+1}. q is the draft's processed distribution, or one-hot for deterministic proposers (n-gram). The output
tokens are distributed exactly as the target's.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from frontierlm.layers.sampler import Sampler


class RowState:
    """A request as one verification row sees it: its output extended by the proposals before the row.
    Anything else a sampler stage reads comes from the request itself."""

    __slots__ = ("_request", "output_token_ids")

    def __init__(self, request, extra: Sequence[int]):
        self._request = request
        self.output_token_ids = list(request.output_token_ids) + list(extra) if extra else request.output_token_ids

    def __getattr__(self, name):
        return getattr(self._request, name)


@dataclass
class Proposal:
    tokens: list[int]
    q: torch.Tensor | None = None  # [len(tokens), V] draft probabilities the tokens were drawn from; None = one-hot


def row_states(request, tokens: Sequence[int]) -> list[RowState]:
    return [RowState(request, tokens[:j]) for j in range(len(tokens) + 1)]


def _uniform(n: int, generator, fallback, device) -> torch.Tensor:
    return torch.rand(n, generator=generator or fallback, device=device)


def _race(weights: torch.Tensor, generators: list, fallback: torch.Generator) -> torch.Tensor:
    """Sample one index per row with probability proportional to `weights` (unnormalised): argmax(w / E)."""
    e = torch.empty_like(weights)
    for i, g in enumerate(generators):
        e[i].exponential_(generator=g or fallback)
    return weights.div(e.clamp_min_(1e-30)).argmax(dim=-1)


def draw(sampler: Sampler, logits: torch.Tensor, states: Sequence, eos_token_ids) -> tuple[list[int], torch.Tensor]:
    """One proposal per row from a draft's logits: argmax for greedy requests, a sample from the processed
    draft distribution q otherwise. Returns the tokens (host) and q [rows, V]."""
    x = sampler.processed_logits(logits, states, eos_token_ids)
    q = torch.softmax(x, dim=-1)
    greedy = [s.sampling_params.greedy for s in states]
    if all(greedy):
        return x.argmax(dim=-1).tolist(), q
    fallback = sampler._generator(x.device)
    tokens = _race(q, [s.generator for s in states], fallback)
    if any(greedy):
        idx = torch.tensor([i for i, g in enumerate(greedy) if g], device=x.device)
        tokens[idx] = x[idx].argmax(dim=-1)
    return tokens.tolist(), q


def verify(sampler: Sampler, logits: torch.Tensor, requests: Sequence, proposals: Sequence[Proposal],
           eos_token_ids) -> list[tuple[list[int], int]]:
    """logits: [sum(K_i + 1), V] target rows, request by request (row j scores proposal j + 1; the last row
    follows the last proposal). Returns (accepted proposals, next token) per request."""
    states, starts = [], []
    for req, prop in zip(requests, proposals):
        starts.append(len(states))
        states += row_states(req, prop.tokens)
    x = sampler.processed_logits(logits, states, eos_token_ids)
    device = x.device
    argmax = x.argmax(dim=-1)
    greedy = [r.sampling_params.greedy for r in requests]
    if all(greedy):
        am = argmax.tolist()
        out = []
        for req, prop, st in zip(requests, proposals, starts):
            a = 0
            while a < len(prop.tokens) and am[st + a] == prop.tokens[a]:
                a += 1
            out.append((prop.tokens[:a], am[st + a]))
        return out

    probs = torch.softmax(x, dim=-1)
    fallback = sampler._generator(device)
    # accept[row]: proposal of the row survives (greedy rows: it is the argmax)
    prop_rows, prop_ids, q_tok = [], [], []
    for req, prop, st in zip(requests, proposals, starts):
        prop_rows += range(st, st + len(prop.tokens))
        prop_ids += prop.tokens
    rows_t = torch.tensor(prop_rows, dtype=torch.long, device=device)
    ids_t = torch.tensor(prop_ids, dtype=torch.long, device=device)
    p_tok = probs[rows_t, ids_t]
    q_parts, u_parts = [], []
    for req, prop in zip(requests, proposals):
        k = len(prop.tokens)
        if prop.q is None:
            q_parts.append(torch.ones(k, device=device))
        else:
            q_parts.append(prop.q[torch.arange(k, device=device), torch.tensor(prop.tokens, device=device)])
        u_parts.append(_uniform(k, None if req.sampling_params.greedy else req.generator, fallback, device))
    q_tok, u = torch.cat(q_parts), torch.cat(u_parts)
    sampled_accept = u * q_tok < p_tok
    greedy_accept = argmax[rows_t] == ids_t
    greedy_rows = torch.tensor([g for g, prop in zip(greedy, proposals) for _ in prop.tokens], device=device)
    accept = torch.where(greedy_rows, greedy_accept, sampled_accept).tolist()  # host sync 1

    counts, pos = [], 0
    for prop in proposals:
        a = 0
        while a < len(prop.tokens) and accept[pos + a]:
            a += 1
        counts.append(a)
        pos += len(prop.tokens)
    # the next token: residual max(p - q, 0) at the first rejection, p after full acceptance
    final_rows = torch.tensor([st + a for st, a in zip(starts, counts)], dtype=torch.long, device=device)
    weights = probs[final_rows].clone()
    for i, (prop, a) in enumerate(zip(proposals, counts)):
        if a < len(prop.tokens) and not greedy[i]:
            if prop.q is None:
                weights[i, prop.tokens[a]] = 0.0
            else:
                weights[i] = (weights[i] - prop.q[a].to(weights.dtype)).clamp_min_(0.0)
    empty = weights.sum(dim=-1, keepdim=True) <= 0  # p == q up to rounding: fall back to p
    weights = torch.where(empty, probs[final_rows], weights)
    gens = [None if g else r.generator for g, r in zip(greedy, requests)]
    nxt = _race(weights, gens, fallback)
    if any(greedy):
        gi = torch.tensor([i for i, g in enumerate(greedy) if g], device=device)
        nxt[gi] = argmax[final_rows[gi]]
    nxt = nxt.tolist()  # host sync 2
    return [(prop.tokens[:a], t) for prop, a, t in zip(proposals, counts, nxt)]
