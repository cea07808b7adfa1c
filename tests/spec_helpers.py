"""Shared by the speculative-decoding tests: tiny targets with MTP weights, and one call that runs a batch."""
from __future__ import annotations

import torch

from frontierlm import LLM, SamplingParams


def mtp_model_dir(tmp_path_factory, cache={}):
    """A tiny DeepSeek-V3 (MLA + MoE) whose checkpoint carries one MTP module (random weights)."""
    if "dir" not in cache:
        from factories import make_model_dir
        from test_mla import _add_mtp_weights

        path = make_model_dir(tmp_path_factory.mktemp("v3-mtp"), "deepseek_v3", num_nextn_predict_layers=1)
        _add_mtp_weights(path)
        cache["dir"] = str(path)
    return cache["dir"]


def prompts(vocab=512, lens=(3, 17, 5, 33, 9, 24, 1, 40), shared_prefix=0, seed=0):
    g = torch.Generator().manual_seed(seed)
    prefix = torch.randint(10, vocab, (shared_prefix,), generator=g).tolist()
    return [prefix + torch.randint(10, vocab, (n,), generator=g).tolist() for n in lens]


def greedy(max_tokens=24, n=1):
    return SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True, n=n)


def token_ids(llm: LLM, prompts, params) -> list[list[list[int]]]:
    return [[c.token_ids for c in o.outputs] for o in llm.generate(prompts, params, use_tqdm=False)]


def assert_no_leaks(llm: LLM) -> None:
    engine = llm.llm_engine
    assert engine.kv.pool.num_free_blocks == engine.kv.num_blocks
    assert not engine.kv.req_blocks
    proposer = engine.spec.proposer
    if hasattr(proposer, "kv"):
        proposer.release({})  # what the next round would do with no request running
        assert proposer.kv.pool.num_free_blocks == proposer.kv.num_blocks and not proposer.seqs
