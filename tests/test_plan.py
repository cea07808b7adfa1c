"""Capacity planner: hand computations for every attention kind, the course's worked figures, the advisor."""
import json

import pytest

from frontierlm.cli import main
from frontierlm.plan import (activations, advise_serving, advise_training, attention_flops_per_sequence,
                             attention_flops_per_token, flops_report, get_gpu, kv_report, load_model_shape,
                             serve_report, train_report)

GB = 10**9


def _config(tmp_path, name, **fields):
    d = tmp_path / name
    d.mkdir()
    base = dict(architectures=["LlamaForCausalLM"], model_type="llama", vocab_size=1000, hidden_size=256,
                intermediate_size=512, num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=8,
                max_position_embeddings=8192)
    base.update(fields)
    (d / "config.json").write_text(json.dumps({k: v for k, v in base.items() if v is not None}))
    return str(d)


@pytest.mark.parametrize("kind,fields,per_token", [
    # layers x 2 (K and V) x kv heads x head_dim x 2 bytes (bf16)
    ("MHA", {}, 4 * 2 * 8 * 32 * 2),
    ("GQA", {"num_key_value_heads": 2}, 4 * 2 * 2 * 32 * 2),
    ("MQA", {"num_key_value_heads": 1}, 4 * 2 * 1 * 32 * 2),
    # MLA: layers x (kv_lora_rank + rope dims) x 2 bytes, one latent shared by every head
    ("MLA", {"architectures": ["DeepseekV3ForCausalLM"], "model_type": "deepseek_v3", "kv_lora_rank": 64,
             "qk_rope_head_dim": 16, "qk_nope_head_dim": 32, "v_head_dim": 32, "q_lora_rank": None}, 4 * 80 * 2),
])
def test_kv_bytes_per_token_by_attention_kind(tmp_path, kind, fields, per_token):
    shape = load_model_shape(_config(tmp_path, kind, **fields))
    assert shape.attention_kind == kind
    rep = kv_report(shape, context=1000, kv_dtype="bf16", batch=3)
    assert rep["bytes_per_token"] == per_token
    assert rep["kv_at_context"]["bytes"] == per_token * 1000 * 3
    assert kv_report(shape, 1000, "fp8")["bytes_per_token"] == per_token // 2
    assert kv_report(shape, 1000, "fp32")["bytes_per_token"] == per_token * 2


def test_sliding_window_layers_cap_the_cache(tmp_path):
    per_layer = 2 * 2 * 32 * 2  # K and V, 2 KV heads of 32 dims, bf16
    every = load_model_shape(_config(tmp_path, "mistral", num_key_value_heads=2, sliding_window=512,
                                     architectures=["MistralForCausalLM"], model_type="mistral"))
    assert every.attention_kind == "GQA + sliding window 512"
    assert every.kv_bytes(4096) == 4 * per_layer * 512
    assert every.kv_bytes(100) == 4 * per_layer * 100
    # Qwen-style: only the layers marked sliding keep a window
    mixed = load_model_shape(_config(tmp_path, "qwen", num_key_value_heads=2, sliding_window=512,
                                     layer_types=["sliding_attention", "full_attention"] * 2))
    assert mixed.kv_bytes(4096) == 2 * per_layer * 512 + 2 * per_layer * 4096
    # attention FLOPs per token follow the window too: 2 x heads x (qk + v dims) per key
    assert attention_flops_per_token(every, 4096) == 4 * 2 * 8 * 64 * 512


def test_seed_kv_cache_llama2_70b_at_128k():
    # The course: about 332 GB with MHA (64 KV heads), about 42 GB with GQA (8). 128K = 128,000 tokens, GB decimal.
    # Exactly: 80 x 2 x 64 x 128 x 2 B = 2.62 MB/token -> 335.5 GB; the seed rounds to 2.6 MB/token (332.8 GB).
    gqa = kv_report(load_model_shape("llama-2-70b"), 128_000)
    mha = kv_report(load_model_shape("llama-2-70b", kv_heads=64), 128_000)
    assert gqa["bytes_per_token"] == 327_680 and mha["bytes_per_token"] == 2_621_440
    assert gqa["kv_at_context"]["GB"] == pytest.approx(42, rel=0.01)
    assert mha["kv_at_context"]["GB"] == pytest.approx(332, rel=0.015)
    assert gqa["mha_bytes_per_token"] == mha["bytes_per_token"]
    assert mha["attention"] == "MHA"


