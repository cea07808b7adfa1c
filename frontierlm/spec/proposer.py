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


class NgramProposer(Proposer):
    name = "ngram"

    def __init__(self, prompt_lookup_min: int, prompt_lookup_max: int):
        self.n_min, self.n_max = prompt_lookup_min, prompt_lookup_max

    def propose(self, requests, ks):
        return [Proposal(ngram_lookup(np.asarray(r.all_token_ids), k, self.n_min, self.n_max) if k else [])
                for r, k in zip(requests, ks)]
