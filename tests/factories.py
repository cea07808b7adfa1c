"""Build tiny HF-format model directories locally: a BPE tokenizer trained on text that ships with
Python, and random-weight transformers models saved with save_pretrained. Nothing is downloaded."""
from __future__ import annotations

import functools
import os
from pathlib import Path

import torch

CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
SPECIAL_TOKENS = ["<unk>", "<s>", "</s>", "<pad>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"]
VOCAB_SIZE = 512


def _corpus() -> list[str]:
    from pydoc_data.topics import topics

    return list(topics.values())


@functools.lru_cache(maxsize=None)
def _tokenizer_json(vocab_size: int) -> str:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_corpus(), trainer=trainer)
    return tok.to_str()


def save_tokenizer(path: str | os.PathLike, vocab_size: int = VOCAB_SIZE) -> None:
    """Write tokenizer.json + tokenizer_config.json (with a chat template) into `path`."""
    from transformers import PreTrainedTokenizerFast
    from tokenizers import Tokenizer

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(_tokenizer_json(vocab_size)),
        bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="<pad>",
    )
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(str(path))


ARCH_CONFIGS = {
    "llama": ("LlamaConfig", "LlamaForCausalLM"),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM"),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM"),
    "mistral": ("MistralConfig", "MistralForCausalLM"),
    "mixtral": ("MixtralConfig", "MixtralForCausalLM"),
    "qwen2_moe": ("Qwen2MoeConfig", "Qwen2MoeForCausalLM"),
    "qwen3_moe": ("Qwen3MoeConfig", "Qwen3MoeForCausalLM"),
    "deepseek_v2": ("DeepseekV2Config", "DeepseekV2ForCausalLM"),
    "deepseek_v3": ("DeepseekV3Config", "DeepseekV3ForCausalLM"),
}

# Tiny MoE / MLA shapes: 8 experts (top-2) so routing matters, MLA ranks small but distinct.
_MOE = dict(num_experts_per_tok=2, moe_intermediate_size=32)
_MLA = dict(num_key_value_heads=4, kv_lora_rank=16, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=12, n_routed_experts=8,
            n_shared_experts=1, first_k_dense_replace=1, num_hidden_layers=3)
ARCH_EXTRAS = {
    "mixtral": dict(num_local_experts=8, num_experts_per_tok=2),
    "qwen2_moe": dict(num_experts=8, shared_expert_intermediate_size=48, decoder_sparse_step=1,
                      mlp_only_layers=[1], num_hidden_layers=3, **_MOE),
    "qwen3_moe": dict(num_experts=8, head_dim=16, norm_topk_prob=True, **_MOE),
    "deepseek_v2": dict(q_lora_rank=None, topk_method="group_limited_greedy", n_group=4, topk_group=2,
                        routed_scaling_factor=1.5, **_MLA, **_MOE),
    "deepseek_v3": dict(q_lora_rank=24, n_group=4, topk_group=2, routed_scaling_factor=2.5, norm_topk_prob=True,
                        num_nextn_predict_layers=0, **_MLA, **_MOE),
}


def tiny_config(arch: str = "llama", **overrides):
    import transformers

    cfg_cls = getattr(transformers, ARCH_CONFIGS[arch][0])
    kw = dict(
        vocab_size=VOCAB_SIZE, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
        rms_norm_eps=1e-6, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, pad_token_id=3,
    )
    if arch in ("qwen3",):
        kw["head_dim"] = 16
    if arch == "mistral":
        kw["sliding_window"] = 4096
    kw.update(ARCH_EXTRAS.get(arch, {}))
    kw.update(overrides)
    return cfg_cls(**kw)


def make_model_dir(path: str | os.PathLike, arch: str = "llama", seed: int = 0, dtype=torch.float32,
                   max_shard_size: str | None = None, **config_overrides) -> Path:
    """Save a random-weight `arch` model (plus tokenizer) to `path`; returns the path."""
    import transformers

    path = Path(path)
    cfg = tiny_config(arch, **config_overrides)
    torch.manual_seed(seed)
    model_cls = getattr(transformers, ARCH_CONFIGS[arch][1])
    model = model_cls(cfg).to(dtype).eval()
    # Random init leaves logits nearly flat; scale up so greedy choices are well separated.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() >= 2:
                p.normal_(0.0, 0.08 if "embed" not in name else 1.0)
        for name, b in model.named_buffers():
            if name.endswith("e_score_correction_bias"):  # DeepSeek-V3: make the selection-only bias matter
                b.normal_(0.0, 0.05)
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(str(path), **kwargs)
    save_tokenizer(path, cfg.vocab_size)
    return path


def load_hf_model(path: str | os.PathLike, dtype=torch.float32):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype).eval()
