"""Greedy outputs with speculative decoding equal those without it, token for token, for every proposer, over
mixed batches (sampled requests beside greedy ones), chunked prefill, prefix caching, forced preemption and
n=3, on dense, MoE and MLA tiny models."""
import pytest

from frontierlm import LLM, SamplingParams
from spec_helpers import assert_no_leaks, greedy, mtp_model_dir, prompts, token_ids

pytestmark = pytest.mark.usefixtures("one_thread")

CASES = [("llama", "ngram"), ("llama", "draft_self"), ("llama", "draft_other"), ("qwen2_moe", "draft_other"),
         ("qwen2_moe", "ngram"), ("deepseek_v3", "mtp"), ("deepseek_v3", "ngram")]


def _target(arch, tiny_model_dir, tmp_path_factory):
    return mtp_model_dir(tmp_path_factory) if arch == "deepseek_v3" else tiny_model_dir(arch)


def _spec(method, target, tiny_model_dir, k=3, adaptive=False):
    cfg = {"num_speculative_tokens": k, "adaptive": adaptive}
    if method == "draft_self":  # the target as its own draft: greedy proposals are always accepted
        return {**cfg, "method": "draft_model", "model": target}
    if method == "draft_other":  # an unrelated draft with the same tokenizer: mostly rejected
        return {**cfg, "method": "draft_model", "model": tiny_model_dir("llama", num_hidden_layers=1)}
    return {**cfg, "method": method}


@pytest.mark.parametrize("arch,method", CASES)
def test_greedy_identical_with_speculation(arch, method, tiny_model_dir, tmp_path_factory):
    target = _target(arch, tiny_model_dir, tmp_path_factory)
    spec = _spec(method, target, tiny_model_dir)
    ps = prompts(shared_prefix=12, seed=1)
    # mixed batch: every other request samples (its tokens are not compared, only that it runs beside)
    params = [greedy() if i % 2 == 0 else SamplingParams(temperature=1.0, max_tokens=24, ignore_eos=True)
              for i in range(len(ps))]
    ref = token_ids(LLM(target, block_size=4), ps, params)

    def check(got):
        for i in range(0, len(ps), 2):
            assert got[i] == ref[i], f"prompt {i}"

    llm = LLM(target, block_size=4, speculative_config=spec)
    check(token_ids(llm, ps, params))
    st = llm.llm_engine.spec.stats
    assert st.num_drafts > 0 and st.num_draft_tokens > 0
    if method == "draft_self":
        assert st.num_accepted_tokens > 0.5 * st.num_draft_tokens
    check(token_ids(llm, ps, params))  # second run: the shared prefix and whole prompts hit the prefix cache
    assert_no_leaks(llm)
    # chunked prefill: a budget smaller than most prompts, shared with K + 1 verification tokens
    llm = LLM(target, block_size=4, max_num_batched_tokens=9, speculative_config=spec)
    check(token_ids(llm, ps, params))
    # forced preemption: 30 blocks of 4 tokens for 8 requests of up to 76 tokens
    mc_bytes = llm.llm_engine.model_config.kv_cache_bytes_per_token()
    llm = LLM(target, block_size=4, kv_cache_memory_gb=30 * 4 * mc_bytes / 2**30, speculative_config=spec)
    check(token_ids(llm, ps, params))
    assert llm.llm_engine.get_stats()["num_preemptions"] > 0
    assert_no_leaks(llm)


@pytest.mark.parametrize("method", ["ngram", "draft_other"])
def test_n3_and_adaptive(method, tiny_model_dir, tmp_path_factory):
    target = tiny_model_dir("llama")
    ps = prompts(seed=2)
    ref = token_ids(LLM(target, block_size=4), ps, greedy(n=3))
    llm = LLM(target, block_size=4, speculative_config=_spec(method, target, tiny_model_dir, k=5, adaptive=True))
    assert token_ids(llm, ps, greedy(n=3)) == ref
    assert all(len(set(map(tuple, samples))) == 1 for samples in ref)
    assert_no_leaks(llm)
