"""Speculative decoding under tensor and pipeline parallelism (gloo on loopback, one thread per rank).

Every run compares against the single-process engine without speculation (greedy tokens, exactly) and has
chunked prefill (an 8-token budget), forced preemption (20 blocks of 4 tokens on every rank for 8 requests of
up to 64 tokens) and prefix-cache hits (a shared 12-token prefix, and recomputes after preemption) in it.
Proposers: n-gram (rank 0, host), a draft model (whole on rank 0, its own paged cache) and DeepSeek-V3's MTP
module (tensor-parallel over stage 0's ranks, its latent cache on each). Under TP the schedule is the
single-process one, so the proposals and the spec-decode counters must equal a single-process speculative
run's; under PP the counters must add up to the tokens the requests got, and no request in flight may be
given proposals."""
import pytest

from frontierlm import LLM
from frontierlm.config import ModelConfig
from spec_helpers import assert_no_leaks, greedy, mtp_model_dir, prompts, token_ids

pytestmark = pytest.mark.usefixtures("one_thread", "dist_timeout")

BLOCKS, BLOCK_SIZE = 20, 4


def _kv_budget(d, tp=1, pp=1) -> float:
    """kv_cache_memory_gb that holds BLOCKS blocks of one rank's share of the cache (its KV heads, its stage's
    layers; MLA's latent is whole on every TP rank)."""
    mc = ModelConfig.from_pretrained(d, load_format="dummy")
    layers = -(-mc.num_layers // pp) / mc.num_layers
    heads = 1.0 if mc.is_mla else max(mc.num_kv_heads // tp, 1) / mc.num_kv_heads
    return BLOCKS * BLOCK_SIZE * mc.kv_cache_bytes_per_token() * layers * heads / 2**30


def _target(method, tiny_model_dir, tmp_path_factory):
    return mtp_model_dir(tmp_path_factory) if method == "mtp" else tiny_model_dir("llama")


def _spec(method, tiny_model_dir, draft=None):
    """draft: the draft model's directory; by default an unrelated one-layer model with the target's
    tokenizer, whose proposals are mostly rejected."""
    cfg = {"method": method, "num_speculative_tokens": 3, "adaptive": False}  # adaptive K would follow timings
    if method == "draft_model":
        cfg["model"] = draft or tiny_model_dir("llama", num_hidden_layers=1)
    return cfg


def _engine(d, spec, **flags):
    llm = LLM(d, block_size=BLOCK_SIZE, max_num_batched_tokens=8, speculative_config=spec,
              kv_cache_memory_gb=_kv_budget(d, flags.get("tensor_parallel_size", 1),
                                            flags.get("pipeline_parallel_size", 1)), **flags)
    assert llm.llm_engine.kv.num_blocks == BLOCKS
    return llm


def _record(engine) -> dict:
    """Hooks on the proposer and the scheduler: every proposal round's (context, proposal), and what each
    step's update hands out (sampled tokens, accepted proposals, verification rounds, proposed tokens)."""
    seen = {"proposals": [], "sampled": 0, "accepted": 0, "rounds": 0, "draft_tokens": 0, "busy_skipped": 0}
    proposer, scheduler = engine.spec.proposer, engine.scheduler
    propose, update = proposer.propose, scheduler.update_from_output

    def recorded_propose(requests, ks):
        if engine.pipeline is not None:
            busy = engine.pipeline.busy
            assert not {r.request_id for r in requests} & busy, "proposals for a request whose batch is in flight"
            seen["busy_skipped"] += sum(r.request_id in busy for r in scheduler.running)
        out = propose(requests, ks)
        seen["proposals"] += [(tuple(r.all_token_ids), tuple(p.tokens)) for r, p in zip(requests, out)]
        return out

    def recorded_update(sched, result):
        seen["sampled"] += len(result.sampled)
        seen["accepted"] += sum(map(len, result.spec_accepted.values()))
        seen["rounds"] += sum(bool(s.spec_token_ids) for s in sched.scheduled)
        seen["draft_tokens"] += sum(len(s.spec_token_ids) for s in sched.scheduled)
        return update(sched, result)

    proposer.propose, scheduler.update_from_output = recorded_propose, recorded_update
    return seen


def _run(llm, ps, params, ref) -> list:
    """Chunked prefill, preemption and prefix-cache hits (the shared prefix, and recomputes after preemption)
    in one run of the prompts; the reference tokens. Returns the outputs."""
    outputs = llm.generate(ps, params, use_tqdm=False)
    assert [[c.token_ids for c in o.outputs] for o in outputs] == ref
    assert llm.llm_engine.get_stats()["num_preemptions"] > 0
    assert any(o.num_cached_tokens > 0 for o in outputs)
    return outputs


def _check_counters(engine, seen, outputs) -> None:
    """The spec-decode counters (the /metrics series) add up: every output token is an accepted proposal
    or a sampled one, and each verification round is counted once with the proposals it scored."""
    st = engine.spec.stats
    assert sum(len(c.token_ids) for o in outputs for c in o.outputs) == seen["sampled"] + seen["accepted"]
    assert (st.num_drafts, st.num_draft_tokens, st.num_accepted_tokens) == \
        (seen["rounds"], seen["draft_tokens"], seen["accepted"])
    assert st.num_drafts > 0 and sum(st.accepted_per_pos) == st.num_accepted_tokens
    assert all(a >= b for a, b in zip(st.accepted_per_pos, st.accepted_per_pos[1:]))
    assert engine.get_stats()["spec_decode"]["num_draft_tokens"] == st.num_draft_tokens


def test_ngram_speculation_with_tp2_keeps_greedy_tokens(tiny_model_dir):
    d = tiny_model_dir("llama")
    ps, params = prompts(shared_prefix=12, seed=1), greedy()
    ref = token_ids(LLM(d, block_size=4), ps, params)
    # K pinned: on a busy machine adaptive K can measure that drafting does not pay and stop after one draft,
    # and this test is about proposals verified by both ranks
    llm = LLM(d, block_size=4, max_num_batched_tokens=16, tensor_parallel_size=2,
              speculative_config={"method": "ngram", "num_speculative_tokens": 3, "adaptive": False})
    try:
        assert token_ids(llm, ps, params) == ref
        st = llm.llm_engine.spec.stats
        assert st.num_drafts > 0 and st.num_accepted_tokens > 0  # proposals were verified by both ranks
        assert token_ids(llm, ps, params) == ref  # again, from the prefix cache
        assert_no_leaks(llm)
    finally:
        llm.llm_engine.shutdown()


@pytest.mark.parametrize("method", ["draft_model", "mtp"])
def test_tp2_speculation_equals_one_process(method, tiny_model_dir, tmp_path_factory):
    """The draft model runs whole on rank 0, the MTP module across both ranks: the proposals, the tokens and
    the counters are the single-process speculative run's, the tokens also the non-speculative run's."""
    d, spec = _target(method, tiny_model_dir, tmp_path_factory), _spec(method, tiny_model_dir)
    ps, params = prompts(shared_prefix=12, seed=1), greedy(max_tokens=12)
    ref = token_ids(LLM(d, block_size=BLOCK_SIZE), ps, params)
    one = _engine(d, spec)
    one_seen = _record(one.llm_engine)
    _run(one, ps, params, ref)
    llm = _engine(d, spec, tensor_parallel_size=2)
    try:
        where = "the draft whole on rank 0" if method == "draft_model" else "the MTP module on stage 0's 2 TP ranks"
        assert where in llm.llm_engine.startup_report
        seen = _record(llm.llm_engine)
        outputs = _run(llm, ps, params, ref)
        assert seen["proposals"] == one_seen["proposals"]  # the same contexts got the same proposals
        assert llm.llm_engine.spec.stats.as_dict() == one.llm_engine.spec.stats.as_dict()
        _check_counters(llm.llm_engine, seen, outputs)
        assert_no_leaks(llm)
    finally:
        llm.llm_engine.shutdown()


@pytest.mark.parametrize("method", ["ngram", "draft_model", "mtp"])
def test_pp2_speculation_keeps_greedy_tokens(method, tiny_model_dir, tmp_path_factory):
    """Verification rows flow through both stages with the batch; two batches in flight, and a request with
    pending proposals is never in both. The draft here is the target itself, so its greedy proposals are
    accepted (and the MTP module's mostly rejected: both paths go through the stages)."""
    d = _target(method, tiny_model_dir, tmp_path_factory)
    spec = _spec(method, tiny_model_dir, draft=d)
    ps, params = prompts(shared_prefix=12, seed=1), greedy(max_tokens=12)
    ref = token_ids(LLM(d, block_size=BLOCK_SIZE), ps, params)
    llm = _engine(d, spec, pipeline_parallel_size=2)
    try:
        engine = llm.llm_engine
        seen = _record(engine)
        outputs = _run(llm, ps, params, ref)
        assert engine.pipeline.max_in_flight == 2
        assert seen["busy_skipped"] > 0  # proposal rounds happened while another batch was out
        _check_counters(engine, seen, outputs)
        st = engine.spec.stats
        if method == "draft_model":  # the target as its own draft: accepted (the verified rows are right)
            assert st.num_accepted_tokens > 0.5 * st.num_draft_tokens
        else:
            assert st.num_draft_tokens > st.num_accepted_tokens  # some rejected: rolled back through both stages
        assert_no_leaks(llm)
    finally:
        llm.llm_engine.shutdown()


def test_mtp_with_tp2_x_pp2(tmp_path_factory):
    """4 ranks: the MTP module is sharded over stage 0's two ranks; stage 1's ranks hold none of it and let
    its forwards pass."""
    d = mtp_model_dir(tmp_path_factory)
    ps, params = prompts(lens=(7, 19, 3), seed=2), greedy(max_tokens=12)
    ref = token_ids(LLM(d, block_size=BLOCK_SIZE), ps, params)
    llm = LLM(d, block_size=BLOCK_SIZE, max_num_batched_tokens=16, tensor_parallel_size=2, pipeline_parallel_size=2,
              speculative_config={"method": "mtp", "num_speculative_tokens": 2, "adaptive": False})
    try:
        assert token_ids(llm, ps, params) == ref
        assert llm.llm_engine.spec.stats.num_drafts > 0
        assert_no_leaks(llm)
    finally:
        llm.llm_engine.shutdown()


def test_draft_model_with_tp2_x_pp2(tiny_model_dir):
    """4 ranks: the draft runs whole on rank 0, the target's verification rows go through both stages' TP pairs,
    with chunked prefill, preemption and prefix-cache hits. Two batches in flight make the schedule differ from
    one process's, so the tokens are compared with the non-speculative run, the counters with the tokens, and
    each proposal with the single-process speculative run's for the same context (a greedy draft's proposal
    depends on nothing else)."""
    d, spec = tiny_model_dir("llama"), _spec("draft_model", tiny_model_dir)
    ps, params = prompts(shared_prefix=12, seed=1), greedy(max_tokens=12)
    ref = token_ids(LLM(d, block_size=BLOCK_SIZE), ps, params)
    one = _engine(d, spec)
    one_seen = _record(one.llm_engine)
    _run(one, ps, params, ref)
    llm = _engine(d, spec, tensor_parallel_size=2, pipeline_parallel_size=2)
    try:
        engine = llm.llm_engine
        assert "the draft whole on rank 0" in engine.startup_report
        seen = _record(engine)
        outputs = _run(llm, ps, params, ref)
        assert engine.pipeline.max_in_flight == 2 and seen["busy_skipped"] > 0
        # the contexts proposed for are the single-process run's, and where both runs made a proposal it is the
        # same one (an empty one is a round the draft's own pool could not hold under that schedule: it retries)
        assert {ctx for ctx, _ in seen["proposals"]} <= {ctx for ctx, _ in one_seen["proposals"]}
        one_made = {ctx: p for ctx, p in one_seen["proposals"] if p}
        both = [(ctx, p) for ctx, p in seen["proposals"] if p and ctx in one_made]
        assert len(both) > len(seen["proposals"]) // 2 and all(one_made[ctx] == p for ctx, p in both)
        _check_counters(engine, seen, outputs)
        assert_no_leaks(llm)
    finally:
        llm.llm_engine.shutdown()
