"""MLA specifics (absorbed decode vs decompression, latent cache size), DeepSeek-V3 multi-token prediction,
the expert-load counters through the engine, and loader errors for MoE checkpoints."""
from __future__ import annotations

import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file

from factories import make_model_dir
from frontierlm import LLM, SamplingParams
from frontierlm.config import ModelConfig
from frontierlm.layers.attention import AttentionMetadata
from frontierlm.models.loader import load_model


def ours(path):
    return load_model(ModelConfig.from_pretrained(path), "cpu")


def _meta(slots, qlens, slens, tables, block_size):
    return AttentionMetadata(
        slot_mapping=torch.tensor(slots), query_start_loc=torch.tensor([0] + list(torch.tensor(qlens).cumsum(0)),
                                                                       dtype=torch.int32),
        seq_lens=torch.tensor(slens, dtype=torch.int32), block_tables=torch.tensor(tables, dtype=torch.int32),
        query_lens_cpu=qlens, seq_lens_cpu=slens, max_query_len=max(qlens), max_seq_len=max(slens),
        block_size=block_size)


@pytest.mark.parametrize("arch", ["deepseek_v2", "deepseek_v3"])
@torch.inference_mode()
def test_absorbed_decode_equals_decompressed_attention(tiny_model_dir, arch):
    """One MLA layer: prefill 19 tokens into the latent cache, then decode 3 more one at a time (absorbed
    path: W_UK folded into the query, W_UV into the output); every output row equals the decompressed
    attention over the whole sequence computed without any cache."""
    model = ours(tiny_model_dir(arch))
    attn, rotary = model.model.layers[0].self_attn, model.model.rotary_emb
    bs, n = 4, 22
    attn.bind_kv_cache(torch.zeros(attn.kv_cache_shape(8, bs)))
    table = [5, 2, 7, 0, 3, 6]
    x = torch.randn(n, model.config.hidden_size, generator=torch.Generator().manual_seed(0))
    pos = torch.arange(n)
    full = attn(x, model.model.rope(pos, None), rotary, None)  # decompressed, plain causal
    plan_of = model.attn_backend.plan
    slots = [table[p // bs] * bs + p % bs for p in range(n)]
    meta = _meta(slots[:19], [19], [19], [table], bs)
    out = attn(x[:19], model.model.rope(pos[:19], meta), rotary, plan_of(meta))
    torch.testing.assert_close(out, full[:19], atol=1e-5, rtol=0)
    for p in range(19, n):
        meta = _meta([slots[p]], [1], [p + 1], [table], bs)
        out = attn(x[p:p + 1], model.model.rope(pos[p:p + 1], meta), rotary, plan_of(meta))
        torch.testing.assert_close(out, full[p:p + 1], atol=1e-5, rtol=0)
    # the cache holds only latent + rope key rows: kv_lora_rank + qk_rope_head_dim numbers per token
    assert attn.kv_cache.shape == (8, bs, 16 + 8)


def test_kv_bytes_per_token_and_startup_report(tiny_model_dir):
    path = tiny_model_dir("deepseek_v3")
    mc = ModelConfig.from_pretrained(path)
    assert mc.is_mla and mc.kv_cache_bytes_per_token() == 3 * (16 + 8) * 4
    assert mc.kv_cache_bytes_per_token(torch.bfloat16) == 3 * (16 + 8) * 2
    assert mc.mha_kv_cache_bytes_per_token() == 3 * 4 * (16 + 8 + 12) * 4
    llm = LLM(path, block_size=4, kv_cache_memory_gb=0.001)
    report = llm.llm_engine.startup_report
    assert f"{3 * 24 * 4} bytes/token" in report and f"would need {3 * 4 * 36 * 4}" in report
    assert llm.llm_engine.runner.kv_caches[0].shape[1:] == (4, 24)


def test_deepseek_v2_kv_reduction_at_real_shapes():
    """Real configs (no weights): DeepSeek-V2 caches 576 numbers per token and layer instead of 128 heads x
    (192 + 128); V2-Lite 576 instead of 16 x 320."""
    def mc(**kw):
        cfg = transformers.DeepseekV2Config(**kw)
        cfg.architectures = ["DeepseekV2ForCausalLM"]
        return ModelConfig(".", cfg, torch.bfloat16, [], None, [])

    v2 = mc(num_hidden_layers=60, num_attention_heads=128, kv_lora_rank=512, qk_rope_head_dim=64,
            qk_nope_head_dim=128, v_head_dim=128, hidden_size=5120)
    assert v2.kv_cache_bytes_per_token() == 60 * 576 * 2 == 69_120
    assert v2.mha_kv_cache_bytes_per_token() == 60 * 128 * 320 * 2
    assert 1 - v2.kv_cache_bytes_per_token() / v2.mha_kv_cache_bytes_per_token() > 0.98
    lite = mc(num_hidden_layers=27, num_attention_heads=16, kv_lora_rank=512, qk_rope_head_dim=64,
              qk_nope_head_dim=128, v_head_dim=128, hidden_size=2048)
    assert lite.kv_cache_bytes_per_token() == 27 * 576 * 2
    assert lite.mha_kv_cache_bytes_per_token() == 27 * 16 * 320 * 2


# ---------------------------------------------------------------- multi-token prediction

def _add_mtp_weights(path, seed=1):
    """transformers does not save DeepSeek-V3's MTP module; add one under model.layers.{L} as DeepSeek does,
    copied from a transformers decoder layer so the reference below can run it."""
    cfg = transformers.AutoConfig.from_pretrained(path)
    num_layers = cfg.num_hidden_layers
    torch.manual_seed(seed)
    ref_layer = transformers.models.deepseek_v3.modeling_deepseek_v3.DeepseekV3DecoderLayer(cfg, num_layers)
    weights = load_file(str(path / "model.safetensors"))
    prefix = f"model.layers.{num_layers}."
    state = {}
    for name, p in ref_layer.state_dict().items():
        t = torch.randn(p.shape) * 0.08 if p.dim() >= 2 else torch.ones(p.shape) + 0.1 * torch.randn(p.shape)
        state[name] = 0.05 * torch.randn(p.shape) if name.endswith("e_score_correction_bias") else t
    ref_layer.load_state_dict(state)
    for name, t in state.items():  # transformers fuses the experts in memory; checkpoints keep one per expert
        if name == "mlp.experts.gate_up_proj":
            for e, (gate, up) in enumerate(w.chunk(2, dim=0) for w in t):
                weights[f"{prefix}mlp.experts.{e}.gate_proj.weight"] = gate.contiguous()
                weights[f"{prefix}mlp.experts.{e}.up_proj.weight"] = up.contiguous()
        elif name == "mlp.experts.down_proj":
            for e, down in enumerate(t):
                weights[f"{prefix}mlp.experts.{e}.down_proj.weight"] = down.contiguous()
        else:
            weights[prefix + name] = t
    h = cfg.hidden_size
    weights[prefix + "enorm.weight"] = 1 + 0.1 * torch.randn(h)
    weights[prefix + "hnorm.weight"] = 1 + 0.1 * torch.randn(h)
    weights[prefix + "eh_proj.weight"] = 0.08 * torch.randn(h, 2 * h)
    weights[prefix + "shared_head.norm.weight"] = 1 + 0.1 * torch.randn(h)
    weights[prefix + "shared_head.head.weight"] = weights["lm_head.weight"].clone()
    weights[prefix + "embed_tokens.weight"] = weights["model.embed_tokens.weight"].clone()
    save_file(weights, str(path / "model.safetensors"), metadata={"format": "pt"})
    return cfg, ref_layer.eval(), weights, prefix


@torch.inference_mode()
def test_mtp_module_loads_and_matches_reference(tmp_path):
    path = make_model_dir(tmp_path / "v3", "deepseek_v3", num_nextn_predict_layers=1)
    assert ours(path).num_mtp_layers == 0  # config asks for one, the checkpoint has none: main model only
    cfg, ref_layer, w, prefix = _add_mtp_weights(path)
    model = ours(path)
    assert model.num_mtp_layers == 1 and len(model.kv_cache_modules()) == cfg.num_hidden_layers

    ids = torch.randint(10, 500, (1, 15), generator=torch.Generator().manual_seed(3))
    pos = torch.arange(15)[None]
    hidden = model(ids, pos)
    # MTP depth 0: hidden at i and token i + 1 -> logits for token i + 2
    mtp_h = model.mtp_forward(ids[:, 1:], pos[:, :-1], hidden[:, :-1])
    logits = model.mtp_logits(mtp_h)

    def rms(x, weight, eps=cfg.rms_norm_eps):
        return weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))

    emb = w["model.embed_tokens.weight"][ids[:, 1:]]
    x = torch.cat([rms(emb, w[prefix + "enorm.weight"]), rms(hidden[:, :-1], w[prefix + "hnorm.weight"])], -1)
    x = x @ w[prefix + "eh_proj.weight"].T
    rotary = transformers.models.deepseek_v3.modeling_deepseek_v3.DeepseekV3RotaryEmbedding(cfg)
    mask = torch.full((14, 14), float("-inf")).triu(1)[None, None]
    x = ref_layer(x, attention_mask=mask, position_ids=pos[:, :-1], position_embeddings=rotary(x, pos[:, :-1]))
    x = x[0] if isinstance(x, tuple) else x
    ref = rms(x, w[prefix + "shared_head.norm.weight"]) @ w["lm_head.weight"].T
    torch.testing.assert_close(logits, ref, atol=1e-4, rtol=0)
    with pytest.raises(ValueError, match="MTP depth 1"):
        model.mtp_forward(ids[:, 1:], pos[:, :-1], hidden[:, :-1], depth=1)
    # the engine serves the main model as usual with the MTP weights present
    out = LLM(str(path), block_size=4).generate([ids[0].tolist()], SamplingParams(max_tokens=4, temperature=0),
                                                 use_tqdm=False)
    assert len(out[0].outputs[0].token_ids) == 4