def test_deepseek_mla_cache_and_param_counts():
    ds = load_model_shape("deepseek-v3")
    assert ds.kv_bytes_per_token() == 61 * (512 + 64) * 2
    assert ds.num_params() / 1e9 == pytest.approx(671, rel=0.002)  # DeepSeek: 671B total, 37B active
    assert ds.num_params(active_only=True) / 1e9 == pytest.approx(37.5, rel=0.01)
    mix = load_model_shape("mixtral-8x7b")
    assert mix.num_params() / 1e9 == pytest.approx(46.7, rel=0.002)
    assert mix.num_params(active_only=True) / 1e9 == pytest.approx(12.9, rel=0.002)
    assert load_model_shape("gpt2").num_params() == 124_439_808  # HF's GPT-2 small, biases and positions included
    assert load_model_shape("llama-2-70b").num_params() == 68_976_648_192


def test_flops_hand_and_seed_quadratic_ratio():
    gpt2 = load_model_shape("gpt2")
    h, layers, vocab = 768, 12, 50257
    matmul_weights = layers * (h * 3 * h + h * h + 2 * h * 4 * h) + vocab * h  # qkv, proj, MLP; the tied head
    rep = flops_report(gpt2, 1024, compare_to=1024)
    # the planner counts 2 FLOPs per parameter a token passes through (biases and norm weights too: +0.1%)
    assert rep["mlp_and_projection_flops_per_token"] == pytest.approx(2 * matmul_weights, rel=1e-3)
    assert rep["attention_flops_per_token_at_seq_len"] == layers * 2 * 12 * (64 + 64) * 1024
    assert rep["attention_flops_per_sequence"] == layers * 2 * 12 * 128 * 1024 * 1024
    assert rep["attention_flops_per_sequence_causal"] == layers * 2 * 12 * 128 * 1024 * 1025 // 2
    # the seed: attention at 128K tokens costs 16,384x its cost at 1K (quadratic in the length)
    big = flops_report(load_model_shape("llama-2-70b"), 128 * 1024, compare_to=1024)
    assert big["attention_ratio"] == 16384


def test_seed_training_memory():
    # 12 bytes per parameter = bf16 weights (2) + bf16 grads (2) + fp32 Adam m and v (8), no fp32 master copy
    rep = train_report(70e9, 8, "bf16")
    assert rep["model_states_total_GB"] == pytest.approx(840)
    by_stage = {r["zero_stage"]: r["states_GB"] for r in rep["stages"]}
    assert by_stage[0] == pytest.approx(840)
    assert by_stage[1] == pytest.approx(350)  # 2 + 2 + 8/8 bytes per parameter on each GPU
    assert by_stage[2] == pytest.approx(70e9 * (2 + 2 / 8 + 8 / 8) / GB)
    assert by_stage[3] == pytest.approx(105)
    assert train_report(7e9, 1, "bf16")["model_states_total_GB"] == pytest.approx(84)
    assert train_report(7e9, 1, "mixed")["model_states_total_GB"] == pytest.approx(112)  # ZeRO paper's 16 B
    with pytest.raises(ValueError, match="ZeRO stage"):
        train_report(7e9, 1, stages=(4,))


def test_activation_memory_hand_computation():
    gpt2 = load_model_shape("gpt2")
    s, h, heads, i, layers = 1024, 768, 12, 3072, 12
    per_token_layer = 2 * 2 * h + 2 * (h + h + h + h + h) + 2 * (h + 2 * i)
    none = activations(gpt2, s, 1, "none")
    assert none["layers"] == layers * s * (per_token_layer + 2 * heads * s)
    assert activations(gpt2, s, 1, "selective")["layers"] == layers * s * per_token_layer
    assert activations(gpt2, s, 1, "full")["layers"] == layers * s * 2 * h + s * per_token_layer
    assert none["logits"] == 4 * 50257 * s
    assert activations(gpt2, s, 2, "full", tp=2)["total"] == activations(gpt2, s, 2, "full")["total"] / 2


