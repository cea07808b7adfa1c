"""DeepSeek-V2 / V3: MLA attention over a latent KV cache, MoE with shared experts after `first_k_dense_replace`
dense layers, and (V3) multi-token-prediction modules.

Routing: V2 scores experts with a softmax (optionally group-limited by each group's best expert); V3 uses
sigmoid scores, a per-expert correction bias that only affects selection, and keeps the `topk_group` groups with
the best sum of their two highest scores.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import safe_open
from torch import nn

from frontierlm.config import ModelConfig
from frontierlm.distributed.layers import VocabParallelEmbedding
from frontierlm.distributed.pipeline import MissingEmbedding, MissingLayer, first_stage_only, stage_layers
from frontierlm.layers.attention import AttentionMetadata
from frontierlm.layers.linear import Linear
from frontierlm.layers.mla import MLAAttention, TorchMLABackend, mla_rotary
from frontierlm.layers.moe import MoE, RoutingConfig
from frontierlm.layers.norm import RMSNorm
from frontierlm.models.decoder import CausalLM, DecoderLayer
from frontierlm.models.llama import dense_mlp


def is_moe_layer(c, layer_idx: int) -> bool:
    return (bool(getattr(c, "n_routed_experts", None)) and layer_idx >= c.first_k_dense_replace
            and layer_idx % (getattr(c, "moe_layer_freq", 1) or 1) == 0)


def deepseek_routing(c, v3: bool) -> RoutingConfig:
    if v3:  # noaux_tc: sigmoid scores, correction bias for selection, groups ranked by their top-2 sum
        return RoutingConfig(c.n_routed_experts, c.num_experts_per_tok, scoring="sigmoid",
                             norm_topk_prob=bool(c.norm_topk_prob), routed_scaling_factor=c.routed_scaling_factor,
                             num_groups=c.n_group, topk_groups=c.topk_group, group_score="top2_sum")
    grouped = getattr(c, "topk_method", "greedy") == "group_limited_greedy"
    # DeepSeek-V2's own code renormalizes when norm_topk_prob is set (transformers ignores the flag; the
    # released V2 / V2-Lite configs have it False, so both agree on real checkpoints).
    return RoutingConfig(c.n_routed_experts, c.num_experts_per_tok, scoring="softmax",
                         norm_topk_prob=bool(getattr(c, "norm_topk_prob", False)) and c.num_experts_per_tok > 1,
                         routed_scaling_factor=c.routed_scaling_factor,
                         num_groups=c.n_group if grouped else None, topk_groups=c.topk_group if grouped else None,
                         group_score="max")


def deepseek_mlp(mc: ModelConfig, layer_idx: int, v3: bool) -> nn.Module:
    c = mc.hf_config
    if not is_moe_layer(c, layer_idx):
        return dense_mlp(mc)
    shared = c.moe_intermediate_size * (getattr(c, "n_shared_experts", 0) or 0)
    return MoE(mc.hidden_size, c.moe_intermediate_size, deepseek_routing(c, v3), act=c.hidden_act,
               shared_intermediate_size=shared, shared_name="shared_experts", correction_bias=v3,
               router_fp32=True)


def _decoder_layer(mc: ModelConfig, layer_idx: int, backend, v3: bool) -> DecoderLayer:
    c = mc.hf_config
    interleave = bool(getattr(c, "rope_interleave", True)) if v3 else True  # V2's rope is always pairwise
    attn = MLAAttention(c, mc.hidden_size, mc.num_heads, backend, rope_interleave=interleave)
    return DecoderLayer(attn, deepseek_mlp(mc, layer_idx, v3), mc.hidden_size, c.rms_norm_eps)


class DeepseekModel(nn.Module):
    def __init__(self, mc: ModelConfig, backend, v3: bool, num_mtp: int = 0):
        super().__init__()
        c = mc.hf_config
        self.num_layers = mc.num_layers
        self.embed_tokens = first_stage_only(lambda: VocabParallelEmbedding(mc.vocab_size, mc.hidden_size)) or \
            MissingEmbedding(mc.hidden_size)
        # MTP modules sit after the decoder layers under the checkpoint's own indices (model.layers.{L + i}).
        # Pipeline parallel: on stage 0 only, beside the embedding and head they share (spec/mtp.py runs there).
        self.layers = stage_layers(mc.num_layers, lambda i: _decoder_layer(mc, i, backend, v3))
        mtp = [first_stage_only(lambda i=i: MTPLayer(mc, mc.num_layers + i, backend, v3)) for i in range(num_mtp)]
        self.layers.extend(MissingLayer() if layer is None else layer for layer in mtp)
        self.norm = RMSNorm(mc.hidden_size, c.rms_norm_eps)
        self.rotary_emb = mla_rotary(c, mc.max_model_len)

    def rope(self, positions: torch.Tensor, attn_meta) -> tuple:
        max_len = attn_meta.max_seq_len if attn_meta is not None else (
            int(positions.max()) + 1 if positions.numel() else 0)
        return self.rotary_emb.expand(self.rotary_emb.cos_sin_for(positions, None, max_len), self.norm.weight.dtype)

    def forward(self, input_ids, positions, attn_meta, plan):
        cos_sin = self.rope(positions, attn_meta)
        x, residual = self.embed_tokens(input_ids), None
        for layer in self.layers[:self.num_layers]:
            x, residual = layer(x, residual, cos_sin, self.rotary_emb, plan)
        x, _ = self.norm(x, residual)
        return x


class SharedHead(nn.Module):
    def __init__(self, mc: ModelConfig):
        super().__init__()
        self.norm = RMSNorm(mc.hidden_size, mc.hf_config.rms_norm_eps)


class MTPLayer(DecoderLayer):
    """DeepSeek-V3 multi-token prediction module k: h' = layer(eh_proj([enorm(embed(t_{i+k})); hnorm(h_i)])),
    logits = head(norm(h')). Shares the embedding and output head with the main model (as in the paper)."""

    def __init__(self, mc: ModelConfig, layer_idx: int, backend, v3: bool):
        c = mc.hf_config
        interleave = bool(getattr(c, "rope_interleave", True))
        super().__init__(MLAAttention(c, mc.hidden_size, mc.num_heads, backend, rope_interleave=interleave),
                         deepseek_mlp(mc, layer_idx, v3), mc.hidden_size, c.rms_norm_eps)
        self.enorm = RMSNorm(mc.hidden_size, c.rms_norm_eps)
        self.hnorm = RMSNorm(mc.hidden_size, c.rms_norm_eps)
        self.eh_proj = Linear(2 * mc.hidden_size, mc.hidden_size)
        self.shared_head = SharedHead(mc)


def _mtp_layers_in_checkpoint(mc: ModelConfig) -> int:
    """How many of the config's `num_nextn_predict_layers` MTP modules the checkpoint actually holds
    (transformers does not save them; DeepSeek's releases do)."""
    wanted = int(getattr(mc.hf_config, "num_nextn_predict_layers", 0) or 0)
    if not wanted:
        return 0
    names: set[str] = set()
    index = Path(mc.model_dir) / "model.safetensors.index.json"
    if index.is_file():
        names = set(json.loads(index.read_text())["weight_map"])
    else:
        for f in mc.weight_files:
            with safe_open(f, framework="pt") as st:
                names.update(st.keys())
    present = 0
    while present < wanted and f"model.layers.{mc.num_layers + present}.eh_proj.weight" in names:
        present += 1
    return present


class DeepseekV2ForCausalLM(CausalLM):
    packed_modules_mapping = {"gate_proj": ("gate_up_proj", 0), "up_proj": ("gate_up_proj", 1)}
    expert_weights_mapping = {"gate_proj": ("w13", 0), "up_proj": ("w13", 1), "down_proj": ("w2", None)}
    v3 = False

    def __init__(self, model_config: ModelConfig, attn_backend=None, num_mtp_layers: int | None = None):
        """num_mtp_layers: MTP modules to build (V3 only; the trainer builds them from scratch); None: as many
        as the checkpoint holds."""
        super().__init__()
        self.config = model_config
        self.attn_backend = attn_backend or TorchMLABackend()
        if num_mtp_layers is None:
            num_mtp_layers = _mtp_layers_in_checkpoint(model_config) if self.v3 else 0
        elif num_mtp_layers < 0 or (num_mtp_layers and not self.v3):
            raise ValueError(f"num_mtp_layers must be >= 0 (and 0 for DeepSeek-V2), got {num_mtp_layers}")
        self.num_mtp_layers = num_mtp_layers
        self.mtp_loss_weight = 0.3  # lambda of mtp_loss (DeepSeek-V3's value early in training)
        self.model = DeepseekModel(model_config, self.attn_backend, self.v3, self.num_mtp_layers)
        self._init_head(model_config)

    def skip_checkpoint_weight(self, name: str) -> bool:
        # MTP modules share the main embedding and head; their checkpoint copies are not loaded.
        for i in range(self.num_mtp_layers):
            prefix = f"model.layers.{self.config.num_layers + i}."
            if name in (prefix + "embed_tokens.weight", prefix + "shared_head.head.weight"):
                return True
        # MTP modules the checkpoint holds beyond the ones we build (none today) are ignored quietly.
        return name.startswith("model.layers.") and int(name.split(".")[2]) >= \
            self.config.num_layers + self.num_mtp_layers

    def kv_cache_modules(self) -> list[nn.Module]:
        return [layer.self_attn for layer in self.model.layers[:self.config.num_layers]
                if not getattr(layer, "is_missing", False)]  # pipeline parallel: this stage's layers

    def allocate_mtp_kv_cache(self, num_blocks: int, block_size: int) -> torch.Tensor:
        """A paged latent cache for the depth-0 MTP module's attention (the proposer's own pool), bound to it.
        Tensor parallel: each TP rank of stage 0 holds one, whole (MLA's latent is not split)."""
        attn = self.model.layers[self.config.num_layers].self_attn
        cache = torch.zeros(attn.kv_cache_shape(num_blocks, block_size), dtype=self.lm_head.weight.dtype,
                            device=self.lm_head.weight.device)
        attn.bind_kv_cache(cache)
        return cache

    def mtp_forward(self, input_ids: torch.Tensor, positions: torch.Tensor, previous_hidden: torch.Tensor,
                    depth: int = 0, return_next_hidden: bool = False, attn_meta: AttentionMetadata | None = None,
                    plan=None):
        """Multi-token prediction: given the hidden state at position i (this model's output, or the previous
        MTP depth's) and the token at i + 1 + depth, returns the MTP module's hidden state; `mtp_logits` turns
        it into logits for token i + 2 + depth. Without attn_meta: contiguous [B, T] sequences, plain causal
        attention, no cache. With attn_meta: flat [num_tokens] rows over the paged cache bound to the module's
        attention (frontierlm/spec/mtp.py keeps one per request). With a plan too: the static-shape decode
        step (a PagedDecodePlan, and attn_meta its DecodeMeta: frontierlm/spec/mtp_fast.py).

        return_next_hidden: return (that hidden state, the module's output before its shared head's norm): the
        second is what depth + 1 takes as previous_hidden (as in vLLM's DeepSeek MTP)."""
        if not 0 <= depth < self.num_mtp_layers:
            raise ValueError(f"MTP depth {depth} not available: the model has {self.num_mtp_layers} MTP modules")
        layer: MTPLayer = self.model.layers[self.config.num_layers + depth]
        embeds = self.model.embed_tokens(input_ids)
        x = layer.eh_proj(torch.cat([layer.enorm(embeds), layer.hnorm(previous_hidden)], dim=-1))
        if plan is None:  # (the cache may start past position 0: the rope table's bound comes from positions)
            cos_sin = self.model.rope(positions, None)
            plan = None if attn_meta is None else self.attn_backend.plan(attn_meta)
        else:  # static shapes: the bound is the DecodeMeta's, no host read of positions
            cos_sin = self.model.rope(positions, attn_meta)
        x, residual = layer(x, None, cos_sin, self.model.rotary_emb, plan)
        x, residual = layer.shared_head.norm(x, residual)
        return (x, residual) if return_next_hidden else x

    def mtp_logits(self, mtp_hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(mtp_hidden)

    def mtp_loss(self, hidden: torch.Tensor, input_ids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor | None:
        """DeepSeek-V3's multi-token-prediction objective on [B, T] training sequences (labels: input_ids shifted
        by one; -100 is ignored). Depth k = 1..D predicts t_{i+k+1} = labels[i + k] from h^{k-1}_i (h^0 = `hidden`,
        the main model's final hidden states) and the embedding of t_{i+k} = input_ids[i + k], for the T - k
        positions whose target is inside the sequence. Returns mtp_loss_weight / D * the sum of the D mean
        cross-entropies, or None without MTP modules."""
        if self.num_mtp_layers == 0:
            return None
        seq_len = input_ids.shape[1]
        if seq_len <= self.num_mtp_layers:
            raise ValueError(f"MTP depth {self.num_mtp_layers} needs sequences longer than {self.num_mtp_layers} "
                             f"tokens, got {seq_len}")
        positions = torch.arange(seq_len, device=input_ids.device).expand_as(input_ids)
        previous, losses = hidden, []
        for k in range(1, self.num_mtp_layers + 1):
            n = seq_len - k
            head_hidden, previous = self.mtp_forward(input_ids[:, k:], positions[:, :n], previous[:, :n], k - 1,
                                                     return_next_hidden=True)
            logits = self.mtp_logits(head_hidden)
            losses.append(F.cross_entropy(logits.flatten(0, 1).float(), labels[:, k:].flatten()))
        return self.mtp_loss_weight / self.num_mtp_layers * torch.stack(losses).sum()

    def checkpoint_extra_tensors(self) -> dict[str, torch.Tensor]:
        """What an export writes beyond the state dict: like DeepSeek's releases, each MTP module gets its own
        copy of the shared embedding and output head (skip_checkpoint_weight skips them when loading)."""
        out = {}
        for i in range(self.num_mtp_layers):
            prefix = f"model.layers.{self.config.num_layers + i}."
            out[prefix + "embed_tokens.weight"] = self.model.embed_tokens.weight
            out[prefix + "shared_head.head.weight"] = self.lm_head.weight
        return out


class DeepseekV3ForCausalLM(DeepseekV2ForCausalLM):
    v3 = True
