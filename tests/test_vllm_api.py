"""vLLM's Python API points, each against an oracle: prompt_logprobs and beam search against Hugging Face
transformers, truncate_prompt_tokens against a prompt cut by hand, output_kind against the cumulative stream;
unsupported options are ValueErrors that say so."""
from __future__ import annotations

import pytest
import torch

from frontierlm import LLM, BeamSearchParams, RequestOutputKind, SamplingParams
from factories import load_hf_model

pytestmark = pytest.mark.usefixtures("one_thread")

PROMPT = [348, 388, 474, 12, 99, 7, 250, 31, 64]


@pytest.fixture(scope="module")
def llm(tiny_model_dir):
    return LLM(tiny_model_dir("llama"), block_size=4, max_num_batched_tokens=4)  # 4: prefill in chunks


@pytest.fixture(scope="module")
def hf(tiny_model_dir):
    return load_hf_model(tiny_model_dir("llama"))


def test_prompt_logprobs_match_hf_across_chunks_and_cache(llm, hf):
    with torch.no_grad():
        ref = torch.log_softmax(hf(torch.tensor([PROMPT])).logits[0].float(), -1)
    llm.generate([PROMPT], SamplingParams(max_tokens=1), use_tqdm=False)  # fill the prefix cache first
    out = llm.generate([PROMPT], SamplingParams(max_tokens=2, prompt_logprobs=3, temperature=0), use_tqdm=False)[0]
    plp = out.prompt_logprobs
    assert len(plp) == len(PROMPT) and plp[0] is None
    for pos, entry in enumerate(plp[1:], start=1):
        tok = PROMPT[pos]
        row = ref[pos - 1]
        assert entry[tok].logprob == pytest.approx(float(row[tok]), abs=1e-4)
        assert entry[tok].rank == int((row > row[tok]).sum()) + 1
        assert {t for t, lp in entry.items() if lp.rank <= 3} == set(row.topk(3).indices.tolist())
        assert entry[tok].decoded_token == llm.get_tokenizer().decode([tok])
    # prompt_logprobs=0: only the prompt token itself
    zero = llm.generate([PROMPT[:4]], SamplingParams(max_tokens=1, prompt_logprobs=0), use_tqdm=False)[0]
    assert [list(e) for e in zero.prompt_logprobs[1:]] == [[t] for t in PROMPT[1:4]]


def _hf_beams(hf, prompt, k, n, lp, eos):
    g = hf.generate(torch.tensor([prompt]), num_beams=k, num_return_sequences=k, do_sample=False, max_new_tokens=n,
                    length_penalty=lp, output_scores=True, return_dict_in_generate=True, pad_token_id=3,
                    eos_token_id=eos)
    return g.sequences.tolist(), g.sequences_scores.tolist()


@pytest.mark.parametrize("k,n,lp", [(3, 6, 1.0), (4, 7, 0.5)])
def test_beam_search_matches_hf(llm, hf, k, n, lp):
    out = llm.beam_search([{"prompt_token_ids": PROMPT[:3]}], BeamSearchParams(beam_width=k, max_tokens=n,
                                                                               length_penalty=lp))[0]
    seqs, scores = _hf_beams(hf, PROMPT[:3], k, n, lp, eos=2)
    assert [s.tokens for s in out.sequences] == seqs
    ours = [s.cum_logprob / (len(s.tokens) - 3) ** lp for s in out.sequences]
    assert ours == pytest.approx(scores, abs=1e-4)
    assert all(s.finish_reason == "length" and len(s.logprobs) == n for s in out.sequences)
    assert out.sequences[0].text == llm.get_tokenizer().decode(out.sequences[0].tokens[3:])


