"""A model's shape for planning: read from an HF config.json (a directory or a preset name in benchmarks/configs),
parameter counts by part, and the attention kind. KV bytes per token come from frontierlm.config.ModelConfig,
the same numbers the engine sizes its cache with."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import torch

from frontierlm.config import ModelConfig
from frontierlm.jsonfile import read_json_object

PRESET_DIR = Path(__file__).resolve().parents[2] / "benchmarks" / "configs"
DTYPE_BYTES = {"fp32": 4.0, "bf16": 2.0, "fp16": 2.0, "fp8": 1.0, "int8": 1.0, "int4": 0.5}
_TORCH_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16, "fp8": torch.float8_e4m3fn,
                 "fp8_e4m3": torch.float8_e4m3fn, "fp8_e5m2": torch.float8_e5m2}  # the engine's kv_cache_dtype names
# GPT-2-style configs name the same fields differently
_GPT2_NAMES = {"n_embd": "hidden_size", "n_layer": "num_hidden_layers", "n_head": "num_attention_heads",
               "n_positions": "max_position_embeddings", "n_inner": "intermediate_size"}


def preset_names() -> list[str]:
    return sorted(p.parent.name for p in PRESET_DIR.glob("*/config.json")) if PRESET_DIR.is_dir() else []


def read_config(model: str) -> tuple[str, dict]:
    """(name, raw config dict) for a directory holding config.json, a config.json path, or a preset name."""
    path = Path(model)
    if path.is_dir():
        path = path / "config.json"
    elif not path.is_file():
        path = PRESET_DIR / model / "config.json"
    if not path.is_file():
        raise ValueError(f"{model!r} is neither a directory with a config.json nor a preset "
                         f"(presets: {', '.join(preset_names()) or 'none found'})")
    raw = read_json_object(path)
    return path.parent.name, raw


def kv_torch_dtype(name: str) -> torch.dtype:
    if name not in _TORCH_DTYPES:
        raise ValueError(f"KV dtype must be one of {', '.join(_TORCH_DTYPES)}, got {name!r}")
    return _TORCH_DTYPES[name]


@dataclass
class ModelShape:
    name: str
    raw: dict
    mc: ModelConfig
    intermediate_size: int
    gated_mlp: bool
    biases: bool
    layer_norm: bool  # LayerNorm (weight + bias) rather than RMSNorm
    learned_positions: int  # rows of a learned position embedding (GPT-2), else 0
    num_experts: int = 0
    experts_per_token: int = 0
    moe_intermediate_size: int = 0
    shared_expert_intermediate: int = 0
    moe_layers: tuple[int, ...] = ()

    # ---- attention ---------------------------------------------------------------------------------
    @property
    def attention_kind(self) -> str:
        mc = self.mc
        if mc.is_mla:
            return "MLA"
        kind = "MHA" if mc.num_kv_heads == mc.num_heads else "MQA" if mc.num_kv_heads == 1 else "GQA"
        return kind + (f" + sliding window {mc.sliding_window}" if mc.sliding_window else "")

    @property
    def qk_head_dim(self) -> int:
        r = self.raw
        return r["qk_nope_head_dim"] + r["qk_rope_head_dim"] if self.mc.is_mla else self.mc.head_dim

    @property
    def v_head_dim(self) -> int:
        return self.raw["v_head_dim"] if self.mc.is_mla else self.mc.head_dim

    def kv_bytes_per_token(self, kv_dtype: str = "bf16") -> int:
        return self.mc.kv_cache_bytes_per_token(kv_torch_dtype(kv_dtype))

    def kv_bytes(self, context: int, kv_dtype: str = "bf16") -> int:
        """Bytes one sequence of `context` tokens caches; a sliding-window layer keeps at most its window."""
        per_layer = self.kv_bytes_per_token(kv_dtype) // self.mc.num_layers
        return sum(per_layer * min(context, self.mc.layer_sliding_window(i) or context)
                   for i in range(self.mc.num_layers))

    # ---- parameters --------------------------------------------------------------------------------
    def attention_params(self) -> int:
        mc, r, h = self.mc, self.raw, self.mc.hidden_size
        if mc.is_mla:
            q_out = mc.num_heads * self.qk_head_dim
            q = h * q_out if not r.get("q_lora_rank") else h * r["q_lora_rank"] + r["q_lora_rank"] * (q_out + 1)
            kv = h * (mc.kv_lora_rank + mc.qk_rope_head_dim) + mc.kv_lora_rank * (
                1 + mc.num_heads * (r["qk_nope_head_dim"] + r["v_head_dim"]))
            return q + kv + mc.num_heads * r["v_head_dim"] * h
        q, kv = mc.num_heads * mc.head_dim, mc.num_kv_heads * mc.head_dim
        bias = (q + 2 * kv + h) if self.biases else (q + 2 * kv if r.get("attention_bias") or
                                                     r.get("model_type") == "qwen2" else 0)
        return h * (q + 2 * kv) + q * h + bias

    def dense_mlp_params(self) -> int:
        h, i = self.mc.hidden_size, self.intermediate_size
        return (3 if self.gated_mlp else 2) * h * i + ((i + h) if self.biases else 0)

    def expert_params(self) -> int:
        """One routed expert (gated: gate, up, down)."""
        return 3 * self.mc.hidden_size * self.moe_intermediate_size

    def moe_layer_params(self, active_only: bool = False) -> int:
        h = self.mc.hidden_size
        experts = self.experts_per_token if active_only else self.num_experts
        return experts * self.expert_params() + 3 * h * self.shared_expert_intermediate + h * self.num_experts

    def layer_params(self, layer: int, active_only: bool = False) -> int:
        norms = 2 * self.mc.hidden_size * (2 if self.layer_norm else 1)
        mlp = self.moe_layer_params(active_only) if layer in self.moe_layers else self.dense_mlp_params()
        return self.attention_params() + mlp + norms

    def embedding_params(self) -> int:
        """Input embedding, output head (unless tied), learned positions and the final norm."""
        mc = self.mc
        head = 0 if mc.tie_word_embeddings else mc.vocab_size * mc.hidden_size
        return (mc.vocab_size + self.learned_positions) * mc.hidden_size + head + \
            mc.hidden_size * (2 if self.layer_norm else 1)

    def num_params(self, active_only: bool = False) -> int:
        """Total parameters (or those one token uses); DeepSeek's MTP modules are not counted (as DeepSeek does)."""
        return self.embedding_params() + sum(self.layer_params(i, active_only) for i in range(self.mc.num_layers))

    def routed_expert_params(self) -> int:
        return len(self.moe_layers) * self.num_experts * self.expert_params()

    @property
    def is_moe(self) -> bool:
        return self.num_experts > 0

    def matmul_params_per_token(self) -> int:
        """Weights a token multiplies through (active experts, LM head; not the embedding lookup)."""
        mc = self.mc
        lookup = (mc.vocab_size + self.learned_positions) * mc.hidden_size
        head = mc.vocab_size * mc.hidden_size if mc.tie_word_embeddings else 0  # tied: the head is the lookup
        return self.num_params(active_only=True) - lookup + head


