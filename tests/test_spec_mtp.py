"""The MTP proposer keeps a paged cache of its own: each round runs the module over the positions the target
added since the last one plus the k - 1 chained proposals (not a window recomputed each round); the cache rows
of computed positions hold the module's K/V of the target's own hidden states (chained rows are rolled back);
preemption and finishing free every block; greedy outputs stay those of decoding without speculation."""
import pytest
import torch

from frontierlm import LLM
from frontierlm.spec.paged import paged_metadata
from spec_helpers import assert_no_leaks, greedy, mtp_model_dir, prompts, token_ids

pytestmark = pytest.mark.usefixtures("one_thread")


def _spec(k):
    return {"method": "mtp", "num_speculative_tokens": k, "adaptive": False}


def test_each_round_feeds_only_new_positions_and_k_minus_1_chained(tmp_path_factory):
    target = mtp_model_dir(tmp_path_factory)
    ps, params, k = prompts(lens=(7, 19, 3), seed=21), greedy(max_tokens=40), 3
    ref = token_ids(LLM(target, block_size=4), ps, params)
    llm = LLM(target, block_size=4, speculative_config=_spec(k))
    proposer = llm.llm_engine.spec.proposer
    fed_upto: dict[str, int] = {}  # request id -> its length when the module last caught up
    rounds = []
    original = proposer.propose

    def counted(requests, ks):
        before = proposer.num_forward_positions
        out = original(requests, ks)
        want = 0
        for r, prop in zip(requests, out):
            if prop.tokens:  # fed: what the target added since, then k - 1 chained rows
                want += r.num_tokens - fed_upto.get(r.request_id, 1) + len(prop.tokens) - 1
                fed_upto[r.request_id] = r.num_tokens
        rounds.append((proposer.num_forward_positions - before, want, sum(map(bool, (p.tokens for p in out)))))
        return out

    proposer.propose = counted
    assert token_ids(llm, ps, params) == ref
    assert all(got == want for got, want, _ in rounds), rounds
    # past the prompts' first round a request costs at most K + 1 caught-up + K - 1 chained rows, not 8 + ...
    steady = [(got, n) for got, _, n in rounds[1:] if n]
    assert steady and all(got <= n * 2 * k for got, n in steady)
    assert sum(got for got, _ in steady) / sum(n for _, n in steady) < 2 * k
    assert llm.llm_engine.spec.stats.num_drafts > 30
    assert_no_leaks(llm)


def _true_rows(engine, proposer, seq, tokens):
    """The module's cache rows for positions seq.start .. + num_computed, recomputed from scratch: the target's
    hidden states of the whole sequence (a plain contiguous forward) through a paged forward of the module
    into a scratch cache."""
    with torch.inference_mode():
        return _recompute(engine, proposer, seq, tokens)


def _recompute(engine, proposer, seq, tokens):
    model = engine.runner.model
    n, first = seq.num_computed_tokens, seq.start
    ids = torch.tensor(tokens)
    hidden = model(ids[None], torch.arange(len(tokens))[None])[0]
    attn = model.model.layers[model.config.num_layers].self_attn
    bs = proposer.block_size
    scratch = torch.zeros(attn.kv_cache_shape(-(-n // bs), bs))
    attn.bind_kv_cache(scratch)
    try:
        meta = paged_metadata([(list(range(scratch.shape[0])), 0, n)], bs, "cpu")
        model.mtp_forward(ids[first + 1:first + 1 + n], torch.arange(first, first + n), hidden[first:first + n],
                          0, attn_meta=meta)
    finally:
        attn.bind_kv_cache(proposer.kv_cache)
    return scratch.view(-1, scratch.shape[-1])[:n]


def test_rollback_and_preemption_leave_true_rows_and_leak_nothing(tmp_path_factory):
    target = mtp_model_dir(tmp_path_factory)
    ps, params, k = prompts(seed=4), greedy(max_tokens=30), 3
    ref = token_ids(LLM(target, block_size=4), ps, params)
    mc_bytes = LLM(target, block_size=4).llm_engine.model_config.kv_cache_bytes_per_token()
    llm = LLM(target, block_size=4, kv_cache_memory_gb=30 * 4 * mc_bytes / 2**30, speculative_config=_spec(k))
    engine = llm.llm_engine
    proposer = engine.spec.proposer
    ids = [engine.add_request(None, p, params) for p in ps]
    reqs = [engine.get_requests(i)[0] for i in ids]
    checked = steps = 0
    while engine.has_unfinished_requests():
        engine.step()
        steps += 1
        running = {r.request_id: r for r in engine.scheduler.running}
        assert set(proposer.seqs) <= set(running)  # finished and preempted requests hold no MTP cache
        held = sum(len(b) for b in proposer.kv.req_blocks.values())
        assert held + proposer.kv.pool.num_free_blocks == proposer.kv.num_blocks
        for rid, seq in proposer.seqs.items():
            r = running[rid]
            assert seq.num_preemptions == r.num_preemptions
            # computed rows plus at most the k - 1 chained ones of this round
            assert len(proposer.kv.req_blocks.get(rid, ())) <= -(-(seq.num_computed_tokens + k - 1) // 4)
            if steps % 4 == 0 and seq.num_computed_tokens:
                table = proposer.kv.block_ids(rid)
                slots = [table[i // 4] * 4 + i % 4 for i in range(seq.num_computed_tokens)]
                got = proposer.kv_cache.view(-1, proposer.kv_cache.shape[-1])[slots]
                torch.testing.assert_close(got, _true_rows(engine, proposer, seq, r.all_token_ids),
                                           atol=1e-4, rtol=1e-4)
                checked += 1
    assert checked > 10
    assert [r.output_token_ids for r in reqs] == [o[0] for o in ref]
    assert engine.get_stats()["num_preemptions"] > 0
    st = engine.spec.stats
    assert st.num_draft_tokens - st.num_accepted_tokens > 50  # plenty of rejected, rolled-back chains
    assert_no_leaks(llm)
