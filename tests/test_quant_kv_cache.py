"""FP8 KV cache: half the bytes per token, attention output within a stated bound of the float cache, and the
cache's own invariants unchanged (a prefix-cache hit, chunked prefill and a recompute after preemption give
exactly the tokens of a plain run). Dense GQA and MLA's latent cache; the checkpoint's k_scale / v_scale."""
import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from frontierlm import LLM, SamplingParams

pytestmark = pytest.mark.usefixtures("one_thread")

PROMPTS = [list(range(10 + i, 40 + 3 * i)) for i in range(4)] + [list(range(10, 40)) + [77, 78]]
GREEDY = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)


def tokens(llm, prompts=PROMPTS):
    return [o.outputs[0].token_ids for o in llm.generate(prompts, GREEDY, use_tqdm=False)]


def attention_outputs(llm, prompt):
    """Each layer's attention output for the prompt's prefill and 3 decode steps (which read the cache), and
    the tokens generated."""
    outs = []
    hooks = [m.register_forward_hook(lambda mod, args, out: outs.append(out.detach().float().clone()))
             for m in llm.llm_engine.runner.model.kv_cache_modules()]
    out = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=4, ignore_eos=True), use_tqdm=False)
    for h in hooks:
        h.remove()
    return outs, out[0].outputs[0].token_ids


# relative error (Frobenius) of the first layer's attention output during decode: the first layer's inputs are
# identical with both caches, so this is the cache's own error. E4M3 keeps 3 mantissa bits (relative rounding
# <= 2^-4), E5M2 2 bits; averaging over the context brings the measured figures to about a third of these.
BOUNDS = {"fp8_e4m3": 0.05, "fp8_e5m2": 0.1}


@pytest.mark.parametrize("arch", ["llama", "deepseek_v3"])
@pytest.mark.parametrize("kv", list(BOUNDS))
def test_attention_error_bound_and_bytes(tiny_model_dir, arch, kv):
    d = tiny_model_dir(arch)
    ref_llm, fp8_llm = LLM(d, dtype="float32"), LLM(d, dtype="float32", kv_cache_dtype=kv)
    ref_mc, mc = ref_llm.llm_engine.model_config, fp8_llm.llm_engine.model_config
    assert mc.kv_cache_bytes_per_token() * 4 == ref_mc.kv_cache_bytes_per_token()  # float32 -> one byte
    assert f"KV cache {kv}" in fp8_llm.llm_engine.startup_report
    assert all(c.dtype == {"fp8_e4m3": torch.float8_e4m3fn, "fp8_e5m2": torch.float8_e5m2}[kv]
               for c in fp8_llm.llm_engine.runner.kv_caches)
    layers = len(ref_llm.llm_engine.runner.model.kv_cache_modules())
    (ref, ref_tokens), (got, got_tokens) = attention_outputs(ref_llm, PROMPTS[0]), attention_outputs(fp8_llm, PROMPTS[0])
    steps = 1  # the prefill (which attends with the cache's rounded K/V too), then decodes while the inputs agree
    while steps < 4 and ref_tokens[steps - 1] == got_tokens[steps - 1]:
        steps += 1
    assert steps >= 2
    for step in range(steps):  # layer 0 of each step
        a, b = ref[step * layers], got[step * layers]
        assert (b - a).norm() <= BOUNDS[kv] * a.norm(), ((b - a).norm() / a.norm()).item()


@pytest.mark.parametrize("arch", ["llama", "deepseek_v3"])
def test_prefix_caching_chunking_and_preemption_unchanged(tiny_model_dir, arch):
    d = tiny_model_dir(arch)
    plain = tokens(LLM(d, block_size=4, kv_cache_dtype="fp8", enable_prefix_caching=False))
    cached = LLM(d, block_size=4, kv_cache_dtype="fp8")
    assert tokens(cached) == plain
    again = cached.generate(PROMPTS, GREEDY, use_tqdm=False)  # every prompt's prefix is now cached
    assert [o.outputs[0].token_ids for o in again] == plain
    assert all(o.num_cached_tokens > 0 for o in again)
    assert tokens(LLM(d, block_size=4, kv_cache_dtype="fp8", max_num_batched_tokens=8)) == plain
    # preemption: 24 blocks of 4 tokens; two requests fit when admitted, not once each has grown by 30 tokens
    long = SamplingParams(temperature=0, max_tokens=30, ignore_eos=True)
    ref = [o.outputs[0].token_ids for o in cached.generate(PROMPTS, long, use_tqdm=False)]
    bpt = cached.llm_engine.model_config.kv_cache_bytes_per_token()
    tight = LLM(d, block_size=4, kv_cache_dtype="fp8", kv_cache_memory_gb=24 * 4 * bpt / 2**30)
    assert [o.outputs[0].token_ids for o in tight.generate(PROMPTS, long, use_tqdm=False)] == ref
    assert tight.llm_engine.get_stats()["num_preemptions"] > 0


def test_checkpoint_kv_scales_are_used(tiny_model_dir, tmp_path):
    """k_scale / v_scale from the checkpoint land on each layer; with scales the error stays in bound, and a
    power-of-two scale (exact division) gives the unscaled result up to E4M3's subnormal range."""
    import shutil

    src = tiny_model_dir("llama")
    dst = tmp_path / "scaled"
    shutil.copytree(src, dst)
    with safe_open(f"{src}/model.safetensors", "pt") as f:
        tensors = {n: f.get_tensor(n) for n in f.keys()}
    for i in range(2):
        tensors[f"model.layers.{i}.self_attn.k_scale"] = torch.tensor(4.0)
        tensors[f"model.layers.{i}.self_attn.v_scale"] = torch.tensor(0.25)
    save_file(tensors, f"{dst}/model.safetensors", metadata={"format": "pt"})
    scaled = LLM(str(dst), dtype="float32", kv_cache_dtype="fp8_e4m3")
    attn = scaled.llm_engine.runner.model.kv_cache_modules()
    assert [(m.k_scale, m.v_scale) for m in attn] == [(4.0, 0.25)] * 2
    unscaled = LLM(src, dtype="float32", kv_cache_dtype="fp8_e4m3")
    ref = LLM(src, dtype="float32")
    a, b, r = (attention_outputs(x, PROMPTS[0])[0] for x in (scaled, unscaled, ref))
    assert (a[2] - r[2]).norm() <= BOUNDS["fp8_e4m3"] * r[2].norm()
    assert (a[2] - b[2]).norm() <= 0.01 * b[2].norm()
    assert tokens(scaled) == tokens(LLM(str(dst), dtype="float32", kv_cache_dtype="fp8_e4m3",
                                        enable_prefix_caching=False))


def test_planner_and_bad_names(tiny_model_dir):
    from frontierlm.plan.model import kv_torch_dtype

    assert kv_torch_dtype("fp8_e5m2") == torch.float8_e5m2 and kv_torch_dtype("fp8_e4m3") == torch.float8_e4m3fn
    with pytest.raises(ValueError, match="kv_cache_dtype must be one of auto, fp8, fp8_e4m3, fp8_e5m2"):
        LLM(tiny_model_dir("llama"), kv_cache_dtype="int8")
