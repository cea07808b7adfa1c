"""MTP proposer: DeepSeek-V3's multi-token-prediction module, carried in the target checkpoint.

The module maps (h_i, embedding of t_{i+1}) at position i to a hidden state whose logits predict t_{i+2} (h: the
target's final hidden state). It is chained for k > 1 as DeepSeek and vLLM do with one module: the module's own
output stands in for the target's hidden state of the token just proposed.

Its attention keeps a paged latent cache of its own per request (blocks of the proposer's pool, like the draft
model's): row i - start holds the module's K/V of position i. The target's hidden states reach the proposer
after each forward (`observe`) and wait; a round feeds the ones not fed yet (the accepted proposals and the
target's token after them, a + 1 positions, or a whole prompt the first time) in one ragged forward across
requests, which yields the first proposal, then k - 1 one-row forwards chain the rest. Chained rows come from
the module's own hidden states, not the target's, so they do not count as computed: the next round gives their
blocks back and writes over them (the rollback of rejected proposals). A request's cache is freed when it
finishes, is aborted or is preempted (`release`). After a preemption, a prefix-cache hit (positions the target
did not compute have no hidden state) or a long pause (more than MAX_PENDING positions waiting) the cache
starts at the first position the proposer has: earlier positions are not attended to, which can only lower
acceptance, never change an output token.

Parallel runs: the module is built like the layers it follows, so with tensor parallelism its heads and
experts are split over stage 0's TP ranks and `model` is the driver's stand-in, whose `mtp_forward` runs the
forward on all of them (distributed/executor.py) and whose `mtp_logits` gathers the vocab-parallel head; each
of those ranks keeps its own copy of the latent cache (MLA's latent is whole per rank). The target's final
hidden states are replicated after the last all-reduce and, under pipeline parallelism, come back to stage 0
for the logits anyway: the driver has them without a transfer of its own."""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from frontierlm.engine.kv_cache import KVCacheManager
from frontierlm.spec.adaptive import LinearCost, cost_clock
from frontierlm.spec.paged import PagedProposer, last_rows, paged_metadata
from frontierlm.spec.verify import Proposal, RowState, draw

MAX_PENDING = 1024  # target hidden states kept for a request that does not speculate for a while


@dataclass(eq=False)
class _MTPSeq:
    """A request's MTP cache (what KVCacheManager needs of a sequence, prefix caching off) and the target
    hidden states waiting to be fed."""
    request_id: str
    start: int  # position of cache row 0
    num_preemptions: int
    num_computed_tokens: int = 0  # cache rows made from the target's own hidden states
    pending: list[torch.Tensor] = field(default_factory=list)  # [n, H] target hidden states of the next positions
    num_pending: int = 0

    @property
    def next_position(self) -> int:
        """The first position whose target hidden state the proposer has not got."""
        return self.start + self.num_computed_tokens + self.num_pending


