"""Engine behaviour through the public API: request validation, seeds across batch compositions, stop rules,
streaming, abort, priorities, n>1 block sharing, chat, logprobs."""
import pytest
import torch

from frontierlm import LLM, LLMEngine, SamplingParams


@pytest.fixture(scope="module")
def llm(tiny_model_dir):
    return LLM(tiny_model_dir("llama"), block_size=4)


def test_output_order_and_shapes(llm):
    prompts = ["The def statement", [5, 6, 7], {"prompt_token_ids": [9, 10]}, "while loops"]
    outs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=5, ignore_eos=True), use_tqdm=False)
    assert [o.prompt for o in outs] == ["The def statement", None, None, "while loops"]
    assert outs[1].prompt_token_ids == [5, 6, 7]
    assert all(len(o.outputs[0].token_ids) == 5 and o.outputs[0].finish_reason == "length" for o in outs)
    tok = llm.get_tokenizer()
    assert outs[0].prompt_token_ids == tok.encode("The def statement")


def test_never_fitting_requests_rejected(tiny_model_dir):
    d = tiny_model_dir("llama")
    llm = LLM(d, block_size=4, max_model_len=64)
    with pytest.raises(ValueError, match="max_model_len"):
        llm.generate([list(range(10, 60))], SamplingParams(max_tokens=20), use_tqdm=False)
    bpt = llm.llm_engine.model_config.kv_cache_bytes_per_token()
    small = LLM(d, block_size=4, kv_cache_memory_gb=8 * 4 * bpt / 2**30)  # 32 tokens of KV
    with pytest.raises(ValueError, match="never fit in the KV cache"):
        small.generate([list(range(10, 40))], SamplingParams(max_tokens=8), use_tqdm=False)
    # max_tokens=None runs to the end of what the KV cache can hold
    out = small.generate([[11, 12, 13]], SamplingParams(max_tokens=None, ignore_eos=True), use_tqdm=False)
    assert len(out[0].outputs[0].token_ids) == 32 - 3
    assert not small.llm_engine.has_unfinished_requests()


@pytest.mark.parametrize("bad", [
    dict(prompt=[]), dict(prompt=[100000]), dict(prompt=3.5), dict(priority="high"),
])
def test_bad_requests_raise_and_leave_engine_clean(llm, bad):
    engine = llm.llm_engine
    free = engine.kv.pool.num_free_blocks
    with pytest.raises(ValueError):
        engine.add_request(None, bad.get("prompt", [1, 2]), SamplingParams(), priority=bad.get("priority", 0))
    assert not engine.has_unfinished_requests() and engine.kv.pool.num_free_blocks == free


def test_seed_gives_same_tokens_whatever_the_batch(llm):
    seeded = SamplingParams(temperature=1.0, top_p=0.9, seed=1234, max_tokens=12, ignore_eos=True)
    alone = llm.generate([[20, 21, 22]], seeded, use_tqdm=False)[0].outputs[0].token_ids
    others = SamplingParams(temperature=1.0, max_tokens=7, ignore_eos=True)
    mixed = llm.generate([[1, 2, 3, 4, 5], [20, 21, 22], list(range(30, 60))], [others, seeded, others],
                         use_tqdm=False)
    assert mixed[1].outputs[0].token_ids == alone
    other_seed = SamplingParams(temperature=1.0, top_p=0.9, seed=99, max_tokens=12, ignore_eos=True)
    assert llm.generate([[20, 21, 22]], other_seed, use_tqdm=False)[0].outputs[0].token_ids != alone


