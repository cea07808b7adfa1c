"""The decode fast path (engine/fast_decode.py): compiled static-shape decode steps give the eager path's greedy
tokens and log-probs on dense, MoE and MLA models, across ladder hits / misses / overflow, prefix caching,
preemption and grammar masks, with no recompilation in a steady run. Plus the parts that need no compile:
ladders, input buffers, the in-place paged attention against the reference backend, the CUDA-graph
bookkeeping, and the dtype policy.

Inductor compiles are slow on 2 cores, so each architecture gets one module-scoped engine that every test reuses.
"""
import pytest
import torch

import frontierlm.engine.fast_decode as fd
from frontierlm import LLM, SamplingParams, StructuredOutputsParams
from frontierlm.engine.cuda_graphs import CudaGraphPool
from frontierlm.engine.dtype_policy import choose_dtype, cpu_bf16_feature
from frontierlm.layers.attention import AttentionMetadata, TorchAttentionBackend
from frontierlm.layers.paged_decode import PagedDecodePlan, paged_decode_attention
from fast_helpers import engine_pair, greedy, prompts, same

pytestmark = pytest.mark.usefixtures("one_thread")


def _engines(model_dir):
    eager, fast = engine_pair(model_dir)
    fast.llm_engine.runner.fast_decode.warmup_steps = 0
    return eager, fast


@pytest.fixture(scope="module")
def dense(tiny_model_dir):
    return _engines(tiny_model_dir("llama"))


@pytest.fixture(scope="module")
def mla_moe(tiny_model_dir):  # DeepSeek-V3 shape: MLA attention, MoE layers after the first dense one
    return _engines(tiny_model_dir("deepseek_v3"))


_prompts, _greedy, _same = prompts, greedy, same


def _run_both(pair, prompts, params):
    eager, fast = pair
    f = fast.llm_engine.runner.fast_decode
    before = f.fast_steps
    outs = [llm.generate(prompts, params, use_tqdm=False) for llm in (eager, fast)]
    _same(*outs)
    return f.fast_steps - before


# ---- compiled engines ----------------------------------------------------------------------------------
@pytest.mark.parametrize("n", [1, 3, 6])  # rung 1 hit, 3 -> padded to 4, 6 -> past the top rung (eager) then 4
def test_dense_matches_eager(dense, n):
    # lengths differ, so the batch shrinks as requests finish and crosses rungs mid-run
    assert _run_both(dense, _prompts(n), [_greedy(8 + 3 * i) for i in range(n)]) > 0


@pytest.mark.parametrize("n", [2, 3])
def test_mla_moe_matches_eager(mla_moe, n):
    assert _run_both(mla_moe, _prompts(n), _greedy(10)) > 0
    # padding rows are not counted as routed tokens
    eager, fast = mla_moe
    assert fast.llm_engine.expert_load() == eager.llm_engine.expert_load()


def test_prefix_caching_and_block_boundaries(dense):
    shared = list(range(40, 40 + 19))  # two full blocks of 8 shared, decode crosses into new blocks
    prompts = [shared + [7], shared + [8, 9], shared]
    _run_both(dense, prompts, _greedy(20))
    eager, fast = dense
    assert fast.llm_engine.kv.prefix_hits > 0


def test_preemption(dense):
    eager, fast = dense
    before = fast.llm_engine.scheduler.num_preemptions
    steps = _run_both(dense, _prompts(6, length=30), _greedy(80, logprobs=None))
    assert fast.llm_engine.scheduler.num_preemptions > before and steps > 0


def test_grammar_masks(dense):
    params = SamplingParams(temperature=0, max_tokens=24,
                            structured_outputs=StructuredOutputsParams(regex=r"[a-z]{3,6}( [a-z]{3,6}){3}"))
    eager, fast = dense
    outs = [llm.generate(_prompts(3), params, use_tqdm=False) for llm in (eager, fast)]
    _same(*outs)
    assert all(o.outputs[0].finish_reason == "stop" for o in outs[1])


