"""Lossless verification of proposals, and drawing proposals from a draft's logits.

Both run every stage of the engine's sampler (bias, bans, penalties, temperature, top-k / top-p / min-p /
typical-p) on each row, with the row's view of the request: row j of a request with proposals s_1..s_K sees
s_1..s_j as already generated, so penalties, bad words and min_tokens count exactly the tokens that will precede
it if it is used. Greedy rows accept a proposal iff it is the argmax. Sampled rows use rejection sampling
(Leviathan et al. 2023; Chen et al. 2023): accept s_j with probability min(1, p_j(s_j) / q_j(s_j)), otherwise
draw from the normalised max(p_j - q_j, 0) and stop; when every proposal is accepted, draw one more token from
p_{K+1}. q is the draft's processed distribution, or one-hot for deterministic proposers (n-gram). The output
tokens are distributed exactly as the target's.

Custom logits processors (layers/logits_processor.py) run on every row with that same view: each row is
presented to them as its own request whose output_token_ids are the request's output plus the proposals
before the row. Log-probs of the tokens a request keeps follow the sampler's convention: the log-softmax of
the row's processed logits (the target distribution after every stage), the token, then the top N.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import NamedTuple, Sequence

import numpy as np
import torch

from frontierlm.layers.sampler import Sampler, _modifies_logits


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


class Verified(NamedTuple):
    accepted: list[int]  # the proposals kept
    token: int  # the target's token after them
    logprobs: list | None  # (ids, logprobs, rank) per kept token (accepted, then `token`); None if not asked


def draw(sampler: Sampler, logits: torch.Tensor, states: Sequence, eos_token_ids,
         processors=None) -> tuple[list[int], torch.Tensor]:
    """One proposal per row from a draft's logits: argmax for greedy requests, a sample from the processed
    draft distribution q otherwise. Returns the tokens (host) and q [rows, V] (None when every row is greedy:
    greedy verification never reads it)."""
    x = sampler.processed_logits(logits, states, eos_token_ids, processors)
    greedy = [s.sampling_params.greedy for s in states]
    if all(greedy):
        return x.argmax(dim=-1).tolist(), None
    q = torch.softmax(x, dim=-1)
    fallback = sampler._generator(x.device)
    tokens = _race(q, [s.generator for s in states], fallback)
    if any(greedy):
        idx = torch.tensor([i for i, g in enumerate(greedy) if g], device=x.device)
        tokens[idx] = x[idx].argmax(dim=-1)
    return tokens.tolist(), q


def verify(sampler: Sampler, logits: torch.Tensor, requests: Sequence, proposals: Sequence[Proposal],
           eos_token_ids, processors=None) -> list[Verified]:
    """logits: [sum(K_i + 1), V] target rows, request by request (row j scores proposal j + 1; the last row
    follows the last proposal). processors: the LogitsProcessors instance that sees verification rows."""
    if processors is None and all(_plain_greedy(r, eos_token_ids) for r in requests):
        # no sampler stage can move an argmax: skip the per-row views and the processed copy of the logits
        counts, nxt = accept_greedy(logits.argmax(dim=-1), [p.tokens for p in proposals])
        return [Verified(p.tokens[:a], t, None) for p, a, t in zip(proposals, counts, nxt)]
    states, starts = [], []
    for req, prop in zip(requests, proposals):
        starts.append(len(states))
        states += row_states(req, prop.tokens)
    x = sampler.processed_logits(logits, states, eos_token_ids, processors)
    argmax = x.argmax(dim=-1)
    greedy = [r.sampling_params.greedy for r in requests]
    if all(greedy):
        counts, nxt = accept_greedy(argmax, [p.tokens for p in proposals])
        kept = [(p.tokens[:a], t) for p, a, t in zip(proposals, counts, nxt)]
    else:
        kept = _rejection_sample(sampler, x, argmax, requests, proposals, starts, greedy)
    lps = _logprobs(x, requests, starts, kept)
    return [Verified(acc, tok, lp) for (acc, tok), lp in zip(kept, lps)]


def _plain_greedy(request, eos_token_ids) -> bool:
    """Greedy, no logprobs, and no stage that edits logits (bias, bans, bad words, penalties, allowed ids,
    min_tokens): then every verification row's argmax is the raw logits' argmax. min_tokens only counts down,
    so when it is off for the request it is off for every later row too."""
    return (request.sampling_params.greedy and request.sampling_params.logprobs is None
            and not _modifies_logits(request, eos_token_ids))


def accept_greedy(argmax: torch.Tensor, proposals: Sequence[Sequence[int]]) -> tuple[list[int], list[int]]:
    """Greedy acceptance, vectorised: argmax [sum(K_i + 1)] over each request's K_i + 1 rows, in order. Request i
    keeps the longest prefix of its proposals that equals the argmax of the rows before each one, then the
    argmax after that prefix. One host copy (the argmax), then a few numpy operations whatever the batch:
    at batch 1 a dozen small torch ops cost more than the loop they replace, numpy's do not."""
    am = argmax.cpu().numpy()
    ks = np.fromiter(map(len, proposals), dtype=np.int64, count=len(proposals))
    starts = np.cumsum(ks + 1) - (ks + 1)
    width = int(ks.max())
    if width == 0:
        return [0] * len(ks), am[starts].tolist()
    cols = np.arange(width)
    padded = np.full((len(ks), width), -1, dtype=am.dtype)  # a padding slot never matches: the run stops there
    padded[cols[None, :] < ks[:, None]] = list(itertools.chain.from_iterable(proposals))
    rows = np.minimum(starts[:, None] + cols, am.size - 1)
    counts = np.cumprod(am[rows] == padded, axis=1).sum(axis=1)
    return counts.tolist(), am[starts + counts].tolist()


