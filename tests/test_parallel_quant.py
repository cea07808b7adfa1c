"""Quantization and the KV-cache budget under tensor / pipeline parallelism (gloo on loopback, one thread per
rank). Oracle: the single-process engine with the same `quantization=`; each rank quantizes its own shard,
with the row-parallel layers' per-channel scales agreed over the TP group, so rank 0's quantized shard is
bit for bit the matching columns of the single-process matrix. Each rank sizes its KV cache from its own
budget and its own share of the cache (KV heads split over TP, layers over PP)."""
import pytest
import torch

from frontierlm import LLM, SamplingParams
from frontierlm.config import ModelConfig
from test_engine_parity import prompts_for

pytestmark = pytest.mark.usefixtures("one_thread", "dist_timeout")
FULL_BLOCKS = 40  # the budget, in blocks of the whole model's KV (what the single-process engine gets)
# The packed int kernels compute in bfloat16 and round each TP rank's partial sum before the all-reduce (one
# process rounds the whole sum once): about 2^-8 relative on the row-parallel outputs, so log-probs move by
# up to ~1e-2 where float TP moves them by 1e-6; greedy tokens are compared exactly.
LOGPROB_TOL = 3e-2


def _budget_gb(d, blocks=FULL_BLOCKS, block_size=4) -> float:
    return blocks * block_size * ModelConfig.from_pretrained(d, load_format="dummy").kv_cache_bytes_per_token() / 2**30


def _generate(llm, prompts):
    params = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True, logprobs=3)
    return [o.outputs[0] for o in llm.generate(prompts, params, use_tqdm=False)]


def _row_parallel(model, name):
    """Layer 0's o_proj or down_proj: the layers whose columns TP splits."""
    layer = model.model.layers[0]
    return getattr(layer.self_attn if name == "o_proj" else layer.mlp, name)


def _same_until_a_near_tie(out, want) -> bool:
    """True when the greedy tokens are identical. Otherwise they may part only where the reference's top two
    were within LOGPROB_TOL (a tie the bfloat16 rounding of the partial sums can break either way); the
    continuations after that are different texts and are not compared."""
    for i, (got, tok) in enumerate(zip(out.token_ids, want.token_ids)):
        if got != tok:
            top = want.logprobs[i]
            assert got in top and top[tok].logprob - top[got].logprob < LOGPROB_TOL, \
                f"step {i}: {got} instead of {tok}, not a near tie of the reference ({top})"
            return False
    return True


@pytest.fixture(scope="module")
def single(tiny_model_dir):
    """Per scheme: the single-process engine's outputs, its KV blocks and its row-parallel matrices."""
    cache = {}

    def get(quantization):
        if quantization not in cache:
            d = tiny_model_dir("llama")
            llm = LLM(d, quantization=quantization, block_size=4, kv_cache_memory_gb=_budget_gb(d))
            model = llm.llm_engine.runner.model
            weights = {name: _row_parallel(model, name).quant_method.dequantized_weight()
                       for name in ("o_proj", "down_proj")}
            cache[quantization] = (_generate(llm, prompts_for(n=6, seed=3)), llm.llm_engine.kv.num_blocks, weights)
        return cache[quantization]

    return get


TP2, PP2 = dict(tensor_parallel_size=2), dict(pipeline_parallel_size=2)


@pytest.mark.parametrize("quantization,flags", [("int8", TP2), ("int4", TP2), ("fp8", TP2), ("int8", PP2),
                                                ("int4", PP2)],
                         ids=["int8-tp2", "int4-tp2", "fp8-tp2", "int8-pp2", "int4-pp2"])
def test_quantized_parallel_matches_the_single_process_engine(quantization, flags, tiny_model_dir, single):
    ref, ref_blocks, ref_weights = single(quantization)
    assert ref_blocks == FULL_BLOCKS
    d = tiny_model_dir("llama")  # 2 KV heads (one per TP rank), 2 layers (one per stage)
    llm = LLM(d, quantization=quantization, block_size=4, kv_cache_memory_gb=_budget_gb(d), **flags)
    try:
        outs = _generate(llm, prompts_for(n=6, seed=3))
        err = max(abs(out.logprobs[0][tid].logprob - lp.logprob)
                  for out, want in zip(outs, ref) for tid, lp in want.logprobs[0].items())
        assert err < LOGPROB_TOL
        same = sum(_same_until_a_near_tie(out, want) for out, want in zip(outs, ref))
        print(f"\n{quantization} {flags}: first-step log-prob error {err:.1e}, {same}/{len(ref)} identical")
        # PP splits no matmul (batch sizes differ, which only picks another int8 kernel): identical; TP may
        # break at most one near tie
        assert same == len(ref) if flags.get("pipeline_parallel_size") else same >= len(ref) - 1
        # per-rank KV: half the heads (TP) or half the layers (PP) per rank -> twice the blocks of one process
        engine = llm.llm_engine
        assert engine.kv.num_blocks == 2 * ref_blocks
        assert f"[{2 * ref_blocks}, {2 * ref_blocks}] blocks fit" in engine.startup_report
        assert "weights: online (" in engine.startup_report
        if flags.get("tensor_parallel_size"):  # rank 0 holds the first half of the row-parallel columns
            local = engine.runner.parallel.local_model
            for name in ("o_proj", "down_proj"):
                mine = _row_parallel(local, name).quant_method.dequantized_weight()
                assert torch.equal(mine, ref_weights[name][:, :mine.shape[1]])
        else:
            assert engine.pipeline.max_in_flight == 2
    finally:
        llm.llm_engine.shutdown()


def test_fp8_kv_cache_with_tensor_parallelism(tiny_model_dir):
    """kv_cache_dtype reaches the workers: each rank's cache is FP8, so one byte per element doubles the
    blocks again, and greedy tokens equal the single-process FP8-cache engine's."""
    d = tiny_model_dir("llama")
    budget = _budget_gb(d)
    one = LLM(d, kv_cache_dtype="fp8", block_size=4, kv_cache_memory_gb=budget)
    prompts = prompts_for(n=3, seed=4)
    want, blocks = [o.token_ids for o in _generate(one, prompts)], one.llm_engine.kv.num_blocks
    llm = LLM(d, kv_cache_dtype="fp8", block_size=4, kv_cache_memory_gb=budget, tensor_parallel_size=2)
    try:
        assert [o.token_ids for o in _generate(llm, prompts)] == want
        assert blocks == 4 * FULL_BLOCKS  # float32 model: FP8 holds 4x the tokens
        assert llm.llm_engine.kv.num_blocks == 2 * blocks
    finally:
        llm.llm_engine.shutdown()


def test_quantization_refusals_name_the_problem(tiny_model_dir, tmp_path):
    # (quantized checkpoints under TP / PP / EP: test_parallel_quant_checkpoint.py)
    # int4 groups of 32 over down_proj's 96 / 2 = 48 columns per rank would straddle the ranks
    d = tiny_model_dir("llama", intermediate_size=96)
    with pytest.raises(ValueError, match="leaves 48 input columns per rank .* group size 32"):
        LLM(d, quantization="int4", tensor_parallel_size=2)
