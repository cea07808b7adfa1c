"""Mixtral: Llama/Mistral attention (GQA, optional sliding window) with a sparse MoE feed-forward in every
layer: softmax router, top-k experts, weights renormalized over the chosen k."""
from __future__ import annotations

from torch import nn

from frontierlm.config import ModelConfig
from frontierlm.layers.moe import MoE, RoutingConfig
from frontierlm.models.llama import LlamaForCausalLM


class MixtralForCausalLM(LlamaForCausalLM):
    packed_modules_mapping = {"q_proj": ("qkv_proj", "q"), "k_proj": ("qkv_proj", "k"), "v_proj": ("qkv_proj", "v")}
    expert_weights_mapping = {"w1": ("w13", 0), "w3": ("w13", 1), "w2": ("w2", None)}
    checkpoint_renames = {"block_sparse_moe": "mlp"}

    def make_mlp(self, mc: ModelConfig, layer_idx: int) -> nn.Module:
        c = mc.hf_config
        routing = RoutingConfig(c.num_local_experts, c.num_experts_per_tok, scoring="softmax", norm_topk_prob=True)
        return MoE(mc.hidden_size, c.intermediate_size, routing, act=c.hidden_act)