def test_beam_search_with_eos_matches_hf(tiny_model_dir, hf):
    """Make a token the best beams like to produce into EOS (same weights, other eos_token_id): hypotheses
    finish early and the early-stop rule decides, as in transformers."""
    base = LLM(tiny_model_dir("llama"), block_size=4)
    first = base.beam_search([PROMPT[:3]], BeamSearchParams(beam_width=3, max_tokens=6))[0].sequences[0]
    eos = first.tokens[3 + 2]
    llm = LLM(tiny_model_dir("llama", eos_token_id=eos), block_size=4)
    for keep in (False, True):
        out = llm.beam_search([PROMPT[:3]], BeamSearchParams(beam_width=3, max_tokens=6,
                                                             include_stop_str_in_output=keep))[0]
        seqs, scores = _hf_beams(hf, PROMPT[:3], 3, 6, 1.0, eos=eos)
        # transformers pads finished hypotheses with pad_token_id after EOS
        seqs = [s[:s.index(eos, 3) + 1] if eos in s[3:] else s for s in seqs]
        assert [s.tokens + ([eos] if s.finish_reason == "stop" and not keep else []) for s in out.sequences] == seqs
        assert any(s.finish_reason == "stop" and s.stop_reason == eos for s in out.sequences)
        ours = [s.cum_logprob / (len(s.logprobs)) for s in out.sequences]
        assert ours == pytest.approx(scores, abs=1e-4)


def test_truncate_prompt_tokens_keeps_the_tail(llm):
    params = SamplingParams(max_tokens=4, temperature=0, ignore_eos=True)
    cut = llm.generate([PROMPT], SamplingParams(max_tokens=4, temperature=0, ignore_eos=True,
                                                truncate_prompt_tokens=4), use_tqdm=False)[0]
    ref = llm.generate([PROMPT[-4:]], params, use_tqdm=False)[0]
    assert cut.prompt_token_ids == PROMPT[-4:] and cut.outputs[0].token_ids == ref.outputs[0].token_ids
    text = llm.generate(["The def statement and the class"], SamplingParams(max_tokens=1, truncate_prompt_tokens=2),
                        use_tqdm=False)[0]
    assert len(text.prompt_token_ids) == 2 and text.prompt == llm.get_tokenizer().decode(text.prompt_token_ids)
    whole = llm.generate([PROMPT], SamplingParams(max_tokens=2, truncate_prompt_tokens=-1), use_tqdm=False)[0]
    assert whole.prompt_token_ids == PROMPT


def test_detokenize_false_gives_ids_only(llm):
    params = SamplingParams(max_tokens=5, temperature=0, ignore_eos=True, logprobs=1)
    a = llm.generate([PROMPT], params, use_tqdm=False)[0].outputs[0]
    b = llm.generate([PROMPT], SamplingParams(max_tokens=5, temperature=0, ignore_eos=True, logprobs=1,
                                              detokenize=False), use_tqdm=False)[0].outputs[0]
    assert b.token_ids == a.token_ids and a.text and b.text == ""
    assert all(lp.decoded_token is None for d in b.logprobs for lp in d.values())
    with pytest.raises(ValueError, match="detokenize"):
        SamplingParams(detokenize=False, stop=["x"])


def test_output_kinds_stream(llm):
    engine = llm.llm_engine

    def stream(kind):
        rid = engine.add_request(None, PROMPT, SamplingParams(max_tokens=6, temperature=0, ignore_eos=True,
                                                              output_kind=kind))
        outs = []
        while engine.has_unfinished_requests():
            outs += [o for o in engine.step() if o.request_id == rid]
        return outs

    cum, delta, final = (stream(k) for k in RequestOutputKind)
    assert len(final) == 1 and final[0].finished
    assert final[0].outputs[0].token_ids == cum[-1].outputs[0].token_ids
    assert sum((o.outputs[0].token_ids for o in delta), []) == cum[-1].outputs[0].token_ids
    assert "".join(o.outputs[0].text for o in delta) == cum[-1].outputs[0].text
    assert len(delta) == len(cum) > 1
    # LLM.generate always returns whole outputs, whatever the kind asked
    got = llm.generate([PROMPT], SamplingParams(max_tokens=6, temperature=0, ignore_eos=True,
                                                output_kind=RequestOutputKind.DELTA), use_tqdm=False)[0]
    assert got.outputs[0].token_ids == cum[-1].outputs[0].token_ids


