"""Quantized checkpoints (`frontierlm quantize`) under tensor / pipeline / expert parallelism (gloo on loopback, one
thread per rank): each rank reads only its own region of the quantized tensors (quant/sharding.py).

Oracle: the single-process engine loading the same quantized checkpoint. Greedy tokens are compared (TP may break
a near tie, as in test_parallel_quant.py); bytes: `model.quant_bytes_read`, the loader's count of checkpoint
bytes read in that process, against the single process's."""

import pytest
import torch

from frontierlm import LLM
from frontierlm.quant.export import quantize_checkpoint
from test_engine_parity import prompts_for
from test_parallel_quant import _budget_gb, _generate, _same_until_a_near_tie
from test_parallel_quant_moe import assert_rank_slice, run_two_ranks
from test_quant_moe import experts_of, load

pytestmark = pytest.mark.usefixtures("one_thread", "dist_timeout")


@pytest.fixture(scope="module")
def checkpoints(tiny_model_dir, tmp_path_factory):
    cache = {}

    def get(arch, scheme, **overrides):
        key = (arch, scheme, tuple(sorted(overrides.items())))
        if key not in cache:
            root = tmp_path_factory.mktemp(f"{arch}-{scheme}")
            cache[key] = quantize_checkpoint(tiny_model_dir(arch, **overrides), root / "q", scheme)["out_dir"]
        return cache[key]

    return get


def _run(d, prompts, **flags):
    llm = LLM(d, block_size=4, kv_cache_memory_gb=_budget_gb(d), **flags)
    try:
        engine = llm.llm_engine
        model = engine.runner.parallel.local_model if flags else engine.runner.model
        return _generate(llm, prompts), model.quant_bytes_read
    finally:
        llm.llm_engine.shutdown()


def _stage0_bytes(d) -> int:
    """Bytes of the quantized tensors stage 0 of two holds: layer 0 and the LM head (rank 0 samples)."""
    from safetensors import safe_open

    from frontierlm.quant.loading import PARTS

    total = 0
    with safe_open(f"{d}/model.safetensors", framework="pt") as f:
        for n in f.keys():
            module, _, leaf = n.rpartition(".")
            if (leaf in PARTS or (leaf == "weight" and f"{module}.weight_scale" in f.keys())) and \
                    (module.startswith("model.layers.0.") or module == "lm_head"):
                t = f.get_slice(n)
                shape = t.get_shape()
                total += int(torch.tensor(shape).prod()) * {"I32": 4, "I64": 8, "F32": 4, "I8": 1,
                                                           "F8_E4M3": 1}[t.get_dtype()]
    return total


@pytest.mark.parametrize("scheme", ["int8", "fp8"])
def test_tp2_and_pp2_quantized_checkpoint_match_one_process(checkpoints, scheme):
    d = checkpoints("llama", scheme)  # 2 KV heads (one per TP rank), 2 layers (one per stage)
    prompts = prompts_for(n=4, seed=3)
    want, full = _run(d, prompts)
    tp, tp_bytes = _run(d, prompts, tensor_parallel_size=2)
    same = sum(_same_until_a_near_tie(o, w) for o, w in zip(tp, want))
    assert same >= len(want) - 1, f"{same}/{len(want)} identical"
    # rank 0 reads half of every quantized matrix; only per-tensor / row-parallel per-channel scales and
    # weight_shape are read whole
    print(f"\n{scheme} tp2: rank 0 read {tp_bytes} of {full} bytes ({tp_bytes / full:.3f})")
    assert 0.5 * full <= tp_bytes < 0.56 * full
    if scheme == "int8":  # PP splits no matmul: identical tokens; stage 0 reads exactly its layers' tensors
        pp, pp_bytes = _run(d, prompts, pipeline_parallel_size=2)
        assert [o.token_ids for o in pp] == [o.token_ids for o in want]
        assert pp_bytes == _stage0_bytes(d) < full


def _build_rank(rank, model_dir, expert_parallel, port, path):
    import torch.distributed as dist

    from frontierlm.distributed.state import ParallelContext, building, init_process_groups

    torch.set_num_threads(1)
    ctx = init_process_groups(ParallelContext(rank=rank, tp_size=2, enable_expert_parallel=expert_parallel),
                              "127.0.0.1", port)
    with building(ctx):
        model = load(model_dir)
    kernels = [{f: torch.stack([k.dequantized() for k in e.quant_method.kernels[f]]) for f in ("w13", "w2")}
               for e in experts_of(model)]
    torch.save({"bytes": model.quant_bytes_read, "experts": kernels}, path)
    dist.destroy_process_group()


def _ranks(model_dir, expert_parallel, tmp_path):
    return run_two_ranks(_build_rank, (model_dir, expert_parallel), tmp_path)


@pytest.mark.parametrize("expert_parallel", [False, True], ids=["tp2", "ep2"])
def test_moe_quantized_checkpoint_shards(checkpoints, tmp_path, expert_parallel):
    """Qwen3-MoE int4 (groups of 32 over 64 intermediate columns: one group per TP rank): each rank's experts
    are exactly the single process's slice (TP: gate / up rows and down columns; EP: whole experts), and each
    rank read about half the quantized bytes."""
    d = checkpoints("qwen3_moe", "int4", moe_intermediate_size=64)
    single = load(d)
    full = [{f: torch.stack([k.dequantized() for k in e.quant_method.kernels[f]]) for f in ("w13", "w2")}
            for e in experts_of(single)]
    ranks = _ranks(d, expert_parallel, tmp_path)
    for r, got in enumerate(ranks):
        ratio = got["bytes"] / single.quant_bytes_read
        print(f"\nrank {r}: read {got['bytes']} of {single.quant_bytes_read} bytes ({ratio:.3f})")
        assert 0.5 <= ratio < 0.65  # attention and the LM head are split by TP in both layouts
        for mine, whole in zip(got["experts"], full):
            assert_rank_slice(mine, whole, r, expert_parallel)


def test_moe_ep2_engine_matches_one_process(checkpoints):
    d = checkpoints("qwen3_moe", "int8", moe_intermediate_size=64)
    prompts = prompts_for(n=4, seed=3)
    want, _ = _run(d, prompts)
    got, _ = _run(d, prompts, tensor_parallel_size=2, enable_expert_parallel=True)
    same = sum(_same_until_a_near_tie(o, w) for o, w in zip(got, want))
    assert same >= len(want) - 1, f"{same}/{len(want)} identical"


def test_group_straddling_ranks_is_refused(checkpoints):
    d = checkpoints("llama", "int4", intermediate_size=96)  # down_proj: 48 columns per rank, groups of 32
    with pytest.raises(ValueError, match=r"columns \[0, 48\) of 96 do not start and end on the checkpoint's "
                                         r"quantization groups of 32"):
        LLM(d, tensor_parallel_size=2, block_size=4, kv_cache_memory_gb=_budget_gb(d))
