"""Tensor, pipeline and expert parallelism over gloo on loopback: greedy tokens and first-step log-probs of
every layout equal transformers' (the oracle of test_engine_parity; log-probs within 1e-4, since the ranks'
partial sums are added in a different order) with chunked prefill, prefix caching and preemption in the same
run. One thread per rank; each engine starts its workers as processes."""
import pytest
import torch

from frontierlm import LLM
from test_engine_parity import check, greedy, hf_reference, prompts_for

pytestmark = pytest.mark.usefixtures("one_thread", "dist_timeout")

LAYOUTS = [
    # (arch, model overrides, parallel flags)
    ("llama", {"num_key_value_heads": 1}, dict(tensor_parallel_size=2)),  # fewer KV heads than ranks: replicated
    ("llama", {}, dict(pipeline_parallel_size=2)),
    ("qwen3_moe", {}, dict(tensor_parallel_size=2)),
    ("qwen3_moe", {}, dict(tensor_parallel_size=2, enable_expert_parallel=True)),
    ("deepseek_v2", {}, dict(tensor_parallel_size=2)),
    ("deepseek_v2", {}, dict(tensor_parallel_size=2, enable_expert_parallel=True)),
    ("deepseek_v2", {}, dict(pipeline_parallel_size=2)),
]


@pytest.fixture(scope="module")
def hf_cache():
    return {}


def _run_all_features(llm, ref, prompts):
    """Chunked prefill (8-token budget), preemption (24 blocks of 4 for 8 requests of up to 72 tokens), then
    the same prompts again: the shared 20-token prefix comes from the prefix cache."""
    check(llm.generate(prompts, greedy(), use_tqdm=False), ref)
    stats = llm.llm_engine.get_stats()
    assert stats["num_preemptions"] > 0
    outs = llm.generate(prompts, greedy(), use_tqdm=False)
    check(outs, ref)
    assert any(o.num_cached_tokens > 0 for o in outs)


