"""Shared by the compiled decode step's tests (test_fast_path.py, test_decode_precompile.py): an (eager, compiled)
pair of engines of one tiny model with the same KV budget, and the greedy comparison."""
import pytest

import frontierlm.engine.fast_decode as fd
from frontierlm import LLM, SamplingParams

MAX_FAST = 4  # top rung of the tests' batch ladder: 1, 2, 4; batches of 5+ take the eager path
KV_TOKENS = 640  # small enough that the preemption test runs out of blocks


def engine_pair(model_dir, **fast_kw):
    """(eager, compiled) LLMs: max_num_seqs 8, block size 8, KV_TOKENS of cache, a batch ladder topped at
    MAX_FAST. `fast_kw` goes to the compiled one only (e.g. compile_decode_at_startup=True)."""
    kw = dict(max_num_seqs=8, block_size=8)
    probe = LLM(model_dir, enforce_eager=True, **kw)
    kw["kv_cache_memory_gb"] = KV_TOKENS * probe.llm_engine.model_config.kv_cache_bytes_per_token() / 2**30
    eager = LLM(model_dir, enforce_eager=True, **kw)
    old = fd.MAX_FAST_BATCH
    fd.MAX_FAST_BATCH = MAX_FAST
    try:
        fast = LLM(model_dir, enforce_eager=False, **kw, **fast_kw)
    finally:
        fd.MAX_FAST_BATCH = old
    return eager, fast


def prompts(n, start=11, length=5):
    return [[start + 3 * i + j for j in range(length + 2 * i)] for i in range(n)]


def greedy(max_tokens, logprobs=2):
    return SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True, logprobs=logprobs)


def same(eager_outs, fast_outs, tol=1e-4):
    """Equal greedy tokens, and equal log-probs of them within `tol`."""
    for a, b in zip(eager_outs, fast_outs):
        ca, cb = a.outputs[0], b.outputs[0]
        assert ca.token_ids == cb.token_ids
        if ca.logprobs is not None:
            for step_a, step_b, tok in zip(ca.logprobs, cb.logprobs, ca.token_ids):
                assert step_a[tok].logprob == pytest.approx(step_b[tok].logprob, abs=tol)
