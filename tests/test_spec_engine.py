"""Speculative decoding in the engine: configuration errors name the field; rollback after thousands of
rejections leaks no block and leaves the KV of accepted positions equal to a non-speculative run's; grammar
outputs stay valid with the matcher in the state a non-speculative run leaves; seeds stay reproducible;
Mirostat requests do not speculate; the packaged demo model's MTP module and draft are lossless."""
import json

import pytest
import torch

from frontierlm import LLM, SamplingParams, StructuredOutputsParams
from frontierlm.assets import default_draft, default_model
from spec_helpers import assert_no_leaks, greedy, prompts, token_ids

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("cfg,field", [
    ({"method": "medusa", "num_speculative_tokens": 2}, "speculative_config.method"),
    ({"method": "ngram", "num_speculative_tokens": 0}, "speculative_config.num_speculative_tokens"),
    ({"method": "ngram"}, "speculative_config.num_speculative_tokens"),
    ({"method": "draft_model", "num_speculative_tokens": 2}, "speculative_config.model"),
    ({"method": "ngram", "num_speculative_tokens": 2, "prompt_lookup_min": 5, "prompt_lookup_max": 2},
     "speculative_config.prompt_lookup_min"),
    ({"method": "ngram", "num_speculative_tokens": 2, "adaptive": "yes"}, "speculative_config.adaptive"),
    ({"method": "ngram", "num_speculative_tokens": 2, "typo": 1}, "speculative_config: unknown field"),
    ("ngram", "speculative_config must be a dict"),
])
def test_bad_config_is_a_value_error_naming_the_field(cfg, field, tiny_model_dir):
    with pytest.raises(ValueError, match=field.replace("(", r"\(")):
        LLM(tiny_model_dir("llama"), speculative_config=cfg)


def test_draft_and_mtp_refused_at_start_up(tiny_model_dir, tmp_path):
    target = tiny_model_dir("llama")
    other_vocab = tiny_model_dir("llama", vocab_size=640)
    with pytest.raises(ValueError, match=f"draft {other_vocab} has vocab_size 640, the target {target} has 512"):
        LLM(target, speculative_config={"method": "draft_model", "model": other_vocab, "num_speculative_tokens": 2})
    with pytest.raises(ValueError, match="speculative_config.model: .*does not exist"):
        LLM(target, speculative_config={"method": "draft_model", "model": str(tmp_path / "none"),
                                        "num_speculative_tokens": 2})
    with pytest.raises(ValueError, match="has no multi-token-prediction modules"):
        LLM(target, speculative_config={"method": "mtp", "num_speculative_tokens": 2})


def test_thousands_of_rejections_leak_nothing_and_kv_matches(tiny_model_dir):
    target, draft = tiny_model_dir("llama"), tiny_model_dir("llama", num_hidden_layers=1)
    spec = {"method": "draft_model", "model": draft, "num_speculative_tokens": 6, "adaptive": False}
    ps = prompts(lens=(5, 11, 7, 3, 13, 9, 6, 10), seed=3)
    params = greedy(max_tokens=120)
    llm = LLM(target, block_size=4, speculative_config=spec)
    got = token_ids(llm, ps, params)
    st = llm.llm_engine.spec.stats
    assert st.num_draft_tokens - st.num_accepted_tokens > 2000
    assert_no_leaks(llm)
    ref_llm = LLM(target, block_size=4)
    assert got == token_ids(ref_llm, ps, params)
    # the finished requests' full blocks stay in the prefix cache: compare their K/V to the reference run's
    engines = [llm.llm_engine, ref_llm.llm_engine]
    for p, out in zip(ps, got):
        seq = p + out[0]
        blocks = []
        for e in engines:
            from frontierlm.engine.request import Request

            probe = Request("probe", seq, params, 1)
            hit, _ = e.kv.get_computed_blocks(probe)
            blocks.append([b.block_id for b in hit])
        assert len(blocks[0]) == len(blocks[1]) == (len(seq) - 1) // 4
        for layer_a, layer_b in zip(engines[0].runner.kv_caches, engines[1].runner.kv_caches):
            a = layer_a[:, blocks[0]] if layer_a.dim() == 5 else layer_a[blocks[0]]
            b = layer_b[:, blocks[1]] if layer_b.dim() == 5 else layer_b[blocks[1]]
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("method", ["ngram", "draft_model"])
def test_grammar_outputs_valid_and_matcher_state_equal(method, tiny_model_dir):
    target = tiny_model_dir("llama")
    schema = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 12},
                                               "n": {"type": "integer"}}, "required": ["name", "n"]}
    params = SamplingParams(temperature=0.0, max_tokens=60,
                            structured_outputs=StructuredOutputsParams(json=schema))
    spec = {"method": method, "num_speculative_tokens": 4, "adaptive": False}
    if method == "draft_model":
        spec["model"] = target  # its own draft, unmasked: some proposals break the grammar and are rejected
    ps = ["Give me JSON:", "name and n", "{"]

    def run(llm):
        engine = llm.llm_engine
        ids = [engine.add_request(None, p, params) for p in ps]
        reqs = [engine.get_requests(i)[0] for i in ids]
        while engine.has_unfinished_requests():
            engine.step()
        return [r.output_token_ids for r in reqs], [r.grammar for r in reqs], engine

    ref, ref_m, _ = run(LLM(target, block_size=4))
    got, got_m, engine = run(LLM(target, block_size=4, speculative_config=spec))
    assert got == ref
    assert engine.spec.stats.num_drafts > 0
    import xgrammar as xgr

    tok = engine.tokenizer
    for out, m_ref, m_got in zip(got, ref_m, got_m):
        text = tok.decode(out, skip_special_tokens=True)
        if m_got.is_terminated():
            json.loads(text)
        assert m_ref.is_terminated() == m_got.is_terminated()
        masks = xgr.allocate_token_bitmask(2, engine.model_config.vocab_size)
        if not m_ref.is_terminated():
            m_ref.fill_next_token_bitmask(masks, 0)
            m_got.fill_next_token_bitmask(masks, 1)
            assert torch.equal(masks[0], masks[1])


