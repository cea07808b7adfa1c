"""What the engine asks of frontierlm/quant before it loads a model: the quantization and KV-cache dtype recorded
on the ModelConfig (the loader and the KV-cache allocation read them there), and a line for the start-up report."""
from __future__ import annotations

import os

from frontierlm.quant.config import resolve
from frontierlm.quant.kv_cache import kv_cache_torch_dtype


def configure_model(model_config, engine_config) -> str:
    model_config.quantization = engine_config.quantization
    model_config.kv_cache_dtype = kv_cache_torch_dtype(engine_config.kv_cache_dtype)
    quant = resolve(model_config.hf_config, engine_config.quantization)  # refuses unsupported schemes now
    if model_config.kv_cache_dtype is not None and \
            os.environ.get("FRONTIERLM_ATTENTION_BACKEND", "").strip().lower() == "triton":
        raise ValueError(f"kv_cache_dtype={engine_config.kv_cache_dtype!r}: the Triton attention backend has no "
                         "FP8 KV cache yet; unset FRONTIERLM_ATTENTION_BACKEND (or set 'torch')")
    report = ""
    if quant is not None:
        report += f" | weights: {quant.describe()}"
        if any(s.kind == "float" for _, s in quant.groups) and engine_config.device.startswith("cpu"):
            report += " (FP8 runs weight-only on CPU)"
    if model_config.kv_cache_dtype is not None:
        report += f" | KV cache {engine_config.kv_cache_dtype} (per-tensor scales)"
    return report
