"""Tokenizer loading from a local HF-format directory (never from a hub)."""
from __future__ import annotations

from pathlib import Path

from frontierlm.logger import init_logger

logger = init_logger(__name__)

TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json")


def load_tokenizer(path: str):
    """The directory's tokenizer (a transformers fast tokenizer with its chat template), or None when the
    directory holds none: then prompts must be token ids."""
    directory = Path(path)
    if not any((directory / f).exists() for f in TOKENIZER_FILES):
        logger.warning("no tokenizer in %s (looked for %s): only token-id prompts will work",
                       path, ", ".join(TOKENIZER_FILES))
        return None
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(directory), local_files_only=True)
    except Exception as e:  # transformers raises many types; name the directory and the cause
        raise ValueError(f"could not load the tokenizer in {path}: {e}") from e
