"""Speculative decoding under tensor parallelism: ngram proposals (host-side, rank 0) verified by the TP=2
step give the single-process greedy tokens, over chunked prefill and a shared prefix from the prefix cache."""
import pytest

from frontierlm import LLM
from spec_helpers import assert_no_leaks, greedy, prompts, token_ids

pytestmark = pytest.mark.usefixtures("one_thread")


def test_ngram_speculation_with_tp2_keeps_greedy_tokens(tiny_model_dir, monkeypatch):
    monkeypatch.setenv("FRONTIERLM_DIST_TIMEOUT_S", "60")
    d = tiny_model_dir("llama")
    ps, params = prompts(shared_prefix=12, seed=1), greedy()
    ref = token_ids(LLM(d, block_size=4), ps, params)
    llm = LLM(d, block_size=4, max_num_batched_tokens=16, tensor_parallel_size=2,
              speculative_config={"method": "ngram", "num_speculative_tokens": 3})
    try:
        assert token_ids(llm, ps, params) == ref
        st = llm.llm_engine.spec.stats
        assert st.num_drafts > 0 and st.num_accepted_tokens > 0  # proposals were verified by both ranks
        assert token_ids(llm, ps, params) == ref  # again, from the prefix cache
        assert_no_leaks(llm)
    finally:
        llm.llm_engine.shutdown()
