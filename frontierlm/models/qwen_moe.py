"""Qwen2-MoE and Qwen3-MoE: Qwen2 / Qwen3 attention with a softmax-routed MoE feed-forward.

Qwen2-MoE adds an always-on shared expert whose output is scaled by sigmoid(shared_expert_gate(x)). Layers in
`mlp_only_layers`, or off the `decoder_sparse_step` stride, keep a dense MLP.
"""
from __future__ import annotations

from torch import nn

from frontierlm.config import ModelConfig
from frontierlm.layers.moe import MoE, RoutingConfig
from frontierlm.models.llama import LlamaForCausalLM, dense_mlp


def _num_experts(c) -> int:
    return getattr(c, "num_experts", None) or getattr(c, "num_local_experts", 0)


def is_sparse_layer(c, layer_idx: int) -> bool:
    return (layer_idx not in (getattr(c, "mlp_only_layers", None) or [])
            and _num_experts(c) > 0 and (layer_idx + 1) % (getattr(c, "decoder_sparse_step", 1) or 1) == 0)


class Qwen2MoeForCausalLM(LlamaForCausalLM):
    expert_weights_mapping = {"gate_proj": ("w13", 0), "up_proj": ("w13", 1), "down_proj": ("w2", None)}
    qkv_bias_always = True
    shared_expert = True

    def make_mlp(self, mc: ModelConfig, layer_idx: int) -> nn.Module:
        c = mc.hf_config
        if not is_sparse_layer(c, layer_idx):
            return dense_mlp(mc)
        routing = RoutingConfig(_num_experts(c), c.num_experts_per_tok, scoring="softmax",
                                norm_topk_prob=bool(c.norm_topk_prob))
        shared = getattr(c, "shared_expert_intermediate_size", 0) if self.shared_expert else 0
        return MoE(mc.hidden_size, c.moe_intermediate_size, routing, act=c.hidden_act,
                   shared_intermediate_size=shared, shared_name="shared_expert", shared_gate=bool(shared))


class Qwen3MoeForCausalLM(Qwen2MoeForCausalLM):
    qkv_bias_always = False
    qk_norm = True
    shared_expert = False