class MTPProposer(PagedProposer):
    name = "mtp"
    uses_hidden = True

    def __init__(self, model, num_blocks: int, block_size: int, sampler, eos_token_ids, fast_rows: int = 0,
                 max_model_len: int = 0):
        """fast_rows: the most rows a compiled step takes (mtp_fast.py); 0 keeps every forward eager."""
        if getattr(model, "num_mtp_layers", 0) < 1:
            raise ValueError(f"speculative_config.method 'mtp': the target ({type(model).__name__}) has no "
                             f"multi-token-prediction modules in its checkpoint")
        self.model = model
        self.device = model.lm_head.weight.device
        self.block_size = block_size
        scratch = 1 if fast_rows else 0  # the compiled step's padding rows write a block nobody is given
        # the depth-0 module's MLA cache; with tensor parallelism every TP rank of stage 0 allocates its own
        self.kv_cache = model.allocate_mtp_kv_cache(num_blocks + scratch, block_size)
        self.fast = None
        if fast_rows:
            from frontierlm.spec.mtp_fast import FastMTP

            self.fast = FastMTP(model, self.device, fast_rows, max_model_len, block_size, scratch_block=num_blocks)
        self.kv = KVCacheManager(num_blocks, block_size, enable_prefix_caching=False)
        self.seqs: dict[str, _MTPSeq] = {}
        self.sampler, self.eos = sampler, eos_token_ids
        self.cost = LinearCost()  # seconds per MTP forward vs requests in it
        self.clock = cost_clock(self.device)
        self.num_forward_positions = 0  # rows run through the module (catch-up and chained), for tests / stats

    def observe(self, sched, hidden, rows: dict) -> None:
        requests = {s.request.request_id: s.request for s in sched.scheduled}
        for rid, (row0, n, pos0) in rows.items():
            if n <= 0:
                continue
            req = requests[rid]
            seq = self.seqs.get(rid)
            if seq is not None and (seq.next_position != pos0 or seq.num_preemptions != req.num_preemptions):
                self._drop(rid)  # recomputed from a preemption: start over, like the target
                seq = None
            if seq is None:
                seq = self.seqs[rid] = _MTPSeq(rid, pos0, req.num_preemptions)
            seq.pending.append(hidden[row0:row0 + n].clone())
            seq.num_pending += n
            if seq.num_pending > MAX_PENDING:  # keep the newest; the cache restarts where they begin
                kept = torch.cat(seq.pending)[-MAX_PENDING:]
                start = seq.next_position - MAX_PENDING
                self._drop(rid)
                seq = self.seqs[rid] = _MTPSeq(rid, start, req.num_preemptions, pending=[kept],
                                               num_pending=MAX_PENDING)

    @torch.inference_mode()
    def _forward(self, chunks: list[tuple[_MTPSeq, list[int], list[int], torch.Tensor]]):
        """One forward of the module over chunks (seq, positions, the token after each, previous hidden
        [n, H]): the compiled static-shape step when it takes them, else a ragged paged forward. Returns the
        logits and the next-depth hidden state of each chunk's last row."""
        t0 = self.clock()
        prev = torch.cat([h for *_, h in chunks]) if len(chunks) > 1 else chunks[0][3]
        tables = [self.kv.block_ids(seq.request_id) for seq, *_ in chunks]
        out = None
        if self.fast is not None:
            rows = [(table, p - seq.start, p, t) for table, (seq, pos, toks, _) in zip(tables, chunks)
                    for p, t in zip(pos, toks)]
            out = self.fast.run(rows, prev)
        if out is not None:
            ends = np.cumsum([len(pos) for _, pos, _, _ in chunks]) - 1
            last = torch.from_numpy(ends).to(self.device)
            logits, nxt = out[0].index_select(0, last), out[1].index_select(0, last)
        else:
            meta = paged_metadata([(table, pos[0] - seq.start, len(pos)) for table, (seq, pos, _, _) in
                                   zip(tables, chunks)], self.block_size, self.device)
            ids = torch.tensor([t for _, _, toks, _ in chunks for t in toks], dtype=torch.long).to(self.device)
            pos = torch.tensor([p for _, ps, _, _ in chunks for p in ps], dtype=torch.long).to(self.device)
            head, nxt = self.model.mtp_forward(ids, pos, prev, 0, return_next_hidden=True, attn_meta=meta)
            last = last_rows(meta)
            logits, nxt = self.model.mtp_logits(head.index_select(0, last)), nxt.index_select(0, last)
        self.num_forward_positions += prev.shape[0]
        self.cost.observe_on(self.fast, len(chunks), self.clock() - t0)
        return logits, nxt

    def propose(self, requests, ks):
        out = [Proposal([]) for _ in requests]
        active = []  # (index, request, seq, k)
        for i, (r, k) in enumerate(zip(requests, ks)):
            seq = self.seqs.get(r.request_id)
            # the waiting hidden states must reach the newest token's predecessor (its own is not computed)
            if k <= 0 or seq is None or not seq.num_pending or seq.next_position != r.num_tokens - 1:
                continue
            self.kv.free_tail(r.request_id, seq.num_computed_tokens)  # last round's chained rows
            if self.kv.allocate_slots(seq, seq.num_pending + k - 1) is None:
                self._drop(r.request_id)  # the pool is full: this request waits, its cache starts over later
                continue
            active.append((i, r, seq, k))
        if not active:
            return out
        chunks = []
        for _, r, seq, _ in active:
            p0 = seq.start + seq.num_computed_tokens
            prev = torch.cat(seq.pending) if len(seq.pending) > 1 else seq.pending[0]
            chunks.append((seq, list(range(p0, p0 + seq.num_pending)),
                           r.all_token_ids[p0 + 1:p0 + 1 + seq.num_pending], prev))
            seq.num_computed_tokens += seq.num_pending
            seq.pending, seq.num_pending = [], 0
        with torch.inference_mode():
            logits, nxt = self._forward(chunks)
            drafted: list[list[int]] = [[] for _ in active]
            qs: list[list[torch.Tensor]] = [[] for _ in active]
            rows = list(range(len(active)))
            for j in range(max(k for *_, k in active)):
                if j:  # chain: the module's own hidden state and the token it just proposed, one position on
                    keep = [n for n, a in enumerate(rows) if active[a][3] > j]
                    rows = [rows[n] for n in keep]
                    nxt = nxt[torch.tensor(keep, device=self.device)]
                    chunks = []
                    for n, a in enumerate(rows):
                        r, seq = active[a][1], active[a][2]
                        p = r.num_tokens - 2 + j
                        chunks.append((seq, [p], [drafted[a][-1]], nxt[n:n + 1]))
                    logits, nxt = self._forward(chunks)
                states = [RowState(active[a][1], drafted[a]) for a in rows]
                tokens, q = draw(self.sampler, logits, states, self.eos, self.processors)
                for n, a in enumerate(rows):
                    drafted[a].append(tokens[n])
                    qs[a].append(None if q is None else q[n])
        for a, (i, r, _, _) in enumerate(active):
            out[i] = Proposal(drafted[a], None if r.sampling_params.greedy else torch.stack(qs[a]))
        return out
