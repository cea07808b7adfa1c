"""Pieces every decoder-only architecture shares: the pre-norm residual block, and the causal-LM shell
(embedding -> layers -> norm -> LM head) with KV-cache binding and expert-load counters."""
from __future__ import annotations

import torch
from torch import nn

from frontierlm.config import ModelConfig
from frontierlm.distributed.layers import ParallelLMHead
from frontierlm.distributed.pipeline import first_stage_only
from frontierlm.layers.attention import AttentionMetadata
from frontierlm.layers.norm import RMSNorm


class DecoderLayer(nn.Module):
    """x -> x + attn(norm(x)) -> x + mlp(norm(x)), with the residual adds fused into the norms."""

    def __init__(self, self_attn: nn.Module, mlp: nn.Module, hidden_size: int, eps: float):
        super().__init__()
        self.self_attn = self_attn
        self.mlp = mlp
        self.input_layernorm = RMSNorm(hidden_size, eps)
        self.post_attention_layernorm = RMSNorm(hidden_size, eps)

    def forward(self, x, residual, cos_sin, rotary, plan):
        if residual is None:
            residual, x = x, self.input_layernorm(x)
        else:
            x, residual = self.input_layernorm(x, residual)
        x = self.self_attn(x, cos_sin, rotary, plan)
        x, residual = self.post_attention_layernorm(x, residual)
        real_rows = getattr(plan, "real_rows", None)  # padded decode step: MoE counts only real tokens
        if real_rows is not None and getattr(self.mlp, "counts_rows", False):
            return self.mlp(x, real_rows), residual
        return self.mlp(x), residual


class CausalLM(nn.Module):
    """Shell shared by the architectures: subclasses build `self.model` (with .layers, each holding
    .self_attn with an `attn` or an MLA cache) and set `self.attn_backend`."""

    packed_modules_mapping: dict = {}
    expert_weights_mapping: dict = {}  # per-expert checkpoint name -> (fused parameter, shard); see loader.py
    checkpoint_renames: dict = {}      # checkpoint module name -> ours (e.g. Mixtral's block_sparse_moe -> mlp)

    def _init_head(self, mc: ModelConfig) -> None:
        # vocab-parallel, on pipeline stage 0 beside the embedding (None on later stages)
        self.lm_head = first_stage_only(lambda: ParallelLMHead(mc.vocab_size, mc.hidden_size))
        if mc.tie_word_embeddings and self.lm_head is not None:
            self.lm_head.weight = self.model.embed_tokens.weight

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor,
                attn_meta: AttentionMetadata | None = None) -> torch.Tensor:
        """input_ids/positions [num_tokens] (or [batch, seq] when attn_meta is None) -> hidden states."""
        if attn_meta is not None and input_ids.dim() != 1:
            raise ValueError(f"with attn_meta, input_ids must be flat [num_tokens], got {tuple(input_ids.shape)}")
        plan = None if attn_meta is None else self.attn_backend.plan(attn_meta)
        return self.model(input_ids, positions, attn_meta, plan)

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden_states)

    # ---- KV cache: each attention module says what it stores per token ------------------------------
    def kv_cache_modules(self) -> list[nn.Module]:
        """The modules that own a KV cache, one per layer (dense Attention or MLAAttention)."""
        return [getattr(layer.self_attn, "attn", layer.self_attn) for layer in self.model.layers
                if not getattr(layer, "is_missing", False)]  # pipeline parallel: this stage's layers

    def kv_cache_shapes(self, num_blocks: int, block_size: int) -> list[tuple[int, ...]]:
        return [m.kv_cache_shape(num_blocks, block_size) for m in self.kv_cache_modules()]

    def bind_kv_cache(self, kv_caches: list[torch.Tensor]) -> None:
        modules = self.kv_cache_modules()
        if len(kv_caches) != len(modules):
            raise ValueError(f"got {len(kv_caches)} KV cache tensors for {len(modules)} layers")
        for m, cache in zip(modules, kv_caches):
            m.bind_kv_cache(cache)

    # ---- MoE expert-load statistics -----------------------------------------------------------------
    def _moe_layers(self) -> list[tuple[int, nn.Module]]:
        """(the model's own layer number, counting module) of each MoE layer of the main stack. DeepSeek-V3's
        MTP modules sit after it in `model.layers` and are left out: they are not layers of the model's
        forward pass, and their routers never see the tokens the main layers count."""
        layers = self.model.layers[:getattr(self.model, "num_layers", len(self.model.layers))]
        return [(i, m) for i, layer in enumerate(layers) for m in layer.modules() if hasattr(m, "expert_counts")]

    def expert_load(self) -> list[list[int]]:
        """Tokens routed to each expert, per MoE layer of the main stack, since the last reset (one host copy)."""
        counts = [m.expert_counts for _, m in self._moe_layers()]
        return [c.tolist() for c in torch.stack(counts).cpu()] if counts else []

    def expert_layers(self) -> list[int]:
        """The layer number (the checkpoint's `model.layers.{i}`) of each row of expert_load()."""
        return [i for i, _ in self._moe_layers()]

    def reset_expert_load(self) -> None:
        for m in self.modules():
            if hasattr(m, "expert_counts"):
                m.expert_counts.zero_()
