"""Quantize -> load: `frontierlm quantize` checkpoints (and `quantization=` on load) give logits that match
transformers' own loading of the same checkpoint (it dequantizes compressed-tensors and FP8 on CPU) and stay
within a stated bound of the float model; greedy agreement with the float model is reported. A DeepSeek-V3
checkpoint quantized as published loads with its experts in FP8 and kv_b_proj through the dequantizing fallback
(MoE experts of compressed-tensors files: tests/test_quant_moe.py).
Bad input: unsupported schemes and CLI mistakes are one clear error."""
import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from frontierlm import LLM, SamplingParams
from frontierlm.cli import main
from frontierlm.config import ModelConfig
from frontierlm.models.loader import load_model
from frontierlm.quant import formats
from frontierlm.quant.export import quantize_checkpoint

pytestmark = pytest.mark.usefixtures("one_thread")

IDS = torch.tensor([[5, 17, 33, 8, 91, 120, 44, 7, 250, 63, 12, 99]])
# max |logit error| / max |float logit| on the tiny models (whose weights are N(0, 0.08)); measured values sit
# at about half of these bounds. vs_hf: against transformers' dequantization of the same file (only the
# bfloat16 activations of the packed int kernels and the FP8 rounding order differ).
BOUNDS = {"int8": {"vs_float": 0.015, "vs_hf": 0.006}, "int4": {"vs_float": 0.2, "vs_hf": 0.006},
          "fp8": {"vs_float": 0.06, "vs_hf": 1e-3}, "fp8-block": {"vs_float": 0.06, "vs_hf": 1e-5}}


def our_logits(model_dir, quantization=None, ids=IDS, w8a8=False):
    """w8a8: run FP8 layers through the CUDA path (torch._scaled_mm with FP8 per-token activations) here on CPU,
    as transformers emulates a compressed-tensors FP8 checkpoint with dynamic activation scales."""
    mc = ModelConfig.from_pretrained(model_dir, "float32")
    mc.quantization = quantization
    model = load_model(mc)
    for m in model.modules():
        if getattr(m, "quant_method", None) is not None and w8a8:
            m.quant_method.kernel.use_scaled_mm = True
    with torch.no_grad():
        return model.compute_logits(model(ids, torch.arange(ids.shape[1])[None].expand_as(ids)))


def hf_logits(model_dir, ids=IDS):
    from factories import load_hf_model

    with torch.no_grad():
        return load_hf_model(model_dir).eval()(ids).logits.float()


def rel(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


def greedy(model_dir, prompts, **kw):
    llm = LLM(model_dir, dtype="float32", seed=0, **kw)
    outs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=12, ignore_eos=True), use_tqdm=False)
    return [o.outputs[0].token_ids for o in outs]


def agreement(a, b):
    pairs = [(x, y) for ra, rb in zip(a, b) for x, y in zip(ra, rb)]
    return sum(x == y for x, y in pairs) / len(pairs)


@pytest.fixture(scope="module")
def llama(tiny_model_dir):
    return tiny_model_dir("llama")


@pytest.fixture(scope="module")
def quantized(llama, tmp_path_factory):
    root = tmp_path_factory.mktemp("quantized")
    return {s: quantize_checkpoint(llama, root / s, s)["out_dir"] for s in BOUNDS}


@pytest.mark.parametrize("scheme", list(BOUNDS))
def test_quantized_checkpoint_matches_transformers_and_float(llama, quantized, scheme):
    q = quantized[scheme]
    ours, theirs, float_ = our_logits(q), hf_logits(q), our_logits(llama)
    if scheme == "fp8":  # the file asks for dynamic FP8 activations: transformers emulates them, so does W8A8
        assert rel(our_logits(q, w8a8=True), theirs) <= BOUNDS[scheme]["vs_hf"]
    else:
        assert rel(ours, theirs) <= BOUNDS[scheme]["vs_hf"], rel(ours, theirs)
    assert rel(ours, float_) <= BOUNDS[scheme]["vs_float"], rel(ours, float_)
    cfg = json.loads(open(q + "/config.json").read())
    assert cfg["quantization_config"]["quant_method"] == ("fp8" if scheme == "fp8-block" else "compressed-tensors")


def test_greedy_agreement_with_the_float_model(llama, quantized, capsys):
    prompts = [[5, 17, 33, 8], [91, 120, 44, 7, 250], [63, 12, 99, 100, 101, 102]]
    ref = greedy(llama, prompts)
    rates = {s: agreement(greedy(quantized[s], prompts), ref) for s in BOUNDS}
    rates["int8 on load"] = agreement(greedy(llama, prompts, quantization="int8"), ref)
    rates["fp8 KV"] = agreement(greedy(llama, prompts, kv_cache_dtype="fp8_e4m3"), ref)
    with capsys.disabled():
        print("\ngreedy agreement with float32 (36 tokens):", {k: round(v, 2) for k, v in rates.items()})
    # measured: int8 1.0 (both), fp8 0.94, fp8-block 0.72, fp8 KV 0.72, int4 0.61: once a near tie of these
    # random tiny models flips, the rest of the sequence differs
    assert rates["int8"] >= 0.9 and rates["int8 on load"] >= 0.9
    assert min(rates.values()) >= 0.4


