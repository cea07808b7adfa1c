"""Models shipped inside the package: the default model FrontierLM serves when none is named, and its draft.

`demo/` is a small DeepSeek-V3-style model (MLA + MoE with a shared expert + one MTP module) and `draft/` a
dense Llama distilled from it with the same tokenizer; both were trained by this project on the `python-docs`
corpus (docs/demo_model.md says how). They are HF-format directories, bfloat16 safetensors.
"""
from __future__ import annotations

from pathlib import Path

ASSETS = Path(__file__).parent
DEMO_MODEL = ASSETS / "demo"
DEMO_DRAFT = ASSETS / "draft"


def default_model() -> str:
    """The packaged demo model's directory (what `frontierlm generate/chat/serve` use without a MODEL)."""
    if not (DEMO_MODEL / "config.json").is_file():
        raise FileNotFoundError(f"the packaged demo model is missing from {DEMO_MODEL}; name a model directory")
    return str(DEMO_MODEL)


def default_draft() -> str:
    if not (DEMO_DRAFT / "config.json").is_file():
        raise FileNotFoundError(f"the packaged draft model is missing from {DEMO_DRAFT}")
    return str(DEMO_DRAFT)
