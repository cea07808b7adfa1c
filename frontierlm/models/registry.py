"""Architecture name (config.json "architectures") -> model class. Imports are lazy so that reading a
config does not import every model."""
from __future__ import annotations

import importlib

_MODELS = {
    "LlamaForCausalLM": ("frontierlm.models.llama", "LlamaForCausalLM"),
    "MistralForCausalLM": ("frontierlm.models.llama", "MistralForCausalLM"),
    "Qwen2ForCausalLM": ("frontierlm.models.llama", "Qwen2ForCausalLM"),
    "Qwen3ForCausalLM": ("frontierlm.models.llama", "Qwen3ForCausalLM"),
    "MixtralForCausalLM": ("frontierlm.models.mixtral", "MixtralForCausalLM"),
    "Qwen2MoeForCausalLM": ("frontierlm.models.qwen_moe", "Qwen2MoeForCausalLM"),
    "Qwen3MoeForCausalLM": ("frontierlm.models.qwen_moe", "Qwen3MoeForCausalLM"),
    "DeepseekV2ForCausalLM": ("frontierlm.models.deepseek", "DeepseekV2ForCausalLM"),
    "DeepseekV3ForCausalLM": ("frontierlm.models.deepseek", "DeepseekV3ForCausalLM"),
}


def supported_architectures() -> list[str]:
    return sorted(_MODELS)


def get_model_class(arch: str):
    if arch not in _MODELS:
        raise ValueError(f"unsupported architecture {arch!r}; supported architectures: "
                         f"{', '.join(supported_architectures())}")
    module, name = _MODELS[arch]
    return getattr(importlib.import_module(module), name)
