"""MoE experts stay quantized (frontierlm/quant/moe.py): compressed-tensors int8 / int4 / FP8 expert weights
written by `frontierlm quantize` load into packed per-expert kernels, never into a float matrix.

Oracles: transformers loading the same compressed-tensors files (it decompresses every expert), the float
model for quantize-on-load, and the per-expert loop for the shape-static path the compiled decode step takes.
Memory: the experts' stored bytes are exactly the packed size (values + scales), not float."""
import json
import math

import pytest
import torch
from factories import load_hf_model

from frontierlm.config import ModelConfig
from frontierlm.layers.moe import MoE, FusedExperts
from frontierlm.models.loader import load_model
from frontierlm.quant.export import quantize_checkpoint

pytestmark = pytest.mark.usefixtures("one_thread")

IDS = torch.tensor([[5, 17, 33, 8, 91, 120, 44, 7, 250, 63, 12, 99, 300, 411, 2, 77]])
# max |logit error| / max |float logit| (the tiny models' weights are N(0, 0.08)). vs_hf: transformers
# dequantizes the same file; only our kernels' bfloat16 activations (int8 / int4) differ. FP8 experts compute
# weight-only as transformers does; its dense FP8 layers emulate the file's dynamic FP8 activations, so the
# fp8 comparison runs our dense layers W8A8 too (as tests/test_quant_models.py does).
# vs_hf_block: one DeepSeek MoE block's output on the same input, relative to its max. Measured (qwen3_moe,
# mixtral / deepseek_v2, v3 blocks): vs_hf int8 0.0055-0.0063, int4 0.0052-0.0053, fp8 < 1e-5; blocks int8
# 0.0059-0.0101, int4 0.0053-0.0081; vs_float int8 <= 0.011, int4 0.05-0.16 (DeepSeek-V3's routing flips
# near ties), fp8 <= 0.061.
BOUNDS = {"int8": {"vs_float": 0.02, "vs_hf": 0.012, "vs_hf_block": 0.02},
          "int4": {"vs_float": 0.3, "vs_hf": 0.012, "vs_hf_block": 0.02},
          "fp8": {"vs_float": 0.12, "vs_hf": 0.002, "vs_hf_block": 0.002}}
ARCHS = ("qwen3_moe", "mixtral", "deepseek_v2", "deepseek_v3")


def load(model_dir, quantization=None):
    mc = ModelConfig.from_pretrained(model_dir, "float32")
    mc.quantization = quantization
    return load_model(mc)


def logits(model, ids=IDS, w8a8=False):
    for m in model.modules():
        if getattr(m, "quant_method", None) is not None and hasattr(m.quant_method, "kernel"):
            m.quant_method.kernel.use_scaled_mm = w8a8
    with torch.no_grad():
        return model.compute_logits(model(ids, torch.arange(ids.shape[1])[None].expand_as(ids)))


def hf_logits(model_dir, ids=IDS):
    with torch.no_grad():
        return load_hf_model(model_dir).eval()(ids).logits.float()


def decompressed_copy(q, out):
    """The float checkpoint compressed-tensors' own decompressor makes of a quantized one. Transformers 5.24
    fails to merge DeepSeek-V2/V3's compressed experts ("Concatenate on tensors destined for
    ...experts.gate_up_proj. Ckpt contains: 0"), so for DeepSeek the oracle is transformers on this copy."""
    import shutil

    from compressed_tensors.compressors import BaseCompressor
    from compressed_tensors.quantization import QuantizationConfig
    from safetensors.torch import load_file, save_file

    shutil.copytree(q, out)
    cfg = json.loads(open(f"{q}/config.json").read())
    qc = QuantizationConfig.model_validate(cfg.pop("quantization_config"))
    comp = BaseCompressor.load_from_registry(qc.format)
    tensors = load_file(f"{q}/model.safetensors")
    modules = {n.rpartition(".")[0] for n in tensors if n.endswith(".weight_scale")}
    dense = {n: t for n, t in tensors.items() if n.rpartition(".")[0] not in modules}
    for m in modules:
        scheme = next((g for g in qc.config_groups.values() if m in g.targets), qc.config_groups["group_0"])
        state = {n.rpartition(".")[2]: t for n, t in tensors.items() if n.rpartition(".")[0] == m}
        dense[f"{m}.weight"] = comp.decompress(state, scheme)["weight"].float()
    save_file(dense, f"{out}/model.safetensors", metadata={"format": "pt"})
    open(f"{out}/config.json", "w").write(json.dumps(cfg))
    return str(out)


