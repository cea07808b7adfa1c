"""Draft-model proposer: a second, smaller model with the target's tokenizer and its own paged KV cache.

Each round first catches the draft up on the tokens it has not seen (the accepted proposals and the target's
next token, or a whole prompt the first time) in one ragged forward across requests, which yields the first
proposal; then k - 1 batched single-token forwards yield the rest. The draft's blocks belong to the request:
they are allocated as it grows, rolled back past rejected proposals, and freed when the request finishes, is
aborted or is preempted (`release`, called before every round with the running requests).

Parallel runs: the draft is built outside the target's parallel context, so it is whole, on rank 0 only (vLLM's
draft_tensor_parallel_size=1): its forwards need no collective, and the workers hold none of it."""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from frontierlm.config import ModelConfig
from frontierlm.engine.kv_cache import KVCacheManager
from frontierlm.models.loader import load_model
from frontierlm.spec.adaptive import LinearCost, cost_clock
from frontierlm.spec.paged import PagedProposer, last_rows, paged_metadata
from frontierlm.spec.verify import Proposal, RowState, draw


@dataclass(eq=False)
class _DraftSeq:
    """What the draft's KVCacheManager needs of a sequence (prefix caching is off for the draft)."""
    request_id: str
    num_computed_tokens: int = 0  # tokens whose draft K/V are valid
    fed: list[int] = field(default_factory=list)  # proposals fed after the request's tokens in the last round
    base: int = 0  # request length when `fed` was fed
    num_preemptions: int = 0
    all_token_ids: list[int] = field(default_factory=list)
    block_keys: list = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return len(self.all_token_ids)


def check_same_tokenizer(target_dir: str, target_vocab: int, target_tok, draft_dir: str, draft_vocab: int,
                         draft_tok) -> None:
    if draft_vocab != target_vocab:
        raise ValueError(f"speculative_config.model: the draft {draft_dir} has vocab_size {draft_vocab}, the "
                         f"target {target_dir} has {target_vocab}; a draft must share the target's vocabulary")
    if (target_tok is None) != (draft_tok is None) or (
            target_tok is not None and target_tok.get_vocab() != draft_tok.get_vocab()):
        raise ValueError(f"speculative_config.model: the draft {draft_dir} has a different tokenizer from the "
                         f"target {target_dir}; a draft must use the target's tokenizer")


