"""The MTP module's rows through a static-shape step compiled once per ladder shape, like the target's decode
fast path (engine/fast_decode.py, whose ladders, warm-up rule and in-place paged attention it reuses).

Every row the proposer runs is a one-token decode over the request's MTP cache: a catch-up round of a + 1
rows writes all of them before any attends (one index_put), and each row attends to the cache rows up to its
own, which is what the ragged eager forward computes. Rows are padded up to the ladder with rows that write
and read a scratch block the proposer's pool never hands out. On CPU the step is compiled with torch.compile
(after the same warm-up of eager rounds as the target's fast path, so tests and one-off prompts never pay for
a compile); elsewhere the proposer stays eager. Rounds with more rows than the top rung stay eager too."""
from __future__ import annotations

import numpy as np
import torch

from frontierlm.engine import fast_decode as fd
from frontierlm.layers.paged_decode import PagedDecodePlan
from frontierlm.logger import init_logger

logger = init_logger(__name__)

_LONG = ("input_ids", "positions", "slot_mapping", "block_tables", "seq_lens", "real_rows")


def mtp_decode_step(model, max_model_len: int, block_size: int, input_ids, positions, previous, slot_mapping,
                    block_tables, seq_lens, real_rows):
    """Static-shape MTP rows -> (logits [B, V], next-depth hidden [B, H])."""
    plan = PagedDecodePlan(slot_mapping, block_tables, seq_lens, block_size, real_rows)
    head, nxt = model.mtp_forward(input_ids, positions, previous, 0, return_next_hidden=True,
                                  attn_meta=fd.DecodeMeta(max_model_len, seq_lens), plan=plan)
    return model.mtp_logits(head), nxt


class FastMTP:
    def __init__(self, model, device: torch.device, max_rows: int, max_model_len: int, block_size: int,
                 scratch_block: int):
        self.model, self.device = model, device
        self.max_model_len, self.block_size, self.scratch_block = max_model_len, block_size, scratch_block
        max_blocks = -(-max_model_len // block_size)
        self.ladder = fd.batch_ladder(min(max_rows, fd.MAX_FAST_BATCH))
        self.batch_sizes = fd.unpadded_or(self.ladder, device)  # a catch-up round's a + 1 rows run unpadded
        self._seen: set[tuple[int, int]] = set()
        self.widths = fd.width_ladder(max_blocks)
        shapes = {k: (max_rows * max_blocks,) if k == "block_tables" else (max_rows,) for k in _LONG}
        self.host = {k: torch.zeros(s, dtype=torch.long) for k, s in shapes.items()}
        self.dev = {k: torch.zeros(s, dtype=torch.long, device=device) for k, s in shapes.items()}
        self.previous = torch.zeros(max_rows, model.config.hidden_size, dtype=model.lm_head.weight.dtype,
                                    device=device)
        self.rounds = 0  # forwards offered, for the warm-up rule
        self.warmup_steps = fd.WARMUP_DECODE_STEPS
        self.fast_steps = 0
        self.disabled = False
        self._compiled = None

    def _fill(self, rows: list[tuple[list[int], int, int, int]], previous: torch.Tensor, batch: int,
              width: int) -> tuple:
        """rows: (block table, cache row, position, token) each; the rest of `batch` is padding."""
        n, bs = len(rows), self.block_size
        h = {k: v.numpy() for k, v in self.host.items()}
        cache_rows = np.fromiter((r[1] for r in rows), dtype=np.int64, count=n)
        h["input_ids"][:n] = [r[3] for r in rows]
        h["positions"][:n] = [r[2] for r in rows]
        h["seq_lens"][:n] = cache_rows + 1
        h["real_rows"][:n] = 1
        tables = h["block_tables"][:batch * width].reshape(batch, width)
        tables[:] = self.scratch_block
        for i, (table, *_rest) in enumerate(rows):
            tables[i, :len(table)] = table
        h["slot_mapping"][:n] = tables[np.arange(n), cache_rows // bs] * bs + cache_rows % bs
        for k in ("input_ids", "positions", "real_rows"):
            h[k][n:batch] = 0
        h["seq_lens"][n:batch] = 1
        h["slot_mapping"][n:batch] = self.scratch_block * bs
        for k, host in self.host.items():
            count = batch * width if k == "block_tables" else batch
            self.dev[k][:count].copy_(host[:count])
        self.previous[:n].copy_(previous)
        self.previous[n:batch].zero_()
        d = self.dev
        return (d["input_ids"][:batch], d["positions"][:batch], self.previous[:batch], d["slot_mapping"][:batch],
                d["block_tables"][:batch * width].view(batch, width), d["seq_lens"][:batch], d["real_rows"][:batch])

    def _forward(self, *args):
        return mtp_decode_step(self.model, self.max_model_len, self.block_size, *args)

    def run(self, rows, previous: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(logits, next hidden) of every row through the compiled step, or None: still warming up, off, or
        the rows do not fit the ladders (the caller runs the eager forward)."""
        if self.disabled or self.device.type != "cpu":
            return None
        batch = fd.rung(self.batch_sizes, len(rows))
        width = fd.rung(self.widths, max(len(r[0]) for r in rows))
        if batch is None or width is None:
            return None
        self.rounds += 1
        if self.rounds <= self.warmup_steps:
            return None
        args = self._fill(rows, previous, batch, width)
        if self._compiled is None:
            self._compiled = fd.compile_decode_graph(self._forward, len(self.ladder) * len(self.widths))
        first = (batch, width) not in self._seen
        try:  # the target's inductor options (freezing, C++ GEMMs, the C++ wrapper) and guard handling
            logits, nxt = fd.call_compiled(self._compiled, args, first, table_arg=4)
        except Exception as e:  # a module this path cannot trace: stay eager from now on
            if self.fast_steps:
                raise
            logger.warning("MTP fast path turned off: %s: %s", type(e).__name__, e)
            self.disabled = True
            return None
        self._seen.add((batch, width))
        self.fast_steps += 1
        return logits[:len(rows)], nxt[:len(rows)]
