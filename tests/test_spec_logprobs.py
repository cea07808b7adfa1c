"""Requests that ask for logprobs speculate, and get one entry per kept token: greedy entries (token, top N,
ranks, cumulative log-prob) and prompt logprobs equal those of decoding without speculation, for every proposer,
also when a stop rule ends the output inside a step's accepted proposals; sampled entries are the target's
distribution after the sampler's stages (temperature, top-k), checked against transformers' logits."""
from types import SimpleNamespace

import pytest
import torch

from factories import load_hf_model
from frontierlm import LLM, SamplingParams
from frontierlm.layers.sampler import Sampler
from spec_helpers import mtp_model_dir, prompts

pytestmark = pytest.mark.usefixtures("one_thread")


def _assert_same_logprobs(got, want):
    assert got.token_ids == want.token_ids
    assert len(got.logprobs) == len(got.token_ids)
    for g, w in zip(got.logprobs, want.logprobs):
        assert list(g) == list(w)  # the chosen token first, then the top N in order
        assert [x.rank for x in g.values()] == [x.rank for x in w.values()]
        assert [x.decoded_token for x in g.values()] == [x.decoded_token for x in w.values()]
        torch.testing.assert_close([x.logprob for x in g.values()], [x.logprob for x in w.values()],
                                   atol=2e-5, rtol=0)
    assert got.cumulative_logprob == pytest.approx(want.cumulative_logprob, abs=1e-4)


@pytest.mark.parametrize("method", ["draft_self", "ngram", "mtp"])
def test_greedy_logprobs_equal_non_speculative(method, tiny_model_dir, tmp_path_factory):
    target = mtp_model_dir(tmp_path_factory) if method == "mtp" else tiny_model_dir("llama")
    spec = {"method": method, "num_speculative_tokens": 3, "adaptive": False}
    if method == "draft_self":
        spec = {**spec, "method": "draft_model", "model": target}
    ps = prompts(lens=(5, 14, 9, 21), seed=7)
    ps[1] = ps[1][:7] * 2  # repeats: n-gram lookup proposes
    base = dict(temperature=0.0, max_tokens=28, ignore_eos=True, logprobs=3)
    plain, llm = LLM(target, block_size=4), LLM(target, block_size=4, speculative_config=spec)
    want = plain.generate(ps, SamplingParams(**base, prompt_logprobs=2), use_tqdm=False)
    got = llm.generate(ps, SamplingParams(**base, prompt_logprobs=2), use_tqdm=False)
    for g, w in zip(got, want):
        _assert_same_logprobs(g.outputs[0], w.outputs[0])
        assert len(g.prompt_logprobs) == len(w.prompt_logprobs) == len(g.prompt_token_ids)
        for gp, wp in zip(g.prompt_logprobs[1:], w.prompt_logprobs[1:]):
            assert list(gp) == list(wp)
            torch.testing.assert_close([x.logprob for x in gp.values()], [x.logprob for x in wp.values()],
                                       atol=2e-5, rtol=0)
    st = llm.llm_engine.spec.stats
    assert st.num_drafts > 0 and st.num_draft_tokens > 0
    if method == "draft_self":
        assert st.num_accepted_tokens > 0.5 * st.num_draft_tokens
        # a stop token or stop string met inside a step's accepted proposals: entries end with the output
        for w in want:
            c = w.outputs[0]
            mid = c.text[len(c.text) // 2:len(c.text) // 2 + 3]
            for stop in ({"stop_token_ids": [c.token_ids[13]]}, {"stop": [mid]}):
                params = SamplingParams(**base, **stop)
                ref = plain.generate([w.prompt_token_ids], params, use_tqdm=False)[0].outputs[0]
                out = llm.generate([w.prompt_token_ids], params, use_tqdm=False)[0].outputs[0]
                assert ref.finish_reason == out.finish_reason == "stop" and out.text == ref.text
                _assert_same_logprobs(out, ref)


def test_sampled_logprobs_are_the_processed_target_distribution(tiny_model_dir):
    target = tiny_model_dir("llama")
    spec = {"method": "draft_model", "model": target, "num_speculative_tokens": 3, "adaptive": False}
    llm = LLM(target, block_size=4, speculative_config=spec)
    params = SamplingParams(temperature=0.8, top_k=40, max_tokens=20, ignore_eos=True, logprobs=2, seed=3)
    ps = prompts(lens=(6, 11, 4), seed=8)
    outs = llm.generate(ps, params, use_tqdm=False)
    st = llm.llm_engine.spec.stats
    assert st.num_accepted_tokens > 0.5 * st.num_draft_tokens  # several tokens, so several entries, per step
    hf, sampler = load_hf_model(target), Sampler(llm.llm_engine.model_config.vocab_size)
    for p, o in zip(ps, outs):
        c = o.outputs[0]
        with torch.no_grad():
            logits = hf(torch.tensor([p + c.token_ids])).logits[0, len(p) - 1:-1].float()
        states = [SimpleNamespace(sampling_params=params, prompt_token_ids=p, output_token_ids=c.token_ids[:j],
                                  generator=None, mirostat_mu=None, bad_words_token_ids=[])
                  for j in range(len(c.token_ids))]
        logp = torch.log_softmax(sampler.processed_logits(logits, states, []), dim=-1)
        assert len(c.logprobs) == len(c.token_ids)
        for j, (tok, entry) in enumerate(zip(c.token_ids, c.logprobs)):
            top = logp[j].topk(2).indices.tolist()
            assert list(entry) == [tok] + [t for t in top if t != tok][:2 - (tok in top)]
            torch.testing.assert_close(entry[tok].logprob, logp[j, tok].item(), atol=1e-4, rtol=0)
            assert entry[tok].rank == int((logp[j] > logp[j, tok]).sum()) + 1
            for t in top:
                torch.testing.assert_close(entry[t].logprob, logp[j, t].item(), atol=1e-4, rtol=0)