def rel(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


def experts_of(model):
    return [m for m in model.modules() if isinstance(m, FusedExperts)]


def float_bytes(experts):
    e, h, i = experts.num_experts, experts.hidden_size, experts.intermediate_size
    return 4 * e * (2 * i * h + h * i)


@pytest.fixture(scope="module")
def quantized(tiny_model_dir, tmp_path_factory):
    cache = {}

    def get(arch, scheme):
        if (arch, scheme) not in cache:
            out = tmp_path_factory.mktemp(f"{arch}-{scheme}")
            cache[arch, scheme] = quantize_checkpoint(tiny_model_dir(arch), out / "q", scheme)
        return cache[arch, scheme]

    return get


@pytest.mark.parametrize("scheme", list(BOUNDS))
@pytest.mark.parametrize("arch", ARCHS)
def test_quantized_experts_match_transformers(tiny_model_dir, quantized, tmp_path, arch, scheme):
    summary = quantized(arch, scheme)
    q = summary["out_dir"]
    cfg = json.loads(open(q + "/config.json").read())["quantization_config"]
    assert not any(".experts." in name for name in cfg["ignore"])  # the file holds the experts quantized
    model = load(q)
    for experts in experts_of(model):
        assert experts.quant_method is not None and not hasattr(experts, "w13") and not hasattr(experts, "w2")
        assert not any(p.is_floating_point() for p in experts.parameters())
    if arch.startswith("deepseek"):
        # sigmoid routing with a correction bias: int8 noise in the hidden states flips near-tied expert
        # choices (whole-model logits then differ by ~0.1 between two correct dequantizations), so each MoE
        # block is compared on the same input instead
        hf = load_hf_model(decompressed_copy(q, tmp_path / "float"))
        hf_moes = [layer.mlp for layer in hf.model.layers if hasattr(layer.mlp, "experts")]
        ours_moes = [m for m in model.modules() if isinstance(m, MoE)]
        assert len(hf_moes) == len(ours_moes) > 0
        torch.manual_seed(0)
        x = torch.randn(1, 24, model.config.hidden_size)
        with torch.no_grad():
            for a, b in zip(ours_moes, hf_moes):
                assert rel(a(x), b(x)) <= BOUNDS[scheme]["vs_hf_block"], rel(a(x), b(x))
    else:  # transformers emulates the file's dynamic FP8 activations in dense layers: so do we (W8A8)
        ours, theirs = logits(model, w8a8=scheme == "fp8"), hf_logits(q)
        assert rel(ours, theirs) <= BOUNDS[scheme]["vs_hf"], rel(ours, theirs)
    float_ = logits(load(tiny_model_dir(arch)))
    assert rel(logits(model), float_) <= BOUNDS[scheme]["vs_float"], rel(logits(model), float_)


def _packed_bytes(experts, scheme):
    """values + scales, as the kernels keep them: int8 1 byte and a bfloat16 + a float32 scale per row;
    int4 half a byte and a bfloat16 (scale, zero) pair per group of 32; FP8 1 byte and a float32 row scale."""
    e, h, i = experts.num_experts, experts.hidden_size, experts.intermediate_size
    values, rows = e * 3 * i * h, e * (2 * i + h)
    if scheme == "int8":
        return values + rows * (2 + 4)
    if scheme == "int4":
        return values // 2 + values // 32 * 4
    return values + rows * 4


@pytest.mark.parametrize("scheme", list(BOUNDS))
@pytest.mark.parametrize("on_load", [False, True])
def test_experts_hold_the_packed_bytes(tiny_model_dir, quantized, scheme, on_load):
    model = load(tiny_model_dir("qwen3_moe"), scheme) if on_load else load(quantized("qwen3_moe", scheme)["out_dir"])
    for experts in experts_of(model):
        assert experts.quant_method.stored_bytes() == _packed_bytes(experts, scheme)
        assert experts.quant_method.stored_bytes() < {"int8": 0.3, "int4": 0.2, "fp8": 0.3}[scheme] * \
            float_bytes(experts)


@pytest.mark.parametrize("arch", ["qwen3_moe", "deepseek_v3"])
def test_quantization_on_load_covers_the_experts(tiny_model_dir, quantized, arch):
    """`LLM(quantization="int8")` quantizes the experts as `frontierlm quantize --scheme int8` writes them."""
    src = tiny_model_dir(arch)
    on_load = load(src, "int8")
    assert all(e.quant_method is not None for e in experts_of(on_load))
    torch.testing.assert_close(logits(on_load), logits(load(quantized(arch, "int8")["out_dir"])), rtol=0, atol=1e-5)
    float_ = logits(load(src))
    for scheme in ("int4", "fp8"):
        assert rel(logits(load(src, scheme)), float_) <= BOUNDS[scheme]["vs_float"]


@pytest.mark.parametrize("scheme", list(BOUNDS))
def test_shape_static_path_matches_the_expert_loop(quantized, scheme):
    """The compiled decode step's path (each pair's quantized matrix gathered and dequantized) against the
    per-expert packed kernels, on pairs that hit some experts twice and others not at all."""
    model = load(quantized("qwen3_moe", scheme)["out_dir"])
    experts = experts_of(model)[0]
    torch.manual_seed(0)
    ids = torch.tensor([0, 0, 2, 3, 3, 3, 7])
    xs = torch.randn(ids.shape[0], experts.hidden_size)
    counts = torch.bincount(ids, minlength=experts.num_experts)
    loop = experts.quant_method.apply(experts, xs, counts, ids)
    gathered = experts.quant_method.apply_gathered(experts, xs, ids)
    assert (gathered - loop).abs().max() <= 0.01 * loop.abs().max()  # the kernels' bfloat16 activations


def test_demo_model_int8_keeps_its_quality(tmp_path):
    """The shipped demo (DeepSeek-V3 MLA + MoE, MTP module) quantized to int8, experts included: held-out
    code scores within 1% of the float model's perplexity (benchmarks/quant.py ppl measures the full table)."""
    from frontierlm.assets import DEMO_MODEL
    from test_demo_model import _nll_per_token, _tokens

    from safetensors import safe_open

    summary = quantize_checkpoint(DEMO_MODEL, tmp_path / "int8", "int8")
    with safe_open(f"{summary['out_dir']}/model.safetensors", "pt") as f:
        names = set(f.keys())
    assert "model.layers.1.mlp.experts.7.down_proj.weight_packed" in names
    assert "model.layers.1.mlp.experts.7.down_proj.weight" not in names
    # bf16 -> int8 everywhere but the embedding and the MTP module's copies of it and of the tied head (6 of
    # the 16 MB stay bfloat16): measured 0.78
    assert summary["bytes_after"] < 0.8 * summary["bytes_before"]
    ids = _tokens(DEMO_MODEL)
    float_model, int8_model = load(DEMO_MODEL), load(summary["out_dir"])
    decoder = int8_model.model.layers[:int8_model.config.num_layers]  # (the MTP module is written float)
    assert all(e.quant_method is not None for e in experts_of(decoder))
    ppl_float = math.exp(_nll_per_token(float_model, ids))
    ppl_int8 = math.exp(_nll_per_token(int8_model, ids))
    assert abs(ppl_int8 / ppl_float - 1) < 0.01, (ppl_float, ppl_int8)


@pytest.mark.parametrize("scheme", list(BOUNDS))
def test_fullgraph_tracing_takes_the_gathered_path(quantized, scheme):
    """The compiled decode step traces with fullgraph=True: quantized experts must not break the graph (the
    expert loop reads counts on the host); dynamo's eager backend checks the trace without an inductor build."""
    from frontierlm.layers.moe import select_experts

    model = load(quantized("qwen3_moe", scheme)["out_dir"])
    moe = next(m for m in model.modules() if hasattr(m, "routing"))
    torch.manual_seed(1)
    x = torch.randn(3, moe.hidden_size)
    weights, ids = select_experts(x @ moe.gate.weight.t(), moe.routing)
    torch._dynamo.reset()
    with torch.no_grad():
        eager, _ = moe.experts(x, weights, ids)
        traced, _ = torch.compile(moe.experts, backend="eager", fullgraph=True)(x, weights, ids)
    assert (traced - eager).abs().max() <= 0.01 * eager.abs().max()


def test_engine_generates_with_quantized_experts(tiny_model_dir, quantized):
    """Through the engine (paged KV cache, prefill then decode steps): the int8 checkpoint and int8
    quantization on load give the same greedy tokens, and they mostly agree with the float model's."""
    from frontierlm import LLM, SamplingParams

    src, q = tiny_model_dir("qwen3_moe"), quantized("qwen3_moe", "int8")["out_dir"]
    prompts = [[5, 17, 33, 8], [91, 120, 44, 7, 250]]
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)

    def run(path, **kw):
        outs = LLM(path, dtype="float32", seed=0, **kw).generate(prompts, params, use_tqdm=False)
        return [o.outputs[0].token_ids for o in outs]

    ckpt, on_load, float_ = run(q), run(src, quantization="int8"), run(src)
    assert ckpt == on_load and all(len(t) == 12 for t in ckpt)
    same = sum(a == b for x, y in zip(ckpt, float_) for a, b in zip(x, y))
    assert same >= 0.75 * 24, (ckpt, float_)