def test_seeded_sampling_survives_preemption(tiny_model_dir):
    d = tiny_model_dir("llama")
    params = [SamplingParams(temperature=0.8, seed=i, max_tokens=24, ignore_eos=True) for i in range(6)]
    prompts = [list(range(10 + i, 30 + i)) for i in range(6)]
    ref = [o.outputs[0].token_ids for o in LLM(d, block_size=4).generate(prompts, params, use_tqdm=False)]
    big = LLM(d, block_size=4)
    bpt = big.llm_engine.model_config.kv_cache_bytes_per_token()
    tight = LLM(d, block_size=4, kv_cache_memory_gb=20 * 4 * bpt / 2**30)
    got = [o.outputs[0].token_ids for o in tight.generate(prompts, params, use_tqdm=False)]
    assert tight.llm_engine.get_stats()["num_preemptions"] > 0
    assert got == ref


def test_stop_token_ids_eos_and_min_tokens(llm):
    base = llm.generate([[7, 8, 9]], SamplingParams(temperature=0, max_tokens=10, ignore_eos=True),
                        use_tqdm=False)[0].outputs[0].token_ids
    stop_at = base[3]
    out = llm.generate([[7, 8, 9]], SamplingParams(temperature=0, max_tokens=10, stop_token_ids=[stop_at]),
                       use_tqdm=False)[0].outputs[0]
    first = base.index(stop_at)
    assert out.token_ids == base[:first + 1] and out.finish_reason == "stop" and out.stop_reason == stop_at
    # min_tokens bans the stop token until it is reached, so the output runs past its first appearance
    out = llm.generate([[7, 8, 9]], SamplingParams(temperature=0, max_tokens=10, stop_token_ids=[stop_at],
                                                   min_tokens=first + 2), use_tqdm=False)[0].outputs[0]
    assert len(out.token_ids) >= first + 2 and stop_at not in out.token_ids[:first + 2]


def test_stop_string_cut_from_text(llm):
    params = SamplingParams(temperature=0, max_tokens=20, ignore_eos=True)
    full = llm.generate(["for x in"], params, use_tqdm=False)[0].outputs[0]
    text = full.text
    stop = text[5:8]
    assert len(stop) == 3
    out = llm.generate(["for x in"], SamplingParams(temperature=0, max_tokens=20, ignore_eos=True, stop=[stop]),
                       use_tqdm=False)[0].outputs[0]
    assert out.finish_reason == "stop" and out.stop_reason == stop
    assert out.text == text[:text.index(stop)]
    out = llm.generate(["for x in"], SamplingParams(temperature=0, max_tokens=20, ignore_eos=True, stop=[stop],
                                                    include_stop_str_in_output=True), use_tqdm=False)[0].outputs[0]
    assert out.text == text[:text.index(stop) + 3]


def test_streaming_text_is_monotonic_and_matches_final(llm):
    engine: LLMEngine = llm.llm_engine
    tok = llm.get_tokenizer()
    rid = engine.add_request("stream-1", "Unicode 日本語 ✓ text", SamplingParams(temperature=0.7, seed=3,
                                                                              max_tokens=30, ignore_eos=True))
    seen = ""
    final = None
    while engine.has_unfinished_requests():
        for out in engine.step():
            assert out.request_id == rid
            text = out.outputs[0].text
            assert text.startswith(seen)
            seen = text
            final = out
    assert final.finished and final.outputs[0].text == tok.decode(final.outputs[0].token_ids,
                                                                  skip_special_tokens=True)


def test_abort_frees_blocks(llm):
    engine = llm.llm_engine
    free = engine.kv.pool.num_free_blocks
    engine.add_request("a", list(range(10, 40)), SamplingParams(max_tokens=50))
    engine.add_request("b", list(range(50, 60)), SamplingParams(max_tokens=3, ignore_eos=True))
    engine.step()
    assert engine.kv.pool.num_free_blocks < free
    engine.abort_request("a")
    while engine.has_unfinished_requests():
        engine.step()
    assert engine.kv.pool.num_free_blocks == free and not engine.scheduler.requests


def test_priority_orders_admission(tiny_model_dir):
    llm = LLM(tiny_model_dir("llama"), block_size=4, max_num_seqs=1)
    engine = llm.llm_engine
    params = SamplingParams(max_tokens=2, ignore_eos=True)
    engine.add_request("low", [1, 2, 3], params, priority=5)
    engine.add_request("high", [4, 5, 6], params, priority=-1)
    order = []
    while engine.has_unfinished_requests():
        order += [o.request_id for o in engine.step() if o.finished]
    assert order == ["high", "low"]