class DraftModelProposer(PagedProposer):
    name = "draft_model"

    def __init__(self, draft_config: ModelConfig, device: torch.device, num_blocks: int, block_size: int,
                 sampler, eos_token_ids, seed: int = 0, fast_rows: int = 0, max_model_len: int = 0):
        """fast_rows: the most rows one compiled draft step takes (engine/fast_decode.py); 0: always eager."""
        self.mc = draft_config
        self.device = device
        self.model = load_model(draft_config, device, "auto", seed=seed)
        self.block_size = block_size
        scratch = 1 if fast_rows else 0  # the compiled step's padding rows write a block nobody is given
        shapes = self.model.kv_cache_shapes(num_blocks + scratch, block_size)
        self.kv_caches = [torch.zeros(s, dtype=draft_config.dtype, device=device) for s in shapes]
        self.model.bind_kv_cache(self.kv_caches)
        self.fast = None
        if fast_rows:  # every draft row is a one-token decode over the draft's cache: the target's fast path
            from frontierlm.engine.fast_decode import FastDecode

            self.fast = FastDecode(self.model, device, fast_rows, max_model_len, block_size, scratch_block=num_blocks)
        self.kv = KVCacheManager(num_blocks, block_size, enable_prefix_caching=False)
        self.seqs: dict[str, _DraftSeq] = {}
        self.sampler, self.eos = sampler, eos_token_ids
        self.cost = LinearCost()  # seconds per draft forward vs sequences in it
        self.clock = cost_clock(device)

    def _sync(self, request) -> _DraftSeq:
        """The request's draft state, wound back to the longest prefix of what it fed that is still true."""
        seq = self.seqs.get(request.request_id)
        if seq is not None and seq.num_preemptions != request.num_preemptions:
            self._drop(request.request_id)  # preempted since: start over, like the target
            seq = None
        if seq is None:
            seq = self.seqs[request.request_id] = _DraftSeq(request.request_id,
                                                            num_preemptions=request.num_preemptions)
        tokens = request.all_token_ids
        valid = 0
        while valid < len(seq.fed) and seq.base + valid < len(tokens) and tokens[seq.base + valid] == seq.fed[valid]:
            valid += 1
        seq.num_computed_tokens = min(seq.num_computed_tokens, seq.base + valid, len(tokens) - 1)
        seq.fed = []
        self.kv.free_tail(seq.request_id, seq.num_computed_tokens)
        return seq

    @torch.inference_mode()
    def _forward(self, chunks: list[tuple[_DraftSeq, list[int]]]) -> torch.Tensor:
        """One paged forward over `chunks` (tokens after each sequence's computed ones); logits of the last
        token of each chunk."""
        t0 = self.clock()
        tables = [self.kv.block_ids(seq.request_id) for seq, _ in chunks]
        logits = None
        if self.fast is not None:
            from frontierlm.spec.fast_verify import decode_rows

            rows = decode_rows((seq.num_computed_tokens, toks, table) for (seq, toks), table in zip(chunks, tables))
            logits = self.fast.run(rows)
        if logits is not None:
            last = torch.tensor(np.cumsum([len(toks) for _, toks in chunks]) - 1, device=self.device)
            logits = logits.index_select(0, last)
        else:
            meta = paged_metadata([(table, seq.num_computed_tokens, len(toks)) for (seq, toks), table in
                                   zip(chunks, tables)], self.block_size, self.device)
            ids = torch.tensor([t for _, toks in chunks for t in toks], dtype=torch.long).to(self.device)
            pos = torch.tensor([p for seq, toks in chunks for p in range(seq.num_computed_tokens,
                                                                         seq.num_computed_tokens + len(toks))],
                               dtype=torch.long).to(self.device)
            hidden = self.model(ids, pos, meta)
            logits = self.model.compute_logits(hidden.index_select(0, last_rows(meta)))
        for seq, toks in chunks:
            seq.num_computed_tokens += len(toks)
        self.cost.observe_on(self.fast, len(chunks), self.clock() - t0)
        return logits

    def propose(self, requests, ks):
        out = [Proposal([]) for _ in requests]
        active = []  # (index, request, seq, k)
        for i, (r, k) in enumerate(zip(requests, ks)):
            if k <= 0 or r.num_tokens + k > self.mc.max_model_len:
                continue
            seq = self._sync(r)
            # room for the catch-up tokens and the k - 1 proposals fed back
            if self.kv.allocate_slots(seq, r.num_tokens - seq.num_computed_tokens + k - 1) is None:
                self._drop(r.request_id)  # the draft's pool is full: this request waits a round
                continue
            seq.base = r.num_tokens
            active.append((i, r, seq, k))
        if not active:
            return out
        chunks = [(seq, r.all_token_ids[seq.num_computed_tokens:]) for _, r, seq, _ in active]
        logits = self._forward(chunks)
        drafted: list[list[int]] = [[] for _ in active]
        qs: list[list[torch.Tensor]] = [[] for _ in active]
        rows = list(range(len(active)))
        for j in range(max(k for *_, k in active)):
            if j:
                rows = [a for a in rows if active[a][3] > j]
                logits = self._forward([(active[a][2], [drafted[a][-1]]) for a in rows])
                for a in rows:
                    active[a][2].fed.append(drafted[a][-1])
            states = [RowState(active[a][1], drafted[a]) for a in rows]
            tokens, q = draw(self.sampler, logits, states, self.eos, self.processors)
            for n, a in enumerate(rows):
                drafted[a].append(tokens[n])
                qs[a].append(None if q is None else q[n])
        for a, (i, r, seq, k) in enumerate(active):
            greedy = r.sampling_params.greedy
            out[i] = Proposal(drafted[a], None if greedy else torch.stack(qs[a]))
        return out