def test_quantization_on_load_equals_the_written_checkpoint(llama, quantized):
    """int8 per channel: `quantization="int8"` and `frontierlm quantize --scheme int8` compute the same thing."""
    torch.testing.assert_close(our_logits(llama, "int8"), our_logits(quantized["int8"]), rtol=0, atol=1e-5)
    assert rel(our_logits(llama, "int4"), our_logits(llama)) <= BOUNDS["int4"]["vs_float"]
    assert rel(our_logits(llama, "fp8"), our_logits(llama)) <= BOUNDS["fp8"]["vs_float"]


def _publish_like_deepseek(src, dst):
    """Every 2-D weight but embeddings, LM head and router in FP8 with 128x128 weight_scale_inv, experts and
    kv_b_proj included, as DeepSeek-V3's release is."""
    import shutil

    shutil.copytree(src, dst)
    tensors = {}
    with safe_open(f"{src}/model.safetensors", "pt") as f:
        for name in f.keys():
            t = f.get_tensor(name)
            if t.dim() == 2 and "embed" not in name and "lm_head" not in name and not name.endswith("mlp.gate.weight"):
                tensors[name], tensors[name + "_scale_inv"] = formats.quantize_fp8(t, "block", (128, 128))
            else:
                tensors[name] = t
    save_file(tensors, f"{dst}/model.safetensors", metadata={"format": "pt"})
    cfg = json.loads(open(f"{dst}/config.json").read())
    cfg["quantization_config"] = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                                  "weight_block_size": [128, 128]}
    open(f"{dst}/config.json", "w").write(json.dumps(cfg))
    return str(dst)


def test_deepseek_v3_fp8_release_format_loads(tiny_model_dir, tmp_path):
    """MLA + MoE with FP8 everywhere: attention and experts run FP8, kv_b_proj is dequantized on load.
    Oracle: transformers' FineGrainedFP8 loading, which dequantizes on a CPU."""
    pytest.importorskip("accelerate")
    src = tiny_model_dir("deepseek_v3")
    q = _publish_like_deepseek(src, tmp_path / "ds3-fp8")
    ours, theirs = our_logits(q), hf_logits(q)
    assert rel(ours, theirs) <= 1e-4, rel(ours, theirs)
    assert rel(ours, our_logits(src)) <= BOUNDS["fp8-block"]["vs_float"]
    out = greedy(q, [[5, 17, 33, 8]], kv_cache_dtype="fp8")[0]
    assert len(out) == 12


@pytest.mark.parametrize("scheme", ["int4", "int8", "fp8"])
def test_deepseek_v3_written_checkpoints_load(tiny_model_dir, tmp_path, scheme):
    """K = 24 (q_b_proj) fits no group of 32: int4 falls back to groups of 8 there, and still loads."""
    src = tiny_model_dir("deepseek_v3")
    q = quantize_checkpoint(src, tmp_path / scheme, scheme)["out_dir"]
    assert rel(our_logits(q), our_logits(src)) <= BOUNDS[scheme]["vs_float"]


def test_trained_checkpoint_quantizes(tmp_path, tiny_model_dir, capsys):
    """`frontierlm quantize` after `frontierlm train` (a few steps of the trainer, its own export)."""
    from test_train import make_trainer

    trainer = make_trainer(tmp_path / "run", tiny_model_dir("llama"), steps=3, log_every=1)
    trainer.train()
    run = str(trainer.out_dir)
    assert main(["quantize", run, str(tmp_path / "int8"), "--scheme", "int8"]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["quantized_tensors"] > 0 and summary["bytes_after"] < summary["bytes_before"]
    assert rel(our_logits(str(tmp_path / "int8")), our_logits(run)) <= BOUNDS["int8"]["vs_float"]


@pytest.mark.parametrize("args,message", [
    (["--scheme", "int3"], "invalid choice: 'int3'"),
    (["--scheme", "fp8", "--group-size", "32"], "--group-size applies to int8 and int4, not fp8"),
    (["--scheme", "int4", "--group-size", "20"], "--group-size must be a positive multiple of 16"),
])
def test_quantize_cli_mistakes_exit_2_with_one_line(llama, tmp_path, capsys, args, message):
    with pytest.raises(SystemExit) if "invalid choice" in message else _no_raise():
        assert main(["quantize", llama, str(tmp_path / "out"), *args]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert message in err[-1], err


def test_quantize_refuses_quantized_input_and_existing_output(quantized, llama, tmp_path, capsys):
    assert main(["quantize", quantized["int8"], str(tmp_path / "again"), "--scheme", "int4"]) == 2
    assert "is already quantized" in capsys.readouterr().err
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("keep me")
    assert main(["quantize", llama, str(tmp_path / "full"), "--scheme", "int8"]) == 2
    assert "exists and is not empty" in capsys.readouterr().err
    assert main(["quantize", str(tmp_path / "missing"), str(tmp_path / "o"), "--scheme", "int8"]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_loading_refuses_other_schemes(quantized, llama, tmp_path):
    with pytest.raises(ValueError, match="already quantized"):
        LLM(quantized["int8"], quantization="int4")
    bad = tmp_path / "gptq"
    import shutil

    shutil.copytree(llama, bad)
    cfg = json.loads((bad / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "gptq", "bits": 4, "group_size": 128}
    (bad / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="quantization method 'gptq' is not supported"):
        LLM(str(bad))
    assert main(["generate", str(bad), "--prompt", "hi"]) == 2


class _no_raise:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False
