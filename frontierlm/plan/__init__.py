"""Capacity planner: KV cache, FLOPs, serving bounds, training memory and a parallelism advisor from an HF config.

    from frontierlm.plan import load_model_shape, get_gpu, kv_report, serve_report
    shape = load_model_shape("llama-2-70b")            # a preset in benchmarks/configs, or a config directory
    kv_report(shape, context=128_000)["kv_at_context"]   # {'bytes': ..., 'GB': 41.9, 'GiB': 39.1}
"""
from frontierlm.plan.hardware import GPU, GPUS, get_gpu
from frontierlm.plan.inference import (attention_flops_per_sequence, attention_flops_per_token, flops_report,
                                       kv_report, serve_report)
from frontierlm.plan.model import ModelShape, load_model_shape, preset_names
from frontierlm.plan.parallel import advise_serving, advise_training
from frontierlm.plan.train import activations, model_states, train_report

__all__ = ["GPU", "GPUS", "ModelShape", "activations", "advise_serving", "advise_training",
           "attention_flops_per_sequence", "attention_flops_per_token", "flops_report", "get_gpu", "kv_report",
           "load_model_shape", "model_states", "preset_names", "serve_report", "train_report"]
