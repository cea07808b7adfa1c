"""KV cache, FLOPs and serving bounds of one model on one GPU type.

Conventions: GB = 10**9 bytes and GiB = 2**30 (both are printed); a FLOP is a multiply or an add (a matmul of
m x k by k x n costs 2mkn); "128K tokens" is whatever number the caller passes (the seed figures use 128,000).
"""
from __future__ import annotations

from frontierlm.plan.hardware import GPU
from frontierlm.plan.model import DTYPE_BYTES, ModelShape, kv_torch_dtype

GB, GiB = 10**9, 2**30
ENGINE_STEP_TOKENS = 2048  # the engine's default max_num_batched_tokens, for its activation reserve


def _size(n: float) -> dict:
    return {"bytes": int(n), "GB": n / GB, "GiB": n / GiB}


def weight_bytes_per_param(dtype: str) -> float:
    if dtype not in DTYPE_BYTES:
        raise ValueError(f"weight dtype must be one of {', '.join(DTYPE_BYTES)}, got {dtype!r}")
    return DTYPE_BYTES[dtype]


def kv_report(shape: ModelShape, context: int, kv_dtype: str = "bf16", batch: int = 1) -> dict:
    if context <= 0 or batch <= 0:
        raise ValueError(f"context and batch must be positive, got {context} and {batch}")
    mc = shape.mc
    per_token = shape.kv_bytes_per_token(kv_dtype)
    if mc.is_mla:
        formula = f"{mc.num_layers} layers x ({mc.kv_lora_rank} latent + {mc.qk_rope_head_dim} rope) x elem"
    else:
        formula = f"{mc.num_layers} layers x 2 (K,V) x {mc.num_kv_heads} KV heads x {mc.head_dim} dims x elem"
    return {
        "model": shape.name, "attention": shape.attention_kind, "kv_dtype": kv_dtype, "layers": mc.num_layers,
        "heads": mc.num_heads, "kv_heads": mc.num_kv_heads, "head_dim": mc.head_dim,
        "bytes_per_token": per_token, "formula": formula,
        "mha_bytes_per_token": mc.mha_kv_cache_bytes_per_token(kv_torch_dtype(kv_dtype)) if mc.is_mla else
        per_token * mc.num_heads // mc.num_kv_heads,  # every query head with its own K and V
        "context": context, "batch": batch, "kv_at_context": _size(shape.kv_bytes(context, kv_dtype) * batch),
    }


def attention_flops_per_token(shape: ModelShape, context: int) -> float:
    """Scores (q.k) and the weighted sum of values for one query over `context` keys, all layers and heads."""
    mc = shape.mc
    per_key = 2 * mc.num_heads * (shape.qk_head_dim + shape.v_head_dim)
    return sum(per_key * min(context, mc.layer_sliding_window(i) or context) for i in range(mc.num_layers))


