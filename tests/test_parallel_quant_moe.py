"""MoE experts stay quantized under tensor and expert parallelism (gloo on loopback, one thread per rank): each
rank quantizes its own slice of every expert (TP, cut along the intermediate size) or its own whole experts
(EP) and runs them through quant/moe.py's packed kernels.

Oracle: the single-process engine with the same `quantization=`. Under TP the down projection's rows are cut
across the ranks and their per-row scales are agreed by a max all-reduce, so every rank's quantized slice is
bit for bit the matching part of the single-process experts (int8, int4 and FP8 per channel); greedy tokens then agree except where the
bfloat16 rounding of the ranks' partial sums breaks a near tie (at most one prompt, as in
test_parallel_quant.py). Memory: each rank stores exactly the packed bytes of its own shard."""
import multiprocessing

import pytest
import torch

from frontierlm import LLM
from frontierlm.distributed.executor import free_port
from test_engine_parity import prompts_for
from test_parallel_quant import _budget_gb, _generate, _same_until_a_near_tie
from test_quant_moe import _packed_bytes, experts_of, load

pytestmark = pytest.mark.usefixtures("one_thread", "dist_timeout")
# 64 intermediate columns: 32 per TP rank, one int4 group of 32 (the default 32 leaves 16, refused below)
WIDE = dict(moe_intermediate_size=64)
TP2, EP2 = dict(tensor_parallel_size=2), dict(tensor_parallel_size=2, enable_expert_parallel=True)


def _weights(model) -> list[dict]:
    """Per MoE layer: each quantized matrix of every expert as the kernels compute with it, and the bytes."""
    out = []
    for experts in experts_of(model):
        method = experts.quant_method
        assert method is not None and not hasattr(experts, "w13") and not hasattr(experts, "w2")
        out.append({"bytes": method.stored_bytes(),
                    **{f: torch.stack([k.dequantized() for k in method.kernels[f]]) for f in ("w13", "w2")}})
    return out


def _build_rank(rank: int, model_dir: str, quantization: str, expert_parallel: bool, port: int, path: str):
    """One rank's model, built as a worker builds it; its experts' matrices and bytes saved to `path`."""
    import torch.distributed as dist

    from frontierlm.distributed.state import ParallelContext, building, init_process_groups

    torch.set_num_threads(1)
    ctx = init_process_groups(ParallelContext(rank=rank, tp_size=2, enable_expert_parallel=expert_parallel),
                              "127.0.0.1", port)
    with building(ctx):
        model = load(model_dir, quantization)
    shards = _weights(model)
    for layer, experts in zip(shards, experts_of(model)):
        layer["packed"] = _packed_bytes(experts, quantization)  # of this rank's own experts' shape
    torch.save(shards, path)
    dist.destroy_process_group()


def run_two_ranks(target, args: tuple, tmp_path) -> list:
    """Spawn ranks 0 and 1 as target(rank, *args, port, path) and load what each saved at its path."""
    ctx, port = multiprocessing.get_context("spawn"), free_port()
    paths = [str(tmp_path / f"rank{r}.pt") for r in range(2)]
    procs = [ctx.Process(target=target, args=(r, *args, port, paths[r])) for r in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=120)
        assert p.exitcode == 0, f"rank process exited with {p.exitcode}"
    return [torch.load(p) for p in paths]


def assert_rank_slice(mine: dict, whole: dict, rank: int, expert_parallel: bool) -> None:
    """Rank `rank`'s experts of two are its half of the experts (EP) or of every expert's intermediate dim (TP)."""
    r = rank
    if expert_parallel:
        e = whole["w2"].shape[0] // 2
        assert torch.equal(mine["w13"], whole["w13"][r * e:(r + 1) * e])
        assert torch.equal(mine["w2"], whole["w2"][r * e:(r + 1) * e])
    else:
        i = whole["w2"].shape[2] // 2
        gate, up = whole["w13"].split(2 * i, dim=1)
        assert torch.equal(mine["w13"], torch.cat([gate[:, r * i:(r + 1) * i], up[:, r * i:(r + 1) * i]], 1))
        assert torch.equal(mine["w2"], whole["w2"][:, :, r * i:(r + 1) * i])