def _need(raw: dict, name: str, *fields: str) -> None:
    missing = [f for f in fields if raw.get(f) is None]
    if missing:
        raise ValueError(f"config of {name!r} lacks {', '.join(missing)} (needed to plan)")


def load_model_shape(model: str, kv_heads: int | None = None) -> ModelShape:
    """Read a model's shape; `kv_heads` replaces num_key_value_heads (e.g. to compare GQA with MHA)."""
    name, raw = read_config(model)
    raw = dict(raw)
    gpt2 = raw.get("model_type") == "gpt2" or "n_embd" in raw
    if gpt2:
        for old, new in _GPT2_NAMES.items():
            if old in raw and raw.get(new) is None:
                raw[new] = raw[old]
        raw.setdefault("tie_word_embeddings", True)
    _need(raw, name, "hidden_size", "num_hidden_layers", "num_attention_heads", "vocab_size")
    if kv_heads is not None:
        if raw.get("kv_lora_rank"):
            raise ValueError(f"{name!r} uses MLA (latent KV cache); --kv-heads does not apply")
        if kv_heads <= 0 or raw["num_attention_heads"] % kv_heads:
            raise ValueError(f"kv_heads must divide num_attention_heads ({raw['num_attention_heads']}), got {kv_heads}")
        raw["num_key_value_heads"] = kv_heads
    if raw.get("kv_lora_rank"):
        _need(raw, name, "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim")
    raw.setdefault("max_position_embeddings", raw.get("max_position_embeddings") or 0)
    h = raw["hidden_size"]
    intermediate = raw.get("intermediate_size") or (4 * h if gpt2 else None)
    if intermediate is None:
        raise ValueError(f"config of {name!r} lacks intermediate_size (needed to plan)")
    ns = SimpleNamespace(**raw)
    ns.architectures = raw.get("architectures") or [raw.get("model_type", "unknown")]
    dtype = str(raw.get("torch_dtype") or raw.get("dtype") or "bfloat16").removeprefix("torch.")
    mc = ModelConfig(name, ns, getattr(torch, dtype, torch.bfloat16), [], None, [])

    layers = mc.num_layers
    num_experts = raw.get("n_routed_experts") or raw.get("num_local_experts") or raw.get("num_experts") or 0
    moe_layers: tuple[int, ...] = ()
    shared = 0
    moe_inter = raw.get("moe_intermediate_size") or intermediate
    if num_experts:
        _need(raw, name, "num_experts_per_tok")
        if raw.get("n_routed_experts"):  # DeepSeek: dense first layers, then every moe_layer_freq-th layer
            first, freq = raw.get("first_k_dense_replace", 0), raw.get("moe_layer_freq", 1)
            moe_layers = tuple(i for i in range(layers) if i >= first and i % freq == 0)
            shared = (raw.get("n_shared_experts") or 0) * moe_inter
        elif raw.get("num_local_experts"):  # Mixtral: every layer
            moe_layers = tuple(range(layers))
        else:  # Qwen MoE: decoder_sparse_step and mlp_only_layers
            step, dense = raw.get("decoder_sparse_step", 1) or 1, set(raw.get("mlp_only_layers") or [])
            moe_layers = tuple(i for i in range(layers) if i not in dense and (i + 1) % step == 0)
            shared = raw.get("shared_expert_intermediate_size") or 0
    return ModelShape(name, raw, mc, intermediate, gated_mlp=not gpt2, biases=gpt2, layer_norm=gpt2,
                      learned_positions=raw.get("max_position_embeddings", 0) if gpt2 else 0,
                      num_experts=num_experts, experts_per_token=raw.get("num_experts_per_tok") or 0,
                      moe_intermediate_size=moe_inter if num_experts else 0,
                      shared_expert_intermediate=shared, moe_layers=moe_layers)
