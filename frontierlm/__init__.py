"""FrontierLM: a compact LLM inference and serving engine.

Public names are imported lazily so that `import frontierlm.engine.kv_cache` (or the CLI's --help) does not
pull in the model stack."""
from importlib import import_module

_EXPORTS = {
    "LLM": "frontierlm.engine.llm",
    "LLMEngine": "frontierlm.engine.llm_engine",
    "EngineConfig": "frontierlm.config",
    "SamplingParams": "frontierlm.sampling_params",
    "StructuredOutputsParams": "frontierlm.sampling_params",
    "GuidedDecodingParams": "frontierlm.sampling_params",
    "BeamSearchParams": "frontierlm.sampling_params",
    "RequestOutputKind": "frontierlm.sampling_params",
    "LogitsProcessor": "frontierlm.layers.logits_processor",
    "BatchUpdate": "frontierlm.layers.logits_processor",
    "AdapterLogitsProcessor": "frontierlm.layers.logits_processor",
    "RequestOutput": "frontierlm.outputs",
    "CompletionOutput": "frontierlm.outputs",
    "Logprob": "frontierlm.outputs",
}
__all__ = list(_EXPORTS)
__version__ = "0.1.0"


def __getattr__(name):
    if name in _EXPORTS:
        return getattr(import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'frontierlm' has no attribute {name!r}")