def test_seeded_sampling_reproducible_and_mirostat_does_not_speculate(tiny_model_dir):
    target = tiny_model_dir("llama")
    spec = {"method": "draft_model", "model": target, "num_speculative_tokens": 3}
    params = SamplingParams(temperature=0.9, top_p=0.9, seed=1234, max_tokens=30, ignore_eos=True)
    ps = prompts(lens=(4, 9, 2, 7), seed=5)
    runs = []
    for batch_neighbours in (0, 6):  # reproducible whatever runs beside it
        llm = LLM(target, block_size=4, speculative_config=spec)
        extra = [SamplingParams(temperature=1.0, max_tokens=40, ignore_eos=True)] * batch_neighbours
        outs = token_ids(llm, ps + prompts(seed=9)[:batch_neighbours], [params] * len(ps) + extra)
        runs.append(outs[:len(ps)])
        assert llm.llm_engine.spec.stats.num_accepted_tokens > 0
    assert runs[0] == runs[1]
    llm = LLM(target, block_size=4, speculative_config=spec)
    token_ids(llm, ps, SamplingParams(temperature=1.0, mirostat_mode=2, max_tokens=10, ignore_eos=True))
    st = llm.llm_engine.spec.stats
    assert st.num_drafts == 0 and st.num_mirostat_skipped >= 4 * 9


def test_demo_model_mtp_and_draft_are_lossless():
    ps = ["The class statement", "def foo(x):\n    return", "The for statement is used to iterate", "Lists are mutable"]
    params = greedy(max_tokens=32)
    ref = token_ids(LLM(default_model(), dtype="float32"), ps, params)
    for spec, least in (({"method": "mtp", "num_speculative_tokens": 2}, 0.5),
                        ({"method": "draft_model", "model": default_draft(), "num_speculative_tokens": 3}, 0.15)):
        llm = LLM(default_model(), dtype="float32", speculative_config={**spec, "adaptive": False})
        assert token_ids(llm, ps, params) == ref
        st = llm.llm_engine.spec.stats
        assert st.acceptance_rate > least, st.summary()


def test_stop_strings_and_stop_tokens_inside_accepted_proposals(tiny_model_dir):
    """Several tokens land per step; a stop rule met by one of them ends the output there, as without spec."""
    target = tiny_model_dir("llama")
    ps = prompts(lens=(6, 12, 9), seed=11)
    base = SamplingParams(temperature=0.0, max_tokens=30, ignore_eos=True)
    ref = LLM(target, block_size=4).generate(ps, base, use_tqdm=False)
    spec = {"method": "draft_model", "model": target, "num_speculative_tokens": 4, "adaptive": False}
    llm = LLM(target, block_size=4, speculative_config=spec)
    for o in ref:
        c = o.outputs[0]
        mid = c.text[len(c.text) // 2:len(c.text) // 2 + 3]
        for params in (SamplingParams(temperature=0.0, max_tokens=30, ignore_eos=True, stop=[mid]),
                       SamplingParams(temperature=0.0, max_tokens=30, ignore_eos=True,
                                      stop_token_ids=[c.token_ids[13]])):
            want = LLM(target, block_size=4).generate([o.prompt_token_ids], params, use_tqdm=False)[0].outputs[0]
            got = llm.generate([o.prompt_token_ids], params, use_tqdm=False)[0].outputs[0]
            assert (got.text, got.token_ids, got.finish_reason, got.stop_reason) == \
                (want.text, want.token_ids, want.finish_reason, want.stop_reason)
            assert want.finish_reason == "stop"
    assert llm.llm_engine.spec.stats.num_accepted_tokens > 20
