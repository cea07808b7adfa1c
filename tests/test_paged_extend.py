"""Extend attention that reads the paged cache in place (layers/paged_extend.py): the same outputs as the
gathering path for dense, GQA, MQA and sliding-window attention and for MLA (absorbed and decompressed
prefixes), over block tables that are contiguous, descending or scattered, with partial last blocks; and
through the engine, chunked prefill and prefix-cache hits give the gathering path's tokens and log-probs."""
import random

import pytest
import torch

from frontierlm import LLM, SamplingParams
from frontierlm.config import ModelConfig
from frontierlm.layers import mla as mla_module
from frontierlm.layers.attention import AttentionMetadata, TorchAttentionBackend
from frontierlm.layers.paged_extend import PrefixView
from frontierlm.models.loader import load_model

pytestmark = pytest.mark.usefixtures("one_thread")


def _meta(qlens, slens, tables, bs, num_pad=0):
    slots = []
    for q, s, t in zip(qlens, slens, tables):
        slots += [t[p // bs] * bs + p % bs for p in range(s - q, s)]
    width = max(len(t) for t in tables) + 1
    return AttentionMetadata(
        slot_mapping=torch.tensor(slots + [-1] * num_pad), block_tables=torch.tensor(
            [t + [0] * (width - len(t)) for t in tables], dtype=torch.int32),
        query_start_loc=torch.tensor([0] + torch.tensor(qlens).cumsum(0).tolist(), dtype=torch.int32),
        seq_lens=torch.tensor(slens, dtype=torch.int32), query_lens_cpu=list(qlens), seq_lens_cpu=list(slens),
        max_query_len=max(qlens), max_seq_len=max(slens), block_size=bs)


def test_prefix_view_groups_rows_contiguous_in_memory(monkeypatch):
    monkeypatch.setattr(PrefixView, "MIN_VIEW_ROWS", 0)
    bs = 4
    # descending physical blocks (a table from the tail-first free list) form one range
    view = PrefixView([9, 8, 7], 12, 5, bs, None, torch.device("cpu"))
    assert view.ranges == [(28, 12)] and view.masks == [None] and view.num_queries == 5
    # a partial last block (prefix 10 = 2 full blocks + 2 rows) is read only up to the prefix: the rest of
    # block 7 holds the chunk's own rows, so it does not join block 8
    view = PrefixView([9, 8, 7], 10, 5, bs, None, torch.device("cpu"))
    assert view.ranges == [(28, 2), (32, 8)]
    # scattered blocks: one range per run of adjacent blocks, in physical order
    view = PrefixView([3, 4, 10, 1], 16, 2, bs, None, torch.device("cpu"))
    assert view.ranges == [(4, 4), (12, 8), (40, 4)]
    # a window of 6 over a prefix of 10: keys 5..9 are the only ones a query can see, and only the first
    # 5 queries (positions 10..14) see any of them; key p is visible to query q when p > q - 6
    view = PrefixView([2, 5, 7], 10, 8, bs, 6, torch.device("cpu"))
    assert view.num_queries == 5 and view.ranges == [(21, 3), (28, 2)]
    for mask, keys in zip(view.masks, [(5, 6, 7), (8, 9)]):  # queries 13, 14 see no key of the first range
        visible = [[float(m) == 0 for m in row] for row in mask]
        assert visible == [[p > q - 6 for p in keys] for q in range(10, 15)]
    assert view.empty[0].tolist() == [False, False, False, True, True] and view.empty[1] is None


def test_prefix_view_gathers_short_runs(monkeypatch):
    monkeypatch.setattr(PrefixView, "MIN_VIEW_ROWS", 8)
    view = PrefixView([3, 4, 10, 1, 20], 19, 2, 4, None, torch.device("cpu"))
    assert view.ranges == [(12, 8)]  # blocks 3, 4; the rest (1, 10, and 3 rows of 20) is one gathered part
    assert view.parts[1].tolist() == [4, 5, 6, 7, 40, 41, 42, 43, 80, 81, 82]
    flat = torch.arange(100.0)[:, None]
    assert view.read(flat, 1).squeeze(1).tolist() == view.parts[1].tolist()
    assert view.read(flat, 0).data_ptr() == flat[12].data_ptr()  # in place: a view of the cache


CASES = {  # (query heads, kv heads, window)
    "mha": (4, 4, None), "gqa": (4, 2, None), "mqa": (6, 1, None),
    "window-3": (4, 2, 3), "window-6": (4, 2, 6), "window-long": (4, 2, 100),
}


@pytest.mark.parametrize("min_view_rows", [0, 8, 10**6], ids=["views", "mixed", "gathered"])
@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_dense_extend_matches_gathering_path(monkeypatch, case, dtype, min_view_rows):
    monkeypatch.setattr(PrefixView, "MIN_VIEW_ROWS", min_view_rows)
    hq, hkv, window = CASES[case]
    torch.manual_seed(0)
    bs, d, num_blocks = 4, 16, 40
    # (query len, context len, table): an extend with a partial prefix block, one aligned to a block, one
    # with a descending table, one scattered, a 1-token decode and a prefill without a prefix among them
    seqs = [(5, 23, [17, 18, 19, 20, 21, 22]), (8, 16, [30, 31, 32, 33]), (1, 9, [0, 1, 2]),
            (6, 13, [12, 11, 10, 9]), (7, 30, [3, 25, 4, 26, 27, 5, 39, 6]), (4, 4, [35])]
    qlens, slens, tables = zip(*seqs)
    meta = _meta(qlens, slens, tables, bs, num_pad=2)
    t = sum(qlens) + 2
    q, k, v = (torch.randn(t, h, d).to(dtype) for h in (hq, hkv, hkv))
    cache = torch.randn(2, num_blocks, bs, hkv, d).to(dtype)
    ref_cache = cache.clone()
    old = TorchAttentionBackend(extend_in_place=False)
    ref = old.forward(q, k, v, ref_cache, old.plan(meta), 0.3, window)
    new = TorchAttentionBackend()
    plan = new.plan(meta)
    assert plan.extend_in_place and sum(b is not None for b in plan._host_blocks) == 4
    out = new.forward(q, k, v, cache, plan, 0.3, window)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(out, ref, atol=tol, rtol=0)
    torch.testing.assert_close(cache, ref_cache, atol=0, rtol=0)


def _mla_layer(tiny_model_dir, arch):
    model = load_model(ModelConfig.from_pretrained(tiny_model_dir(arch)), "cpu")
    return model, model.model.layers[0].self_attn, model.model.rotary_emb


@pytest.mark.parametrize("min_view_rows", [0, 10**6], ids=["views", "gathered"])
@pytest.mark.parametrize("absorb", [True, False], ids=["absorbed", "decompressed"])
@pytest.mark.parametrize("arch", ["deepseek_v2", "deepseek_v3"])
@torch.inference_mode()
def test_mla_extend_matches_decompressed_attention(tiny_model_dir, monkeypatch, arch, absorb, min_view_rows):
    """One MLA layer fed a 27-token sequence in chunks of 9, 1, 7 and 10 tokens over a scattered block table:
    every row equals plain causal attention over the whole sequence, and the gathering path's output."""
    monkeypatch.setattr(mla_module, "absorb_prefix", lambda layer, n: absorb)
    monkeypatch.setattr(PrefixView, "MIN_VIEW_ROWS", min_view_rows)
    model, attn, rotary = _mla_layer(tiny_model_dir, arch)
    bs, n = 4, 27
    table = [5, 2, 3, 9, 8, 0, 1]
    x = torch.randn(n, model.config.hidden_size, generator=torch.Generator().manual_seed(0))
    pos = torch.arange(n)
    full = attn(x, model.model.rope(pos, None), rotary, None)
    outs = {}
    for in_place in (True, False):
        model.attn_backend.extend_in_place = in_place
        attn.bind_kv_cache(torch.zeros(attn.kv_cache_shape(10, bs)))
        done, rows = 0, []
        for q in (9, 1, 7, 10):
            meta = _meta([q], [done + q], [table[:-(-(done + q) // bs)]], bs)
            sl = slice(done, done + q)
            rows.append(attn(x[sl], model.model.rope(pos[sl], meta), rotary, model.attn_backend.plan(meta)))
            done += q
        outs[in_place] = torch.cat(rows)
    model.attn_backend.extend_in_place = None
    torch.testing.assert_close(outs[True], full, atol=1e-5, rtol=0)
    torch.testing.assert_close(outs[True], outs[False], atol=1e-5, rtol=0)


def test_absorb_prefix_cost_model():
    class Shape:  # DeepSeek-V3's MLA: absorbed wins for short chunks, decompression for long ones
        kv_lora_rank, qk_nope_head_dim, qk_rope_head_dim, v_head_dim = 512, 128, 64, 128
    assert mla_module.absorb_prefix(Shape, 16) and mla_module.absorb_prefix(Shape, 160)
    assert not mla_module.absorb_prefix(Shape, 200) and not mla_module.absorb_prefix(Shape, 2048)


# ---- through the engine: chunked prefill and prefix-cache hits, in place vs gathering ----------------------
ENGINE_ARCHS = {"llama": {}, "qwen3-mqa": {"num_key_value_heads": 1}, "mistral-window": {"sliding_window": 12},
                "deepseek_v3": {}}


def _engine_prompts(seed=5):
    rng = random.Random(seed)
    shared = [rng.randrange(10, 500) for _ in range(45)]
    return [shared + [rng.randrange(10, 500) for _ in range(n)] for n in (3, 30, 11, 52, 19)]


@pytest.mark.parametrize("min_view_rows", [0, PrefixView.MIN_VIEW_ROWS], ids=["views", "default"])
@pytest.mark.parametrize("name", list(ENGINE_ARCHS))
def test_engine_chunked_prefill_and_prefix_hits_match_gathering(tiny_model_dir, monkeypatch, name, min_view_rows):
    monkeypatch.setattr(PrefixView, "MIN_VIEW_ROWS", min_view_rows)
    arch = name.split("-")[0]
    path = tiny_model_dir(arch, **ENGINE_ARCHS[name])
    params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True, logprobs=3)
    prompts = _engine_prompts()
    results = {}
    for in_place in (True, False):
        llm = LLM(path, block_size=4, max_num_batched_tokens=16, max_num_seqs=3)
        llm.llm_engine.runner.model.attn_backend.extend_in_place = in_place
        first = llm.generate(prompts, params, use_tqdm=False)  # chunks of 16 over a growing cached prefix
        again = llm.generate(prompts, params, use_tqdm=False)  # prefix-cache hits for every prompt
        assert all(o.num_cached_tokens >= 44 for o in again)
        results[in_place] = first + again
    for a, b in zip(results[True], results[False]):
        ca, cb = a.outputs[0], b.outputs[0]
        assert ca.token_ids == cb.token_ids
        for step_a, step_b in zip(ca.logprobs, cb.logprobs):
            assert step_a.keys() == step_b.keys()
            for tid in step_a:
                assert step_a[tid].logprob == pytest.approx(step_b[tid].logprob, abs=1e-4)