def attention_flops_per_sequence(shape: ModelShape, seq_len: int, causal: bool = False) -> float:
    """All s x s scores (the textbook quadratic term); `causal` counts only the lower triangle, as a causal kernel
    does. Sliding-window layers see at most `window` keys per query."""
    mc = shape.mc
    per_key = 2 * mc.num_heads * (shape.qk_head_dim + shape.v_head_dim)
    total = 0
    for i in range(mc.num_layers):
        w = mc.layer_sliding_window(i) or seq_len
        if causal:  # query t sees min(t, w) keys
            w = min(w, seq_len)
            total += per_key * (w * (w + 1) // 2 + (seq_len - w) * w)
        else:
            total += per_key * seq_len * min(seq_len, w)
    return total


def flops_report(shape: ModelShape, seq_len: int, compare_to: int | None = None) -> dict:
    if seq_len <= 0:
        raise ValueError(f"seq_len must be positive, got {seq_len}")
    mm = 2 * shape.matmul_params_per_token()
    out = {
        "model": shape.name, "seq_len": seq_len, "matmul_params_per_token": shape.matmul_params_per_token(),
        "mlp_and_projection_flops_per_token": mm,
        "attention_flops_per_token_at_seq_len": attention_flops_per_token(shape, seq_len),
        "attention_flops_per_sequence": attention_flops_per_sequence(shape, seq_len),
        "attention_flops_per_sequence_causal": attention_flops_per_sequence(shape, seq_len, causal=True),
        "matmul_flops_per_sequence": mm * seq_len,
    }
    out["total_flops_per_sequence_causal"] = out["matmul_flops_per_sequence"] + out["attention_flops_per_sequence_causal"]
    if compare_to:
        ref = attention_flops_per_sequence(shape, compare_to)
        out["compare_to"] = compare_to
        out["attention_ratio"] = out["attention_flops_per_sequence"] / ref
    return out


def serve_report(shape: ModelShape, gpu: GPU, context: int, weight_dtype: str = "bf16", kv_dtype: str = "bf16",
                 memory_utilization: float = 0.9, tp: int = 1, block_size: int = 16) -> dict:
    """Weights, KV capacity and roofline bounds of one model replica over `tp` GPUs (tensor parallel)."""
    if not 0 < memory_utilization <= 1:
        raise ValueError(f"memory utilization must be in (0, 1], got {memory_utilization}")
    if tp <= 0 or context <= 0:
        raise ValueError(f"tp and context must be positive, got {tp} and {context}")
    mc = shape.mc
    wpp = weight_bytes_per_param(weight_dtype)
    weights = shape.num_params() * wpp
    weights_gpu = weights / tp
    # KV heads split across TP ranks (replicated when there are fewer heads than ranks); MLA's latent is not
    # per head, so every rank keeps all of it.
    kv_split = 1 if mc.is_mla else min(tp, mc.num_kv_heads)
    kv_token_gpu = shape.kv_bytes_per_token(kv_dtype) / kv_split
    reserve = ENGINE_STEP_TOKENS * (mc.hidden_size * 64 + mc.vocab_size * 8)  # the engine's activation reserve
    usable = gpu.memory_bytes * memory_utilization - weights_gpu - reserve
    out = {"model": shape.name, "gpu": gpu.name, "tp": tp, "weight_dtype": weight_dtype, "kv_dtype": kv_dtype,
           "params": shape.num_params(), "active_params": shape.num_params(active_only=True),
           "weights": _size(weights), "weights_per_gpu": _size(weights_gpu),
           "weights_by_dtype_GB": {d: shape.num_params() * b / GB for d, b in DTYPE_BYTES.items()},
           "gpu_memory": _size(gpu.memory_bytes), "memory_utilization": memory_utilization,
           "activation_reserve": _size(reserve), "context": context}
    if usable <= 0:
        out.update(fits=False, reason=f"weights ({weights_gpu / GB:.1f} GB per GPU) leave no room for a KV cache "
                   f"in {gpu.memory_bytes * memory_utilization / GB:.1f} GB; raise tp or lower the weight dtype")
        return out
    kv_tokens = int(usable // kv_token_gpu)
    padded = -(-context // block_size) * block_size
    seq_kv = shape.kv_bytes(padded, kv_dtype) / kv_split
    max_seqs = int(usable // seq_kv)
    out.update(fits=max_seqs >= 1, kv_capacity=_size(usable), kv_capacity_tokens=kv_tokens,
               max_concurrent_requests=max_seqs)

    # Decode roofline per GPU: each step reads the weights a batch touches once plus every sequence's KV.
    flops, bw = gpu.flops(weight_dtype), gpu.mem_bw
    mm_flops = 2 * shape.matmul_params_per_token() / tp
    step_flops = mm_flops + attention_flops_per_token(shape, context) / tp
    active_weights = shape.num_params(active_only=True) * wpp / tp
    t1 = max((active_weights + seq_kv) / bw, step_flops / flops)
    out["decode_batch1_tok_s"] = 1 / t1
    # the textbook figure: weights only (short contexts), where B * 2 * active params / F = weight bytes / bw
    out["compute_bound_batch_weights_only"] = (weights_gpu / bw) / (mm_flops / flops)
    denom = step_flops / flops - seq_kv / bw  # per-sequence compute time minus its KV read time
    if denom > 0:
        # MoE: at a large batch every expert is touched, so the whole weight set is read each step
        out["compute_bound_batch"] = (weights_gpu / bw) / denom
    else:
        out["compute_bound_batch"] = None
        out["compute_bound_note"] = "never compute-bound at this context: each sequence's KV read outlasts its math"
    if max_seqs >= 1:
        b = max_seqs
        tb = max((weights_gpu + b * seq_kv) / bw, b * step_flops / flops)
        out["decode_tok_s_at_max_concurrency"] = b / tb
        out["tpot_ms_at_max_concurrency"] = tb * 1e3
    prefill_flops = (2 * shape.matmul_params_per_token() * context +
                     attention_flops_per_sequence(shape, context, causal=True)) / tp
    out["prefill_time_bound_ms"] = max(prefill_flops / flops, weights_gpu / bw) * 1e3
    out["prefill_compute_ms"] = prefill_flops / flops * 1e3
    return out
