"""Attention metadata for the proposers' own paged caches (the draft model's, the MTP module's): one ragged
forward over several sequences, each writing `n` new rows after its first `first` cached rows."""
from __future__ import annotations

import torch

from frontierlm.layers.attention import AttentionMetadata
from frontierlm.spec.proposer import Proposer


class PagedProposer(Proposer):
    """A proposer with a paged cache of its own (`self.kv`), one sequence per request in `self.seqs`, and a
    measured cost per forward (`self.cost`): what the draft model and the MTP module share."""

    def expected_cost(self, num_requests: int, k: int) -> float:
        return k * self.cost.predict(num_requests)

    def release(self, live: dict) -> None:
        for rid in [r for r in self.seqs if r not in live]:
            self._drop(rid)

    def _drop(self, rid: str) -> None:
        self.kv.free(self.seqs.pop(rid))


def paged_metadata(chunks: list[tuple[list[int], int, int]], block_size: int, device) -> AttentionMetadata:
    """chunks: (block table, cache row of the first new token, new tokens) per sequence. Row i of a sequence
    sits in slot table[i // block_size] * block_size + i % block_size; each new token attends to every row
    up to its own."""
    slots, qlens, slens = [], [], []
    for table, first, n in chunks:
        rows = range(first, first + n)
        slots += [table[i // block_size] * block_size + i % block_size for i in rows]
        qlens.append(n)
        slens.append(first + n)
    width = max(len(t) for t, _, _ in chunks)
    block_tables = torch.tensor([t + [0] * (width - len(t)) for t, _, _ in chunks], dtype=torch.int32)
    qsl = torch.zeros(len(chunks) + 1, dtype=torch.int32)
    qsl[1:] = torch.tensor(qlens).cumsum(0)
    return AttentionMetadata(
        slot_mapping=torch.tensor(slots, dtype=torch.long).to(device), query_start_loc=qsl.to(device),
        seq_lens=torch.tensor(slens, dtype=torch.int32).to(device), block_tables=block_tables.to(device),
        query_lens_cpu=qlens, seq_lens_cpu=slens, max_query_len=max(qlens), max_seq_len=max(slens),
        block_size=block_size)


def last_rows(meta: AttentionMetadata) -> torch.Tensor:
    """Flat index of each sequence's last new token."""
    return (meta.query_start_loc[1:] - 1).long()
