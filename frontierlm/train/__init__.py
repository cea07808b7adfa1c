"""Training for the engine's own model classes: corpus and tokenizer, pretraining, distillation, HF export.

The trainer builds the same `frontierlm.models` classes the engine serves (attn_meta=None gives plain causal
attention), so a trained directory loads in `frontierlm.LLM` and in transformers without conversion.
"""