def test_no_recompilation_in_steady_decode(dense):
    eager, fast = dense
    fast.generate(_prompts(4), _greedy(10), use_tqdm=False)  # every ladder shape of this run is compiled now
    f = fast.llm_engine.runner.fast_decode
    frames = torch._dynamo.utils.counters["frames"]["ok"]
    before = f.fast_steps
    fast.generate(_prompts(4, start=101), _greedy(14, logprobs=None), use_tqdm=False)
    assert f.fast_steps - before >= 10
    assert torch._dynamo.utils.counters["frames"]["ok"] == frames


def test_enforce_eager_turns_it_off(dense):
    eager, _ = dense
    assert eager.llm_engine.runner.fast_decode is None
    assert "enforce_eager" in eager.llm_engine.startup_report


# ---- shared parts, no compile -------------------------------------------------------------------------
def test_ladders():
    assert fd.batch_ladder(256) == [1, 2, 4, 8, 12, 16, 24, 32, 48, 64, 96, 128, 192, 256]
    assert fd.batch_ladder(5) == [1, 2, 4, 5] and fd.batch_ladder(1) == [1]
    assert fd.width_ladder(32) == [8, 16, 32] and fd.width_ladder(3) == [3]
    # CPU's finer widths: at most x1.5 padding, never a rung past the cap
    assert fd.width_ladder(256, fine=True) == [8, 12, 16, 24, 32, 48, 64, 96, 128, 192, 256]
    assert fd.width_ladder(20, fine=True) == [8, 12, 16, 20] and fd.width_ladder(3, fine=True) == [3]
    assert fd.rung([1, 2, 4], 3) == 4 and fd.rung([1, 2, 4], 4) == 4 and fd.rung([1, 2, 4], 5) is None


class _Sched:
    def __init__(self, rows):
        from types import SimpleNamespace as NS
        self.scheduled = [NS(request=NS(num_computed_tokens=p, all_token_ids=[0] * p + [t]), block_ids=b,
                             num_new_tokens=1, samples=True) for p, t, b in rows]


def test_decode_inputs_fill_pads_to_the_scratch_block():
    inputs = fd.DecodeInputs(max_seqs=8, max_blocks=6, scratch_block=99, block_size=4, device=torch.device("cpu"))
    inputs.fill(_Sched([(5, 42, [3, 7]), (0, 43, [2])]), batch=4, width=4)
    ids, pos, slots, tables, lens, real = inputs.views(4, 4)
    assert ids.tolist() == [42, 43, 0, 0] and pos.tolist() == [5, 0, 0, 0] and lens.tolist() == [6, 1, 1, 1]
    assert real.tolist() == [1, 1, 0, 0]
    assert slots.tolist() == [7 * 4 + 1, 2 * 4, 99 * 4, 99 * 4]
    assert tables.tolist() == [[3, 7, 99, 99], [2, 99, 99, 99], [99] * 4, [99] * 4]