def test_serve_roofline_hand_computation():
    shape, gpu = load_model_shape("llama-3-8b"), get_gpu("h100")
    rep = serve_report(shape, gpu, context=4096)
    weights = shape.num_params() * 2
    assert rep["weights"]["bytes"] == weights
    kv_seq = 4096 * 32 * 2 * 8 * 128 * 2
    reserve = 2048 * (4096 * 64 + 128256 * 8)
    usable = 80 * 2**30 * 0.9 - weights - reserve
    assert rep["max_concurrent_requests"] == int(usable // kv_seq)
    assert rep["decode_batch1_tok_s"] == pytest.approx(3.35e12 / (weights + kv_seq))
    assert rep["compute_bound_batch"] is None  # GQA at 4K: each row's KV read outlasts its math
    fp8 = serve_report(shape, gpu, 4096, weight_dtype="fp8")
    assert fp8["weights"]["bytes"] == shape.num_params() and fp8["max_concurrent_requests"] > rep["max_concurrent_requests"]
    tp2 = serve_report(load_model_shape("llama-2-70b"), gpu, 4096, tp=2)
    assert tp2["fits"] and not serve_report(load_model_shape("llama-2-70b"), gpu, 4096)["fits"]


def _gpt3(tmp_path):
    d = tmp_path / "gpt3-175b"
    d.mkdir()
    (d / "config.json").write_text(json.dumps(dict(model_type="gpt2", n_embd=12288, n_layer=96, n_head=96,
                                                   n_positions=2048, vocab_size=50257)))
    return load_model_shape(str(d))


def test_advisor_five_configurations(tmp_path):
    small = advise_training(load_model_shape("gpt2"), get_gpu("a100-80gb"), 1, seq_len=1024)
    assert (small["dp"], small["tp"], small["pp"], small["zero_stage"]) == (1, 1, 1, 0)
    assert "data parallelism alone works" in small["reasons"][-1]

    llama8 = advise_training(load_model_shape("llama-3-8b"), get_gpu("h100"), 8, seq_len=4096)
    assert (llama8["dp"], llama8["tp"], llama8["zero_stage"]) == (8, 1, 1)  # ZeRO-0 needs 130 GB per GPU

    mixtral = advise_training(load_model_shape("mixtral-8x7b"), get_gpu("h200"), 8, seq_len=4096)
    assert mixtral["ep"] > 1 and mixtral["tp"] == 1 and "expert parallelism" in mixtral["reasons"][-1]

    llama70 = advise_training(load_model_shape("llama-2-70b"), get_gpu("h100"), 64, seq_len=4096)
    assert (llama70["tp"], llama70["pp"], llama70["dp"]) == (8, 1, 8)
    assert any("ZeRO-3 would fit" in r for r in llama70["reasons"])  # but not across nodes

    gpt3 = _gpt3(tmp_path)
    assert gpt3.num_params() / 1e9 == pytest.approx(175, rel=0.01)
    big = advise_training(gpt3, get_gpu("a100-80gb"), 64, seq_len=2048)
    assert big["tp"] == 8 and big["pp"] >= 2 and big["tp"] * big["pp"] * big["dp"] == 64
    assert big["per_gpu_GB"] * GB <= 0.9 * 80 * 2**30

    with pytest.raises(ValueError, match="does not fit on 8 x l4"):
        advise_training(gpt3, get_gpu("l4"), 8)
    serve = advise_serving(load_model_shape("llama-2-70b"), get_gpu("h100"), 8, 4096, min_batch=8)
    assert serve["tp"] == 2 and serve["replicas"] == 4


def test_cli_json_and_errors(capsys):
    assert main(["plan", "kv", "llama-2-70b", "--context", "128000", "--json"]) == 0
    rep = json.loads(capsys.readouterr().out)
    assert rep["kv_at_context"]["bytes"] == 327_680 * 128_000
    assert main(["plan", "train", "--params", "70e9", "--gpus", "8", "--zero", "1", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["stages"][0]["states_GB"] == pytest.approx(350)
    assert main(["plan", "parallel", "gpt2", "--gpus", "1", "--gpu", "a100-80gb"]) == 0
    assert "data parallelism alone works" in capsys.readouterr().out
    for argv, needle in ([["plan", "kv", "no-such-model"], "neither a directory"],
                         [["plan", "serve", "gpt2", "--gpu", "tpu9"], "unknown GPU preset 'tpu9'"],
                         [["plan", "train"], "needs a model"],
                         [["plan", "serve", "gpt2", "--gpu", "none", "--memory-gb", "8"], "--bandwidth-gbps"],
                         [["plan", "kv", "llama-2-70b", "--kv-heads", "3"], "kv_heads must divide"]):
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert needle in err and err.count("\n") == 1, err


def test_config_without_needed_fields(tmp_path):
    d = tmp_path / "broken"
    d.mkdir()
    (d / "config.json").write_text(json.dumps({"hidden_size": 64, "num_hidden_layers": 2}))
    with pytest.raises(ValueError, match="lacks num_attention_heads, vocab_size"):
        load_model_shape(str(d))
    assert attention_flops_per_sequence(load_model_shape("gpt2"), 2) == 12 * 2 * 12 * 128 * 4