def leading_accepted(accept: torch.Tensor, ks: Sequence[int]) -> torch.Tensor:
    """accept: [sum(K_i)] bool, request by request -> [requests] the length of each request's leading run of
    accepted proposals (rejection sampling stops at the first rejection)."""
    width, device = max(ks), accept.device
    offsets = torch.tensor(list(itertools.accumulate(ks, initial=0))[:-1], dtype=torch.long).to(device)
    cols = torch.arange(width, device=device)
    idx = (offsets[:, None] + cols).clamp_max_(max(accept.numel() - 1, 0))
    valid = cols < torch.tensor(ks, device=device)[:, None]
    return (accept[idx] & valid).cumprod(dim=1).sum(dim=1)


def _logprobs(x: torch.Tensor, requests: Sequence, starts: list[int], kept: list) -> list:
    """Entries for the kept tokens of the requests that ask for logprobs, as the sampler makes them."""
    asks = [i for i, r in enumerate(requests) if r.sampling_params.logprobs is not None]
    out: list = [None] * len(requests)
    if not asks:
        return out
    rows, tokens = [], []
    for i in asks:
        acc, tok = kept[i]
        rows += range(starts[i], starts[i] + len(acc) + 1)
        tokens += acc + [tok]
    device = x.device
    logp = torch.log_softmax(x[torch.tensor(rows, device=device)], dim=-1)
    tok_t = torch.tensor(tokens, dtype=torch.long, device=device).unsqueeze(1)
    tok_lp = logp.gather(1, tok_t)
    ranks = ((logp > tok_lp).sum(dim=-1) + 1).tolist()
    n_max = max(requests[i].sampling_params.logprobs for i in asks)
    top_lp, top_ids = logp.topk(min(n_max, logp.shape[1]), dim=-1)
    ids = torch.cat([tok_t, top_ids], dim=1).tolist()
    lps = torch.cat([tok_lp, top_lp], dim=1).tolist()
    row = 0
    for i in asks:
        n, count = requests[i].sampling_params.logprobs, len(kept[i][0]) + 1
        out[i] = [(ids[r][:n + 1], lps[r][:n + 1], ranks[r]) for r in range(row, row + count)]
        row += count
    return out


def _rejection_sample(sampler: Sampler, x: torch.Tensor, argmax: torch.Tensor, requests: Sequence,
                      proposals: Sequence[Proposal], starts: list[int], greedy: list[bool]) -> list:
    device = x.device

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
    accept = torch.where(greedy_rows, greedy_accept, sampled_accept)
    counts = leading_accepted(accept, [len(p.tokens) for p in proposals]).tolist()  # host sync 1
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