def test_batch1_fill_writes_what_the_general_fill_writes():
    """The one-row fill (scalar writes) against the array fill, over a table that shrinks below a wider step's
    (stale entries past the width must not show through) and a position on a block boundary."""
    one, rows = (fd.DecodeInputs(max_seqs=4, max_blocks=6, scratch_block=99, block_size=4,
                                 device=torch.device("cpu")) for _ in range(2))
    for p, blocks, width in [(13, [5, 1, 8, 2], 4), (4, [3, 6], 2), (0, [7], 2), (22, [1, 2, 3, 4, 5, 6], 6)]:
        sched = _Sched([(p, 40 + p, blocks)])
        one.fill(sched, batch=1, width=width)
        rows._fill_rows(sched, 1, width)
        assert [t.tolist() for t in one.views(1, width)] == [t.tolist() for t in rows.views(1, width)]
        ids, pos, slots, tables, lens, real = one.views(1, width)
        assert slots.tolist() == [blocks[p // 4] * 4 + p % 4] and tables.tolist()[0][:len(blocks)] == blocks
    assert one.views(1, 2) is one.views(1, 2)  # built once per shape


@pytest.mark.parametrize("window", [None, 5])
def test_paged_decode_attention_matches_reference(window):
    torch.manual_seed(0)
    bs, blocks, hkv, hq, d = 4, 12, 2, 4, 8
    lens = [7, 1, 13]
    cache = torch.randn(2, blocks + 1, bs, hkv, d)
    tables = [[3, 5], [8], [0, 1, 2, 4]]
    q, k, v = torch.randn(3, hq, d), torch.randn(3, hkv, d), torch.randn(3, hkv, d)
    slots = torch.tensor([t[(n - 1) // bs] * bs + (n - 1) % bs for t, n in zip(tables, lens)])
    padded = torch.full((3, 4), blocks, dtype=torch.long)
    for i, t in enumerate(tables):
        padded[i, :len(t)] = torch.tensor(t)
    ref_cache = cache.clone()
    meta = AttentionMetadata(slot_mapping=slots, query_start_loc=torch.tensor([0, 1, 2, 3], dtype=torch.int32),
                             seq_lens=torch.tensor(lens, dtype=torch.int32), block_tables=padded.int(),
                             query_lens_cpu=[1, 1, 1], seq_lens_cpu=lens, max_query_len=1, max_seq_len=max(lens),
                             block_size=bs)
    backend = TorchAttentionBackend()
    ref = backend.forward(q, k, v, ref_cache, backend.plan(meta), 0.3, window)
    plan = PagedDecodePlan(slots, padded, torch.tensor(lens), bs)
    out = paged_decode_attention(q, k, v, cache, plan, 0.3, window)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(cache, ref_cache)


class _FakeGraph:
    """Stands in for torch.cuda.CUDAGraph: replay re-runs what was captured (the forward is pure here)."""
    def __init__(self, log):
        self.log = log

    def replay(self):
        self.log.append("replay")


def test_cuda_graph_pool_bookkeeping():
    log, pools = [], []
    calls = []

    def forward(x):
        calls.append(x.shape[0])
        return x * 2

    from contextlib import contextmanager

    @contextmanager
    def capture(graph, pool, stream):
        log.append(("capture", pool))
        yield

    def pool_factory():
        pools.append(object())
        return pools[-1]

    graphs = CudaGraphPool(forward, graph_factory=lambda: _FakeGraph(log), pool_factory=pool_factory,
                           capture_context=capture, stream_factory=lambda: None)
    buf = torch.arange(8.0)
    graphs.capture_all([((2, 8), (buf[:2],)), ((8, 8), (buf,))])
    assert [e for e in log if e != "replay"] == [("capture", pools[0]), ("capture", pools[0])]  # one pool
    assert calls[:3] == [8, 8, 8]  # largest first: warm-up runs then the capture
    assert len(pools) == 1
    out = graphs.run((2, 8), (buf[:2],))
    assert log[-1] == "replay" and out.tolist() == [0.0, 2.0]
    assert len(calls) == 6  # replay runs nothing eagerly
    with pytest.raises(RuntimeError, match="other input buffers"):
        graphs.run((2, 8), (torch.zeros(2),))


def test_dtype_policy():
    amx = frozenset({"avx512f", "amx_bf16", "amx_tile", "avx512_bf16"})
    avx2 = frozenset({"avx2", "fma"})
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert cpu_bf16_feature(amx) == "AMX" and cpu_bf16_feature(frozenset({"avx512_bf16"})) == "AVX512-BF16"
    assert cpu_bf16_feature(avx2) is None
    assert choose_dtype(torch.bfloat16, cpu, amx)[0] == torch.bfloat16
    dtype, reason = choose_dtype(torch.bfloat16, cpu, avx2)
    assert dtype == torch.float32 and "no AMX or AVX512-BF16" in reason
    assert choose_dtype(torch.float32, cpu, amx)[0] == torch.float32
    assert choose_dtype(torch.float16, cpu, amx)[0] == torch.float32
    assert choose_dtype(torch.bfloat16, cuda, avx2)[0] == torch.bfloat16


def test_auto_dtype_in_startup_report(tmp_path):
    from factories import make_model_dir

    llm = LLM(str(make_model_dir(tmp_path, "llama", dtype=torch.bfloat16)), enforce_eager=True, max_num_seqs=2)
    report = llm.llm_engine.startup_report
    expected = torch.bfloat16 if cpu_bf16_feature() else torch.float32
    assert llm.llm_engine.model_config.dtype == expected
    assert f"dtype {expected}:" in report