def test_chat_continue_final_message(llm):
    tok = llm.get_tokenizer()
    conv = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "The class"}]
    out = llm.chat(conv, SamplingParams(max_tokens=2), add_generation_prompt=False, continue_final_message=True,
                   use_tqdm=False)[0]
    assert out.prompt.endswith("<|assistant|>The class")  # left open: no end marker after it
    assert out.prompt_token_ids == tok.encode(out.prompt, add_special_tokens=False)
    plain = llm.chat(conv[:1], SamplingParams(max_tokens=2), add_generation_prompt=False, use_tqdm=False)[0]
    assert not plain.prompt.endswith("<|assistant|>")
    with pytest.raises(ValueError, match="add_generation_prompt=False"):
        llm.chat(conv, continue_final_message=True)
    with pytest.raises(ValueError, match="lora_request"):
        llm.chat(conv, lora_request=object())


def test_bad_words_offline_are_tokenized_by_the_engine(llm):
    from frontierlm.engine.tokenizer import bad_words_token_ids

    tok = llm.get_tokenizer()
    banned = bad_words_token_ids(tok, ["object"])  # the word alone and after a space: one token each here
    bias = {ids[-1]: 100.0 for ids in banned}
    params = dict(max_tokens=6, temperature=0, ignore_eos=True, logit_bias=bias)
    free = llm.generate("The", SamplingParams(**params), use_tqdm=False)[0].outputs[0].token_ids
    assert set(free) <= set(bias)  # the bias alone writes the word
    out = llm.generate("The", SamplingParams(**params, bad_words=["object"]), use_tqdm=False)[0].outputs[0]
    assert not set(out.token_ids) & set(bias) and "object" not in out.text


def test_default_sampling_params_from_generation_config(tiny_model_dir, tmp_path):
    import json
    import shutil

    d = shutil.copytree(tiny_model_dir("llama"), tmp_path / "m")
    cfg = json.loads((d / "generation_config.json").read_text())
    (d / "generation_config.json").write_text(json.dumps({**cfg, "temperature": 0.6, "top_p": 0.9, "top_k": 20,
                                                          "max_new_tokens": 33}))
    p = LLM(str(d)).get_default_sampling_params()
    assert (p.temperature, p.top_p, p.top_k, p.max_tokens, p.min_p) == (0.6, 0.9, 20, 33, 0.0)


def test_engine_surface_and_limits(tiny_model_dir):
    llm = LLM(tiny_model_dir("llama"), max_model_len=64, tensor_parallel_size=1, trust_remote_code=True,
              enforce_eager=True, swap_space=4)
    assert llm.llm_engine.model_config.max_model_len == 64
    assert llm.llm_engine.model_config.max_position_embeddings == 512
    assert llm.llm_engine.get_tokenizer() is llm.get_tokenizer()


@pytest.mark.parametrize("make,match", [
    (lambda d: LLM(d, tensor_parallel_size=2), "tensor_parallel_size=2 is not supported yet"),
    (lambda d: LLM(d, quantization="gptq"), "quantization must be None .* got 'gptq'"),
    (lambda d: LLM(d, kv_cache_dtype="int8"), "kv_cache_dtype must be one of"),
    (lambda d: LLM(d, max_num_seq=4), "unknown argument 'max_num_seq'.*max_num_seqs"),
    (lambda d: SamplingParams(best_of=3), "best_of=3 is not supported yet"),
    (lambda d: SamplingParams(temprature=0.5), "unknown argument 'temprature'.*temperature"),
    (lambda d: SamplingParams(logits_processors=[print]), "LLM\\(..., logits_processors"),
    (lambda d: SamplingParams(output_kind=7), "output_kind"),
    (lambda d: SamplingParams(truncate_prompt_tokens=0), "truncate_prompt_tokens"),
    (lambda d: SamplingParams(prompt_logprobs=-2), "prompt_logprobs"),
    (lambda d: SamplingParams(allowed_token_ids=[]), "allowed_token_ids"),
    (lambda d: BeamSearchParams(beam_width=2), "needs max_tokens"),
    (lambda d: BeamSearchParams(beam_width=0, max_tokens=3), "beam_width"),
    (lambda d: LLM(d).llm_engine.add_request(None, [1, 2], lora_request=object()), "lora_request=.* not supported"),
    (lambda d: LLM(d).generate([1, 2], sampling_param=SamplingParams()), "unknown argument 'sampling_param'.*'sampling_params'"),
])
def test_unsupported_and_unknown_are_value_errors(tiny_model_dir, make, match):
    with pytest.raises(ValueError, match=match):
        make(tiny_model_dir("llama"))