def test_n_samples_share_prompt_blocks(llm):
    engine = llm.llm_engine
    prompt = list(range(100, 140))  # 10 full blocks
    engine.add_request("n3", prompt, SamplingParams(n=3, temperature=1.0, seed=0, max_tokens=4, ignore_eos=True))
    engine.step()
    tables = [engine.kv.block_ids(f"n3#{i}") for i in range(3)]
    assert tables[0][:9] == tables[1][:9] == tables[2][:9]
    assert all(engine.kv.pool.blocks[b].ref_cnt == 3 for b in tables[0][:9])
    outs = None
    while engine.has_unfinished_requests():
        outs = engine.step() or outs
    assert len(outs[0].outputs) == 3 and len({tuple(c.token_ids) for c in outs[0].outputs}) > 1


def test_chat_uses_template(llm):
    msgs = [{"role": "user", "content": "hi"}]
    out = llm.chat(msgs, SamplingParams(temperature=0, max_tokens=3), use_tqdm=False)[0]
    tok = llm.get_tokenizer()
    expected = tok.encode(tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True),
                          add_special_tokens=False)
    assert out.prompt_token_ids == expected
    assert len(llm.chat([msgs, msgs], SamplingParams(max_tokens=2), use_tqdm=False)) == 2


def test_logprobs_include_sampled_token(llm):
    out = llm.generate([[3, 4, 5]], SamplingParams(temperature=1.0, seed=7, max_tokens=6, logprobs=3),
                       use_tqdm=False)[0].outputs[0]
    assert len(out.logprobs) == len(out.token_ids)
    for tid, entry in zip(out.token_ids, out.logprobs):
        assert tid in entry and 3 <= len(entry) <= 4
        ranks = sorted(lp.rank for t, lp in entry.items() if t != tid)
        assert ranks[:3] == [1, 2, 3][:len(ranks)]
    assert out.cumulative_logprob == pytest.approx(sum(e[t].logprob for t, e in zip(out.token_ids, out.logprobs)),
                                                   abs=1e-4)


def test_prefix_cache_stats_count_admitted_requests(tiny_model_dir):
    llm = LLM(tiny_model_dir("llama"), block_size=4)
    prompt = list(range(200, 218))  # 18 tokens: 4 full blocks may hit
    params = SamplingParams(temperature=0, max_tokens=2, ignore_eos=True)
    llm.generate([prompt], params, use_tqdm=False)
    out = llm.generate([prompt], params, use_tqdm=False)[0]
    stats = llm.llm_engine.get_stats()
    assert out.num_cached_tokens == 16
    assert stats["prefix_cache_queries"] == 36 and stats["prefix_cache_hits"] == 16


@pytest.mark.parametrize("arch", ["llama", "deepseek_v3"])
def test_dummy_load_format_needs_only_config_json(tiny_model_dir, tmp_path, arch):
    """vLLM's load_format="dummy": random weights from config.json alone (real shapes, nothing to download)."""
    import shutil

    shutil.copy(f"{tiny_model_dir(arch)}/config.json", tmp_path / "config.json")
    with pytest.raises(FileNotFoundError, match="safetensors"):
        LLM(str(tmp_path))
    llm = LLM(str(tmp_path), load_format="dummy", block_size=4)
    model = llm.llm_engine.runner.model
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert float(model.model.norm.weight.detach().min()) == 1.0  # norms start at one, matrices random
    out = llm.generate([[5, 6, 7]], SamplingParams(max_tokens=4, temperature=0, ignore_eos=True), use_tqdm=False)
    assert len(out[0].outputs[0].token_ids) == 4
    with pytest.raises(ValueError, match="load_format"):
        LLM(str(tmp_path), load_format="pt-bin")
