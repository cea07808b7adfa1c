"""The proposer interface, and the n-gram (prompt lookup) proposer.

A proposer runs after a step's tokens are appended and suggests up to k next tokens for each request that is
decoding; the next step scores them (verify.py). Proposers that keep per-request state (the draft model's KV
cache, MTP's cache and waiting hidden states) drop it in `release` for requests that stopped running (finished,
aborted or preempted), and `observe` sees the target's hidden states after each forward."""
from __future__ import annotations

import abc

import numpy as np

from frontierlm.spec.verify import Proposal


class Proposer(abc.ABC):
    name = "base"
    uses_hidden = False  # observe() wants the target's hidden states
    processors = None  # the custom logits processors that drafting rows go through (set by SpecDecoder)

    @abc.abstractmethod
    def propose(self, requests: list, ks: list[int]) -> list[Proposal]:
        """Up to ks[i] proposed tokens for requests[i]."""

    def release(self, live: dict) -> None:
        """Forget requests that are not in `live` (request id -> running request)."""

    def observe(self, sched, hidden, rows: dict) -> None:
        """After a forward: rows[request_id] = (first flat row, number of valid rows, first position)."""

    def expected_cost(self, num_requests: int, k: int) -> float:
        """Seconds one proposal round for `num_requests` requests with up to k tokens is expected to take."""
        return 0.0

    def close(self) -> None:
        pass


def ngram_lookup(tokens: np.ndarray, k: int, n_min: int, n_max: int) -> list[int]:
    """Match the last n tokens (n from n_max down to n_min) against earlier text; propose what followed the most
    recent earlier occurrence (up to k tokens)."""
    total = len(tokens)
    for n in range(min(n_max, total - 1), n_min - 1, -1):
        suffix = tokens[total - n:]
        windows = np.lib.stride_tricks.sliding_window_view(tokens[:total - 1], n)
        hits = np.flatnonzero((windows == suffix).all(axis=1))
        if hits.size:
            start = int(hits[-1]) + n
            return tokens[start:start + k].tolist()
    return []


class NgramIndex:
    """Incremental prompt lookup for one request: for each n, a dict from n-gram to the end of its most recent
    occurrence that has a token after it. A token appended adds one n-gram per n, so a lookup costs a few dict
    probes instead of a scan of the whole text; it returns what `ngram_lookup` returns (the most recent earlier
    match of the longest suffix that has one)."""

    __slots__ = ("n_min", "n_max", "last", "indexed")

    def __init__(self, n_min: int, n_max: int):
        self.n_min, self.n_max = n_min, n_max
        self.last: dict[int, dict[tuple, int]] = {n: {} for n in range(n_min, n_max + 1)}
        self.indexed = 0  # every n-gram that ends (exclusive) at or before this position is in `last`

    def lookup(self, tokens: list[int], k: int) -> list[int]:
        total = len(tokens)
        if total < self.indexed:  # the text was wound back (never in the engine): start over
            self.__init__(self.n_min, self.n_max)
        # a match must be followed by a token: index the n-grams that end before the last token
        for end in range(self.indexed + 1, total):
            for n, table in self.last.items():
                if n <= end:
                    table[tuple(tokens[end - n:end])] = end
        self.indexed = max(self.indexed, total - 1)
        for n in range(min(self.n_max, total - 1), self.n_min - 1, -1):
            start = self.last[n].get(tuple(tokens[total - n:]))
            if start is not None:
                return tokens[start:start + k]
        return []


class NgramProposer(Proposer):
    name = "ngram"

    def __init__(self, prompt_lookup_min: int, prompt_lookup_max: int):
        self.n_min, self.n_max = prompt_lookup_min, prompt_lookup_max
        self.index: dict[str, NgramIndex] = {}

    def release(self, live: dict) -> None:
        for rid in [r for r in self.index if r not in live]:
            del self.index[rid]

    def propose(self, requests, ks):
        out = []
        for r, k in zip(requests, ks):
            if not k:
                out.append(Proposal([]))
                continue
            idx = self.index.get(r.request_id)
            if idx is None:
                idx = self.index[r.request_id] = NgramIndex(self.n_min, self.n_max)
            out.append(Proposal(idx.lookup(r.all_token_ids, k)))
        return out
