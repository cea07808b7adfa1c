"""Llama-family decoder: Llama, Mistral (sliding window), Qwen2 (q/k/v bias), Qwen3 (per-head q/k RMSNorm).

One implementation; the differences are three flags read from the config. GQA / MQA / MHA come from
num_key_value_heads.
"""
from __future__ import annotations

import torch
from torch import nn

from frontierlm.config import ModelConfig
from frontierlm.layers.attention import Attention, AttentionBackend, AttentionMetadata, get_attn_backend
from frontierlm.distributed.layers import QKVParallelLinear, RowParallelLinear, VocabParallelEmbedding
from frontierlm.distributed.pipeline import MissingEmbedding, first_stage_only, stage_layers
from frontierlm.layers.mlp import GatedMLP
from frontierlm.layers.norm import RMSNorm
from frontierlm.layers.rotary import RotaryEmbedding, rope_parameters
from frontierlm.models.decoder import CausalLM, DecoderLayer


class LlamaAttention(nn.Module):
    def __init__(self, mc: ModelConfig, layer_idx: int, backend: AttentionBackend, qkv_bias: bool, qk_norm: bool):
        super().__init__()
        c = mc.hf_config
        self.head_dim = mc.head_dim
        out_bias = bool(getattr(c, "attention_bias", False))
        self.qkv_proj = QKVParallelLinear(mc.hidden_size, self.head_dim, mc.num_heads, mc.num_kv_heads, bias=qkv_bias)
        self.num_heads, self.num_kv_heads = self.qkv_proj.num_heads, self.qkv_proj.num_kv_heads  # this rank's
        self.o_proj = RowParallelLinear(mc.num_heads * self.head_dim, mc.hidden_size, bias=out_bias)
        if qk_norm:  # Qwen3: RMSNorm over each head's dims, before RoPE
            self.q_norm = RMSNorm(self.head_dim, c.rms_norm_eps)
            self.k_norm = RMSNorm(self.head_dim, c.rms_norm_eps)
        self.qk_norm = qk_norm
        self.attn = Attention(self.num_heads, self.num_kv_heads, self.head_dim, self.head_dim ** -0.5,
                              mc.layer_sliding_window(layer_idx), backend)

    def forward(self, x: torch.Tensor, cos_sin, rotary: RotaryEmbedding, plan) -> torch.Tensor:
        lead = x.shape[:-1]
        hq, hkv, d = self.num_heads, self.num_kv_heads, self.head_dim
        qkv = self.qkv_proj.packed(x)
        qk, v = qkv.split([(hq + hkv) * d, hkv * d], dim=-1)
        v = v.view(*lead, hkv, d)
        if self.qk_norm:  # Qwen3: each of q and k gets its own RMSNorm first
            q, k = qk.view(*lead, hq + hkv, d).split([hq, hkv], dim=-2)
            q, k = rotary(self.q_norm(q), cos_sin), rotary(self.k_norm(k), cos_sin)
        else:  # q and k sit side by side: rotate them as one tensor of Hq + Hkv heads
            q, k = rotary(qk.view(*lead, hq + hkv, d), cos_sin).split([hq, hkv], dim=-2)
        o = self.attn(q, k, v, plan)
        return self.o_proj(o.reshape(*lead, self.num_heads * self.head_dim))


def dense_mlp(mc: ModelConfig, intermediate_size: int | None = None) -> GatedMLP:
    c = mc.hf_config
    return GatedMLP(mc.hidden_size, intermediate_size or c.intermediate_size, getattr(c, "hidden_act", "silu"),
                    bias=bool(getattr(c, "mlp_bias", False)))


class LlamaModel(nn.Module):
    def __init__(self, mc: ModelConfig, backend: AttentionBackend, qkv_bias: bool, qk_norm: bool, make_mlp):
        super().__init__()
        c = mc.hf_config
        self.embed_tokens = first_stage_only(lambda: VocabParallelEmbedding(mc.vocab_size, mc.hidden_size)) or \
            MissingEmbedding(mc.hidden_size)
        self.layers = stage_layers(mc.num_layers, lambda i: DecoderLayer(
            LlamaAttention(mc, i, backend, qkv_bias, qk_norm), make_mlp(mc, i), mc.hidden_size, c.rms_norm_eps))
        self.norm = RMSNorm(mc.hidden_size, c.rms_norm_eps)
        self.rotary_emb = RotaryEmbedding(mc.head_dim, mc.max_model_len, rope_parameters(c))

    def forward(self, input_ids, positions, attn_meta, plan):
        dynamic = self.rotary_emb.rope_type == "dynamic"  # needs each token's sequence length
        seq_lens = None
        if attn_meta is None:
            # Contiguous sequences: the context length is the largest position + 1 (transformers' rule).
            max_len = int(positions.max()) + 1 if positions.numel() else 0
            if dynamic:
                seq_lens = torch.full_like(positions, max_len)
        else:
            max_len = attn_meta.max_seq_len
            if dynamic:
                seq_lens = _token_seq_lens(attn_meta, positions.shape[0])
        cos_sin = self.rotary_emb.expand(self.rotary_emb.cos_sin_for(positions, seq_lens, max_len),
                                         self.norm.weight.dtype)
        x, residual = self.embed_tokens(input_ids), None
        for layer in self.layers:
            x, residual = layer(x, residual, cos_sin, self.rotary_emb, plan)
        x, _ = self.norm(x, residual)
        return x


def _token_seq_lens(meta: AttentionMetadata, num_tokens: int) -> torch.Tensor:
    lens = meta.seq_lens.long().repeat_interleave(torch.tensor(meta.query_lens_cpu, device=meta.seq_lens.device))
    if lens.shape[0] < num_tokens:  # padding rows
        lens = torch.cat([lens, lens.new_ones(num_tokens - lens.shape[0])])
    return lens


class LlamaForCausalLM(CausalLM):
    # checkpoint name -> (our parameter name, shard id): one loader serves every architecture.
    packed_modules_mapping = {
        "q_proj": ("qkv_proj", "q"),
        "k_proj": ("qkv_proj", "k"),
        "v_proj": ("qkv_proj", "v"),
        "gate_proj": ("gate_up_proj", 0),
        "up_proj": ("gate_up_proj", 1),
    }
    qkv_bias_always = False  # Qwen2 has q/k/v bias whatever attention_bias says
    qk_norm = False

    def __init__(self, model_config: ModelConfig, attn_backend: AttentionBackend | None = None):
        super().__init__()
        self.config = model_config
        self.attn_backend = attn_backend or get_attn_backend()
        qkv_bias = self.qkv_bias_always or bool(getattr(model_config.hf_config, "attention_bias", False))
        self.model = LlamaModel(model_config, self.attn_backend, qkv_bias, self.qk_norm, self.make_mlp)
        self._init_head(model_config)

    def make_mlp(self, mc: ModelConfig, layer_idx: int) -> nn.Module:
        """The feed-forward block of one layer; MoE architectures override this."""
        return dense_mlp(mc)


class MistralForCausalLM(LlamaForCausalLM):
    pass


class Qwen2ForCausalLM(LlamaForCausalLM):
    qkv_bias_always = True


class Qwen3ForCausalLM(LlamaForCausalLM):
    qk_norm = True