def _rank_shards(model_dir, quantization, expert_parallel, tmp_path) -> list[list[dict]]:
    return run_two_ranks(_build_rank, (model_dir, quantization, expert_parallel), tmp_path)


@pytest.mark.parametrize("expert_parallel", [False, True], ids=["tp2", "ep2"])
@pytest.mark.parametrize("quantization", ["int8", "int4", "fp8"])
def test_each_rank_holds_its_own_quantized_shard(tiny_model_dir, tmp_path, quantization, expert_parallel):
    """Rank r's experts are the single-process quantized experts' slice r (TP: gate / up rows and down columns
    [r * I/2, (r + 1) * I/2); EP: experts [r * E/2, (r + 1) * E/2)), exactly, and are stored as packed bytes."""
    d = tiny_model_dir("qwen3_moe", **WIDE)
    single = _weights(load(d, quantization))
    ranks = _rank_shards(d, quantization, expert_parallel, tmp_path)
    for r, shards in enumerate(ranks):
        assert len(shards) == len(single) > 0
        for mine, full in zip(shards, single):
            assert mine["bytes"] == mine["packed"] < full["bytes"]
            if expert_parallel:
                assert 2 * mine["bytes"] == full["bytes"]
            assert_rank_slice(mine, full, r, expert_parallel)  # scales agreed by the reduce


@pytest.fixture(scope="module")
def single(tiny_model_dir):
    cache = {}

    def get(arch, quantization):
        if (arch, quantization) not in cache:
            d = tiny_model_dir(arch, **WIDE)
            llm = LLM(d, quantization=quantization, block_size=4, kv_cache_memory_gb=_budget_gb(d))
            cache[arch, quantization] = _generate(llm, prompts_for(n=6, seed=3))
        return cache[arch, quantization]

    return get


CASES = [("qwen3_moe", "int8", TP2), ("qwen3_moe", "int4", TP2), ("qwen3_moe", "int8", EP2),
         ("qwen3_moe", "int4", EP2), ("deepseek_v2", "int8", TP2), ("deepseek_v2", "int8", EP2)]


@pytest.mark.parametrize("arch,quantization,flags", CASES,
                         ids=[f"{a}-{q}-{'ep2' if f.get('enable_expert_parallel') else 'tp2'}" for a, q, f in CASES])
def test_quantized_experts_in_parallel_match_the_single_process_engine(arch, quantization, flags, tiny_model_dir,
                                                                      single):
    ref = single(arch, quantization)
    d = tiny_model_dir(arch, **WIDE)
    llm = LLM(d, quantization=quantization, block_size=4, kv_cache_memory_gb=_budget_gb(d), **flags)
    try:
        outs = _generate(llm, prompts_for(n=6, seed=3))
        same = sum(_same_until_a_near_tie(out, want) for out, want in zip(outs, ref))
        print(f"\n{arch} {quantization} {flags}: {same}/{len(ref)} identical")
        assert same >= len(ref) - 1  # at most one near tie broken by the ranks' bfloat16 partial sums
        local = llm.llm_engine.runner.parallel.local_model  # rank 0's shard, quantized, no float experts left
        for experts in experts_of(local):
            assert experts.quant_method.stored_bytes() == _packed_bytes(experts, quantization)
    finally:
        llm.llm_engine.shutdown()


def test_int4_groups_that_straddle_the_ranks_are_refused(tiny_model_dir):
    d = tiny_model_dir("qwen3_moe")  # 32 intermediate columns: 16 per rank, half an int4 group
    with pytest.raises(ValueError, match="leaves 16 of the experts' 32 intermediate columns per rank .* group "
                                         "size 32"):
        LLM(d, quantization="int4", block_size=4, kv_cache_memory_gb=_budget_gb(d), **TP2)