# ---------------------------------------------------------------- expert load through the engine

@pytest.mark.parametrize("arch,moe_layers", [("qwen2_moe", 2), ("deepseek_v3", 2), ("mixtral", 2)])
def test_expert_load_counts_every_routed_token(tiny_model_dir, arch, moe_layers):
    llm = LLM(tiny_model_dir(arch), block_size=4, enable_prefix_caching=False)
    prompts = [[11 + i, 40 + 3 * i, 77, 90 + i, 300 - i][: 2 + i] for i in range(4)]
    params = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)
    llm.generate(prompts, params, use_tqdm=False)
    load = llm.llm_engine.expert_load()
    processed = sum(len(p) for p in prompts) + len(prompts) * (6 - 1)  # the last sampled token is never fed
    assert len(load) == moe_layers and all(len(layer) == 8 for layer in load)
    assert all(sum(layer) == processed * 2 for layer in load)  # top-2
    assert max(max(layer) for layer in load) < processed  # an expert sees a token at most once per layer
    llm.llm_engine.runner.model.reset_expert_load()
    assert all(sum(layer) == 0 for layer in llm.llm_engine.expert_load())


def test_dense_model_has_no_expert_load(tiny_model_dir):
    assert LLM(tiny_model_dir("llama"), block_size=4).llm_engine.expert_load() == []


def test_missing_expert_weight_is_named(tmp_path):
    for arch, name in [("qwen3_moe", "model.layers.1.mlp.experts.3.up_proj.weight"),
                       ("mixtral", "model.layers.0.block_sparse_moe.experts.5.w2.weight")]:
        path = make_model_dir(tmp_path / arch, arch)
        weights = load_file(str(path / "model.safetensors"))
        del weights[name]
        save_file(weights, str(path / "model.safetensors"), metadata={"format": "pt"})
        with pytest.raises(ValueError, match=name.replace(".", r"\.")):
            ours(path)
