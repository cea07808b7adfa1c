"""Start-up checks of a parallel layout against the model, before any process starts: each error names the
numbers that do not fit."""
from __future__ import annotations


def _experts(c) -> int:
    return getattr(c, "num_experts", None) or getattr(c, "num_local_experts", None) or \
        getattr(c, "n_routed_experts", None) or 0


def check_layout(model_config, tp: int, pp: int, ep: bool) -> None:
    mc, c = model_config, model_config.hf_config
    if mc.num_heads % tp:
        raise ValueError(f"tensor_parallel_size={tp} does not divide the model's {mc.num_heads} attention heads")
    if not mc.is_mla and mc.num_kv_heads % tp and tp % mc.num_kv_heads:
        raise ValueError(f"tensor_parallel_size={tp} and the model's {mc.num_kv_heads} KV heads: one must divide "
                         f"the other (KV heads are split, or replicated when there are fewer than ranks)")
    dense = getattr(c, "intermediate_size", None)
    if dense and dense % tp:
        raise ValueError(f"tensor_parallel_size={tp} does not divide the MLP intermediate size ({dense})")
    experts = _experts(c)
    if experts:
        moe_size = getattr(c, "moe_intermediate_size", None) or dense
        if ep and experts % tp:
            raise ValueError(f"enable_expert_parallel: {tp} ranks do not divide the model's {experts} experts")
        if not ep and moe_size % tp:
            raise ValueError(f"tensor_parallel_size={tp} does not divide the experts' intermediate size "
                             f"({moe_size}); enable_expert_parallel places whole experts instead")
        shared = getattr(c, "shared_expert_intermediate_size", 0) or \
            (getattr(c, "n_shared_experts", 0) or 0) * (moe_size or 0)
        if shared % tp:
            raise ValueError(f"tensor_parallel_size={tp} does not divide the shared experts' intermediate size "
                             f"({shared})")
    elif ep:
        raise ValueError(f"enable_expert_parallel: {mc.architecture} has no experts")
    if mc.num_layers < pp:
        raise ValueError(f"pipeline_parallel_size={pp} is more than the model's {mc.num_layers} layers")