def _rank_share(mc, flags) -> float:
    """The largest fraction of the whole model's KV bytes per token that one rank caches: the layers of the
    first (largest) stage, times its KV heads (split over TP, one replicated head when there are fewer heads
    than ranks; MLA's latent is whole on every rank)."""
    tp, pp = flags.get("tensor_parallel_size", 1), flags.get("pipeline_parallel_size", 1)
    layers = -(-mc.num_layers // pp) / mc.num_layers
    heads = 1.0 if mc.is_mla else max(mc.num_kv_heads // tp, 1) / mc.num_kv_heads
    return layers * heads


def _budget(d, flags, blocks=24, block_size=4) -> float:
    """Each rank's KV budget for `blocks` blocks of its own share of the cache."""
    from frontierlm.config import ModelConfig

    mc = ModelConfig.from_pretrained(d, load_format="dummy")
    return blocks * block_size * mc.kv_cache_bytes_per_token() * _rank_share(mc, flags) / 2**30


@pytest.mark.parametrize("arch,overrides,flags", LAYOUTS,
                         ids=[f"{a}-{'-'.join(f'{k}{v}' for k, v in f.items())}{'-mqa' if o else ''}"
                              for a, o, f in LAYOUTS])
def test_parallel_layout_matches_transformers(arch, overrides, flags, tiny_model_dir, hf_cache):
    d = tiny_model_dir(arch, **overrides)
    prompts = prompts_for(shared_prefix=20, seed=1)
    ref = hf_reference(hf_cache, d, prompts)
    llm = LLM(d, block_size=4, max_num_batched_tokens=8, kv_cache_memory_gb=_budget(d, flags), **flags)
    try:
        assert llm.llm_engine.kv.num_blocks == 24  # sized from each rank's own share of the cache
        _run_all_features(llm, ref, prompts)
        if flags.get("pipeline_parallel_size"):  # the scheduler kept a batch in each stage
            assert llm.llm_engine.pipeline.max_in_flight == 2
        if flags.get("enable_expert_parallel"):
            load = llm.llm_engine.expert_load_per_rank()
            assert len(load[0]) == 2 and all(sum(row) > 0 for row in load)
    finally:
        llm.llm_engine.shutdown()


def test_tp2_x_pp2_four_ranks(tiny_model_dir, hf_cache):
    """4 ranks on loopback; the 2 KV heads are split, one per TP rank, and each stage has 1 of the 2 layers:
    a rank caches a quarter of the model's KV, so the budget that gives one process 10 blocks gives 40."""
    d = tiny_model_dir("llama")
    prompts = prompts_for(n=4, seed=2)
    ref = hf_reference(hf_cache, d, prompts)
    budget = _budget(d, {}, blocks=10)
    assert LLM(d, block_size=4, kv_cache_memory_gb=budget).llm_engine.kv.num_blocks == 10
    llm = LLM(d, block_size=4, max_num_batched_tokens=16, tensor_parallel_size=2, pipeline_parallel_size=2,
              kv_cache_memory_gb=budget)
    try:
        assert "parallel: TP=2 x PP=2, 4 ranks on 1 node(s), gloo" in llm.llm_engine.startup_report
        assert llm.llm_engine.kv.num_blocks == 40
        assert "[40, 40, 40, 40] blocks fit" in llm.llm_engine.startup_report
        import os

        assert "WORLD_SIZE" not in os.environ  # the trainer reads it as "running under torchrun"
        check(llm.generate(prompts, greedy(), use_tqdm=False), ref)
    finally:
        llm.llm_engine.shutdown()


@pytest.mark.parametrize("flags,message", [
    (dict(tensor_parallel_size=3), "tensor_parallel_size=3 does not divide the model's 4 attention heads"),
    (dict(tensor_parallel_size=4), "tensor_parallel_size=4 and the model's 2 KV heads"),  # see below
    (dict(pipeline_parallel_size=3), "pipeline_parallel_size=3 is more than the model's 2 layers"),
    (dict(tensor_parallel_size=2, enable_expert_parallel=True), "has no experts"),
    (dict(tensor_parallel_size=2, nnodes=2), "several nodes need --master-port"),
])
def test_start_up_errors_name_the_numbers(flags, message, tiny_model_dir):
    if flags.get("tensor_parallel_size") == 4:  # 4 ranks over 2 KV heads replicate: fine, so use 3 KV heads
        d, message = tiny_model_dir("llama", num_attention_heads=12, num_key_value_heads=3, hidden_size=96), \
            "tensor_parallel_size=4 and the model's 3 KV heads"
    else:
        d = tiny_model_dir("llama")
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        LLM(d, **flags)


def test_expert_parallel_experts_are_split(tiny_model_dir):
    """EP rank r reads only experts [4r, 4r + 4) of 8; TP slices every expert's intermediate size."""
    from frontierlm.distributed.moe import ExpertParallelExperts, TensorParallelExperts

    ep = ExpertParallelExperts(8, 64, 32, "silu", rank=1, size=2)
    assert ep.w13.shape == (4, 64, 64) and ep.first == 4
    tp = TensorParallelExperts(8, 64, 32, "silu", rank=1, size=2)
    assert tp.w13.shape == (8, 32, 64) and tp.w2.shape == (8, 64, 16)
    full = torch.arange(8 * 64 * 32, dtype=torch.float32).view(8, 64, 32)  # w2 stacked [E, H, I]
    tp._load_w2(tp.w2, full)
    assert torch.equal(tp.w2.data, full[:, :, 16:])
    ep._load_w2(ep.w2, full)
    assert torch.equal(ep.w2.data, full[4:])


def test_expert_load_per_rank_in_metrics():
    from frontierlm.server.metrics import ServerMetrics

    m = ServerMetrics("tiny")
    m.expert_snapshot = ([1, 2], [[1, 2, 3, 4, 5, 6, 7, 8], [0, 0, 0, 1, 9, 0, 0, 0]])
    m.expert_parallel_ranks = 2
    text = m.render()[0].decode()
    assert 'frontierlm:moe_rank_tokens_total{layer="1",model_name="tiny",rank="0"} 10.0' in text
    assert 'frontierlm:moe_rank_tokens_total{layer="1",model_name="tiny",rank="1"} 26.0' in text
    assert 'frontierlm:moe_rank_tokens_total{layer="2",model_name="tiny",rank="1"} 9.0' in text


def test_a_hung_worker_fails_the_step_within_the_timeout(tiny_model_dir, monkeypatch):
    """A worker that stops answering (SIGSTOP) ends the next step with WorkerFailure after the collective
    timeout, and the engine stays failed (check_health raises) instead of hanging."""
    import os
    import signal
    import time

    from frontierlm import SamplingParams
    from frontierlm.distributed.executor import WorkerFailure

    monkeypatch.setenv("FRONTIERLM_DIST_TIMEOUT_S", "10")
    llm = LLM(tiny_model_dir("llama"), tensor_parallel_size=2)
    try:
        params = SamplingParams(max_tokens=3)
        assert len(llm.generate([[5, 6, 7]], params, use_tqdm=False)[0].outputs[0].token_ids) == 3
        worker = llm.llm_engine.runner.parallel.procs[0]
        os.kill(worker.pid, signal.SIGSTOP)
        t = time.monotonic()
        with pytest.raises(WorkerFailure, match="no answer within 10s"):
            llm.generate([[5, 6, 7]], params, use_tqdm=False)
        assert time.monotonic() - t < 40
        with pytest.raises(WorkerFailure):
            llm.llm_engine.check_health()
        assert worker.poll() is not None  # killed, not left stopped
    finally:
        llm.llm_engine.shutdown()


def test_each_rank_reads_only_its_shard_from_safetensors(tmp_path):
    """The parallel loaders take a lazy safetensors slice: rank 1 of 2 gets its rows / columns / heads, and the
    packed q/k/v loader replicates the single KV head when there are fewer KV heads than ranks."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    from frontierlm.distributed.layers import (ColumnParallelLinear, QKVParallelLinear, RowParallelLinear,
                                               VocabParallelEmbedding)
    from frontierlm.distributed.state import ParallelContext, building

    w = torch.arange(12 * 8, dtype=torch.float32).view(12, 8)
    k = torch.arange(4 * 8, dtype=torch.float32).view(4, 8) + 1000  # one KV head of dim 4
    save_file({"w": w, "k": k, "emb": torch.arange(5 * 8, dtype=torch.float32).view(5, 8)}, tmp_path / "t.safetensors")
    with building(ParallelContext(rank=1, tp_size=2)):
        col, row = ColumnParallelLinear(8, 12), RowParallelLinear(12, 8)
        qkv = QKVParallelLinear(8, head_dim=4, num_heads=2, num_kv_heads=1)
        emb = VocabParallelEmbedding(5, 8)
    with safe_open(str(tmp_path / "t.safetensors"), framework="pt") as f:
        assert col.weight.loads_slices
        col.weight.weight_loader(col.weight, f.get_slice("w"))
        row.weight.weight_loader(row.weight, w.T.contiguous())  # a plain tensor works too
        qkv.weight.weight_loader(qkv.weight, f.get_slice("k"), "k")
        emb.weight.weight_loader(emb.weight, f.get_slice("emb"))
    assert torch.equal(col.weight.data, w[6:])
    assert torch.equal(row.weight.data, w.T[:, 6:])
    assert (qkv.num_heads, qkv.num_kv_heads) == (1, 1)
    assert torch.equal(qkv.weight.data[4:8], k)  # the one KV head, replicated on rank 1
    assert torch.equal(emb.weight.data[:2], torch.arange(24, 40, dtype=torch.float32).view(2, 8))
    assert not emb.weight.data[2:].any()  # vocab 5 padded to 2 x 3 rows: the padding row is zero
