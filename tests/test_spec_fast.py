"""Speculation through the static-shape paths: verification steps as rows of one-token decodes
(spec/fast_verify.py), the draft model's rows through the target's decode fast path and the MTP module's rows
(spec/mtp_fast.py) give exactly the eager path's greedy tokens. The static-shape code runs uncompiled for every
proposer (padding, ladders, scratch blocks, hidden states for MTP). The same run compiled by inductor takes ~4.5
minutes on one core of the 2-core box, so it runs only with FRONTIERLM_COMPILE_TESTS=1 (benchmarks/spec_decode.py
--compiled checks every compiled run against the plain one too)."""
import os

import pytest

from frontierlm import LLM
from spec_helpers import assert_no_leaks, greedy, mtp_model_dir, prompts, token_ids

pytestmark = pytest.mark.usefixtures("one_thread")


def _engines(method, tiny_model_dir, tmp_path_factory, compiled):
    target = mtp_model_dir(tmp_path_factory) if method == "mtp" else tiny_model_dir("llama")
    spec = {"method": method, "num_speculative_tokens": 2, "adaptive": False}
    if method == "draft_model":
        spec["model"] = tiny_model_dir("llama", num_hidden_layers=1)
    ref = LLM(target, block_size=4, enforce_eager=True)
    llm = LLM(target, block_size=4, max_num_seqs=4, enforce_eager=False, speculative_config=spec)
    spec_decoder = llm.llm_engine.spec
    paths = [spec_decoder.fast] + ([spec_decoder.proposer.fast] if method != "ngram" else [])
    assert all(p is not None for p in paths)
    for p in paths:
        p.warmup_steps = 0
        if not compiled:  # the static-shape forward itself, without inductor
            p._compiled = p._forward
    eager = LLM(target, block_size=4, enforce_eager=True, speculative_config=spec)
    assert eager.llm_engine.spec.fast is None and getattr(eager.llm_engine.spec.proposer, "fast", None) is None
    return ref, llm, paths


def _check(ref, llm, paths):
    ps, params = prompts(lens=(5, 9, 3), seed=23), greedy(max_tokens=16)
    ps[1] = ps[1][:4] * 3  # repeats: n-gram lookup proposes
    want = token_ids(ref, ps, params)
    assert token_ids(llm, ps, params) == want
    assert token_ids(llm, ps[:1], params) == want[:1]  # batch 1
    assert all(p.fast_steps > 5 for p in paths)
    assert llm.llm_engine.spec.stats.num_drafts > 5
    assert_no_leaks(llm)


@pytest.mark.parametrize("method", ["mtp", "draft_model", "ngram"])
def test_static_shape_paths_match_eager(method, tiny_model_dir, tmp_path_factory):
    ref, llm, paths = _engines(method, tiny_model_dir, tmp_path_factory, compiled=False)
    _check(ref, llm, paths)
    # CPU verification steps run their rows unpadded: batch 1 with K = 2 is a 3-row step, not 4
    assert 3 in {batch for batch, _ in paths[0]._seen}


@pytest.mark.skipif(not os.environ.get("FRONTIERLM_COMPILE_TESTS"), reason="inductor compiles: set "
                    "FRONTIERLM_COMPILE_TESTS=1")
def test_compiled_mtp_matches_eager(tiny_model_dir, tmp_path_factory):
    _check(*_engines("mtp", tiny_model_dir, tmp_path_factory, compiled=True))
