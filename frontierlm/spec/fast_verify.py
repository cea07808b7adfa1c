"""Verification steps through the target's static-shape decode path (engine/fast_decode.py).

A step in which every scheduled request is decoding, with or without proposals, is a batch of one-token
decodes: a request with K proposals is K + 1 rows over its own blocks (row j at position c + j attends to the
positions up to its own; every row's K/V is written before any attends), exactly what the eager step computes.
So it can run compiled like a plain decode step. This instance keeps its own ladder (rows, not requests), its
own compiled graphs and warm-up count, and returns the hidden states beside the logits (the MTP proposer needs
them): the compiled forward hands back [rows, vocab + hidden] in one tensor, as FastDecode's run slices one.
The rows are written into the persistent buffers with whole-array writes (VerifyInputs), not one object per
row; `decode_rows` (an object per row, FastDecode's generic fill) serves the draft model's rows."""
from __future__ import annotations

import itertools

import numpy as np
import torch

from frontierlm.engine.fast_decode import DecodeInputs, DecodeMeta, FastDecode, rung
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


class _Batch:
    """One verification step as FastVerify fills it: per request its first position, row count (1 + K) and
    block table; the rows' tokens (last token, then the proposals) flat."""
    __slots__ = ("starts", "counts", "tokens", "tables")

    def __init__(self, starts: list[int], counts: list[int], tokens: list[int], tables: list[list[int]]):
        self.starts, self.counts, self.tokens, self.tables = starts, counts, tokens, tables


class VerifyInputs(DecodeInputs):
    """The decode buffers, filled with K + 1 rows per request by whole-array writes (no object per row)."""

    def fill(self, rows, batch: int, width: int) -> None:
        if not isinstance(rows, _Batch):  # precompile's empty schedule
            return super().fill(rows, batch, width)
        h, bs, n = self._np, self.block_size, len(rows.tokens)
        counts = np.asarray(rows.counts, dtype=np.int64)
        first = np.cumsum(counts) - counts  # each request's first row
        pos = np.repeat(np.asarray(rows.starts, dtype=np.int64) - first, counts) + np.arange(n)
        h["input_ids"][:n] = rows.tokens
        h["positions"][:n] = pos
        h["seq_lens"][:n] = pos + 1
        h["real_rows"][:n] = 1
        tables = h["block_tables"][:batch * width].reshape(batch, width)
        tables[n:] = self.scratch_block
        if len(counts) == 1:  # batch 1: every row reads the one table
            table = rows.tables[0]
            tables[:n, :len(table)] = table
            tables[:n, len(table):] = self.scratch_block
        else:
            per_req = np.full((len(counts), width), self.scratch_block, dtype=np.int64)
            lens = np.fromiter((len(t) for t in rows.tables), dtype=np.int64, count=len(counts))
            per_req[np.arange(width)[None, :] < lens[:, None]] = np.fromiter(
                itertools.chain.from_iterable(rows.tables), dtype=np.int64, count=int(lens.sum()))
            tables[:n] = np.repeat(per_req, counts, axis=0)
        h["slot_mapping"][:n] = tables[np.arange(n), pos // bs] * bs + pos % bs
        h["input_ids"][n:batch] = 0  # padding rows: token 0 at position 0 on the scratch block's first slot
        h["positions"][n:batch] = 0
        h["seq_lens"][n:batch] = 1
        h["real_rows"][n:batch] = 0
        h["slot_mapping"][n:batch] = self.scratch_block * bs
        if self.dev is not self.host:
            for k, host in self.host.items():
                count = batch * width if k == "block_tables" else batch
                self.dev[k][:count].copy_(host[:count], non_blocking=self.non_blocking)


# CPU: verification steps of up to this many rows get a graph specialised on the row count (symbolic block-table
# width only), like the plain step's batch-1 graph; larger ones share the symbolic-batch graph. 0 turns it off.
STATIC_ROWS = 0


class FastVerify(FastDecode):
    def __init__(self, model, device, max_rows: int, max_model_len: int, block_size: int, scratch_block: int):
        super().__init__(model, device, max_rows, max_model_len, block_size, scratch_block)
        self.inputs = VerifyInputs(max_rows, -(-max_model_len // block_size), scratch_block, block_size, device)
        self.static_rows = STATIC_ROWS
        # (CPU: the K + 1 rows run unpadded, fast_decode.CPU_EXACT_BATCH; they rarely land on a rung, and
        # padding batch 1's 5 rows at K = 4 to 8 made the graph 1.4x slower)

    def _run_compiled(self, args: tuple, first: bool) -> torch.Tensor:
        import frontierlm.engine.fast_decode as fd

        if not first or args[0].shape[0] > self.static_rows or not fd.CPU_DYNAMIC_SHAPES:
            return super()._run_compiled(args, first)
        self._ensure_compiled()
        for t in args:
            torch._dynamo.mark_static(t, 0)
        torch._dynamo.maybe_mark_dynamic(args[3], 1)
        with torch._inductor.config.patch(fd.CPU_INDUCTOR_OPTIONS):
            return self._compiled(*args)

    def _forward(self, input_ids, positions, slot_mapping, block_tables, seq_lens, real_rows):
        plan = PagedDecodePlan(slot_mapping, block_tables, seq_lens, self.block_size, real_rows)
        hidden = self.model.model(input_ids, positions, DecodeMeta(self.max_model_len, seq_lens), plan)
        logits = self.model.compute_logits(hidden)
        return torch.cat([logits, hidden.to(logits.dtype)], dim=1)

    def step(self, sched) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None] | None:
        """(hidden [rows, H], logits of the requests without proposals, logits of the K + 1 rows of each
        request with proposals), rows in the eager step's order; None when the step is not all decodes, does
        not fit the ladders, or the path is still warming up."""
        if self.disabled:
            return None
        starts, counts, tokens, tables = [], [], [], []
        for s in sched.scheduled:
            r, k = s.request, len(s.spec_token_ids)
            if r.num_computed_tokens != r.num_tokens - 1 or s.num_new_tokens != 1 + k:
                return None
            starts.append(r.num_computed_tokens)
            counts.append(1 + k)
            tokens.append(r.all_token_ids[-1])
            tokens += s.spec_token_ids
            tables.append(s.block_ids)
        n = len(tokens)
        batch, width = rung(self.batch_sizes, n), rung(self.widths, max(len(t) for t in tables))
        if batch is None or width is None:
            return None
        self.decode_steps += 1
        if self.decode_steps <= self.warmup_steps:
            return None
        out = self._step((batch, width), _Batch(starts, counts, tokens, tables))
        if out is None:
            return None
        self.fast_steps += 1
        out = out[:n]
        vocab = out.shape[1] - self.model.config.hidden_size
        logits, hidden = out[:, :vocab], out[:, vocab:].to(self.model.lm_head.weight.dtype)
        plain = [i for i, c in enumerate(counts) if c == 1]
        if not plain:  # every request verifies: its rows are the whole batch, in order (no copy)
            return hidden, None, logits
        if len(plain) == len(counts):
            return hidden, logits, None
        first = np.cumsum(counts) - np.asarray(counts)
        is_verify = np.repeat(np.asarray(counts) > 1, counts)
        pick = lambda index: logits.index_select(0, torch.from_numpy(index).to(out.device))  # noqa: E731
        return hidden, pick(first[plain]), pick(np.flatnonzero(is_verify))
