"""Training memory per GPU: model states under ZeRO stages 0-3 (FSDP = stage 3) and activations.

Bytes per parameter by precision (weights the GEMMs read, gradients, optimizer states for Adam):
- "bf16" (the course's 12 bytes/param): bf16 weights 2 + bf16 gradients 2 + fp32 Adam moments 8, no fp32 master.
- "mixed" (the ZeRO paper's 16 bytes/param): bf16 weights 2 + bf16 gradients 2 + fp32 master, m and v 12.
- "fp32": weights 4 + gradients 4 + moments 8.
- "fp8" (DeepSeek-V3's recipe): fp8 weights 1 for the GEMMs + fp32 gradients 4 + fp32 master 4 + bf16 moments 4;
  activations cached for backward in fp8, counted here as half of the bf16 figure.
ZeRO-1 shards the optimizer states over the data-parallel group, ZeRO-2 also the gradients, ZeRO-3 / FSDP also
the weights (plus one layer gathered at a time).

Activations per layer and token (bf16, no dropout, after Korthikanti et al. 2022 "Reducing Activation
Recomputation in Large Transformer Models", generalized to GQA and gated MLPs): norm inputs 2 x 2h, attention
2 x (h + q + 2 kv + q) (QKV input, Q, K, V, o_proj input), scores 2 x heads x s unless a fused (flash) kernel
recomputes them, MLP 2 x (h + n x i) with n = 4 for gated (gate, up, act, product) and 2 for GELU (fc1, act),
i = the intermediate size, or top_k x the expert size plus shared experts for MoE. Full recomputation keeps
only each layer's input (2h) plus one layer's full set while it is recomputed. The fp32 logits (4 x vocab per
token) are counted separately. Tensor parallelism with sequence parallelism divides activations by the TP degree.
"""
from __future__ import annotations

from dataclasses import dataclass

from frontierlm.plan.model import ModelShape

GB, GiB = 10**9, 2**30
# (weights, gradients, optimizer states incl. any master copy) bytes per parameter
PRECISIONS = {"bf16": (2, 2, 8), "mixed": (2, 2, 12), "fp32": (4, 4, 8), "fp8": (1, 4, 8)}
RECOMPUTE = ("none", "selective", "full")


def precision_bytes(precision: str) -> tuple[int, int, int]:
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    return PRECISIONS[precision]


def zero_stage(stage) -> int:
    if str(stage).lower() == "fsdp":
        return 3
    try:
        s = int(stage)
    except (TypeError, ValueError):
        s = -1
    if s not in (0, 1, 2, 3):
        raise ValueError(f"ZeRO stage must be 0, 1, 2, 3 or fsdp, got {stage!r}")
    return s


@dataclass
class StateBytes:
    weights: float
    gradients: float
    optimizer: float

    @property
    def total(self) -> float:
        return self.weights + self.gradients + self.optimizer


def model_states(params: float, precision: str, stage: int, dp: int) -> StateBytes:
    """Per-GPU bytes of weights, gradients and optimizer states of `params` parameters sharded by ZeRO-`stage`."""
    w, g, o = precision_bytes(precision)
    return StateBytes(params * w / (dp if stage >= 3 else 1), params * g / (dp if stage >= 2 else 1),
                      params * o / (dp if stage >= 1 else 1))


def activation_bytes_per_token_layer(shape: ModelShape, seq_len: int, flash: bool) -> float:
    mc = shape.mc
    h = mc.hidden_size
    if mc.is_mla:
        q, k, v = mc.num_heads * shape.qk_head_dim, mc.num_heads * shape.qk_head_dim, mc.num_heads * shape.v_head_dim
    else:
        q, k, v = mc.num_heads * mc.head_dim, mc.num_kv_heads * mc.head_dim, mc.num_kv_heads * mc.head_dim
    attention = 2 * (h + q + k + v + q) + (0 if flash else 2 * mc.num_heads * seq_len)
    if shape.is_moe:
        inter = shape.experts_per_token * shape.moe_intermediate_size + shape.shared_expert_intermediate
    else:
        inter = shape.intermediate_size
    mlp = 2 * (h + (4 if shape.gated_mlp else 2) * inter)
    return 2 * 2 * h + attention + mlp


def activations(shape: ModelShape, seq_len: int, micro_batch: int = 1, recompute: str = "selective",
                precision: str = "bf16", tp: int = 1) -> dict:
    """Activation bytes one GPU holds for one micro-batch (with 1F1B pipelining the first stage holds as many
    micro-batches as stages, each of its 1/pp share of the layers: the whole model's worth, so pp drops out)."""
    if recompute not in RECOMPUTE:
        raise ValueError(f"recompute must be one of {', '.join(RECOMPUTE)}, got {recompute!r}")
    if seq_len <= 0 or micro_batch <= 0:
        raise ValueError(f"seq_len and micro_batch must be positive, got {seq_len} and {micro_batch}")
    tokens, layers = seq_len * micro_batch, shape.mc.num_layers
    full_layer = activation_bytes_per_token_layer(shape, seq_len, flash=recompute != "none") * tokens
    if recompute == "full":
        layer_total = layers * 2 * shape.mc.hidden_size * tokens + full_layer
    else:
        layer_total = layers * full_layer
    scale = 0.5 if precision == "fp8" else 1.0
    logits = 4 * shape.mc.vocab_size * tokens
    return {"layers": layer_total * scale / tp, "logits": logits / tp, "total": (layer_total * scale + logits) / tp}


def train_report(params: float, num_gpus: int, precision: str = "bf16", stages=(0, 1, 2, 3),
                 shape: ModelShape | None = None, seq_len: int = 4096, micro_batch: int = 1,
                 gpu_memory: int | None = None) -> dict:
    """Per-GPU memory for each ZeRO stage over `num_gpus` data-parallel GPUs; activations need the model shape
    (with `shape=None` only model states are given)."""
    if num_gpus <= 0:
        raise ValueError(f"num_gpus must be positive, got {num_gpus}")
    if params <= 0:
        raise ValueError(f"params must be positive, got {params}")
    w, g, o = precision_bytes(precision)
    out = {"params": params, "num_gpus": num_gpus, "precision": precision,
           "bytes_per_param": {"weights": w, "gradients": g, "optimizer": o, "total": w + g + o},
           "model_states_total_GB": params * (w + g + o) / GB, "seq_len": seq_len, "micro_batch": micro_batch,
           "stages": []}
    acts = None
    if shape is not None:
        acts = {r: activations(shape, seq_len, micro_batch, r, precision) for r in RECOMPUTE}
        out["activations_GB"] = {r: a["total"] / GB for r, a in acts.items()}
    for stage in stages:
        stage = zero_stage(stage)
        st = model_states(params, precision, stage, num_gpus)
        row = {"zero_stage": stage, "weights_GB": st.weights / GB, "gradients_GB": st.gradients / GB,
               "optimizer_GB": st.optimizer / GB, "states_GB": st.total / GB}
        if acts is not None:
            for r in RECOMPUTE:
                row[f"total_GB_recompute_{r}"] = (st.total + acts[r]["total"]) / GB
            if gpu_memory is not None:
                row["fits_with"] = next((r for r in RECOMPUTE if st.total + acts[r]["total"] <= gpu_memory), None)
        out["stages"].append(row)
    return out
