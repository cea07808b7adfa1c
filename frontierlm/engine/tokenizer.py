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


def encode(tokenizer, text: str, add_special_tokens: bool = True, split_special_tokens: bool = False) -> list[int]:
    """Token ids of `text`. For fast tokenizers this calls the Rust tokenizer's encode_batch, which releases the
    GIL while it works (its single-text encode does not), so a long prompt tokenized on a worker thread does
    not stall the server's event loop. `split_special_tokens=True` tokenizes text that spells a special token
    (`<|end|>`) as plain text instead of as the control token."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return tokenizer.encode(text, add_special_tokens=add_special_tokens,
                                split_special_tokens=split_special_tokens)
    backend.encode_special_tokens = split_special_tokens  # per-tokenizer state: callers own their tokenizer
    try:
        return backend.encode_batch([text], add_special_tokens=add_special_tokens)[0].ids
    finally:
        backend.encode_special_tokens = False


def bad_words_token_ids(tokenizer, words) -> list[list[int]]:
    """The token sequences that `bad_words` forbid: each word as given and with one leading space (vLLM's
    rule, since a word mid-sentence usually tokenizes with its space)."""
    out: list[list[int]] = []
    for word in words:
        for text in (word, " " + word.lstrip()):
            ids = encode(tokenizer, text, add_special_tokens=False)
            if ids and ids not in out:
                out.append(ids)
    return out


def special_token_texts(tokenizer) -> list[str]:
    """The strings that encode() reads as special (control) tokens, longest first."""
    texts = set(getattr(tokenizer, "all_special_tokens", ()) or ())
    for tok in (getattr(tokenizer, "added_tokens_decoder", None) or {}).values():
        if getattr(tok, "special", False):
            texts.add(str(tok))
    return sorted((t for t in texts if t), key=len, reverse=True)


# Normalizers and pre-tokenizers that never drop or merge characters (so every character of the text lands in
# some token). Others (BERT's Whitespace, StripAccents, NFC composition, regex Replace) can shrink the text.
_SAFE_PRETOKENIZERS = {"ByteLevel", "Metaspace", "Digits", "Punctuation", "UnicodeScripts", "Split"}


def max_chars_per_token(tokenizer) -> int | None:
    """An upper bound on the characters one token covers, or None when the tokenizer gives no such guarantee.

    With it, a text of C characters needs at least C / bound tokens, so an over-long prompt can be refused
    without tokenizing it. The bound is only given for BPE tokenizers whose pipeline keeps every character:
    no normalizer (or only Prepend / a plain Replace that does not shorten), pre-tokenizers that split without
    removing, and unknown characters that cannot fuse into one token."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return None
    import json

    spec = json.loads(backend.to_str())
    model = spec.get("model") or {}
    if model.get("type") != "BPE" or (model.get("fuse_unk") and not model.get("byte_fallback")):
        return None

    def parts(node):
        if node is None:
            return []
        if node.get("type") == "Sequence":
            key = "normalizers" if "normalizers" in node else "pretokenizers"
            return [p for child in node.get(key, []) for p in parts(child)]
        return [node]

    for norm in parts(spec.get("normalizer")):
        pattern = (norm.get("pattern") or {}).get("String")
        if norm["type"] == "Prepend" or (norm["type"] == "Replace" and pattern is not None
                                          and len(norm.get("content", "")) >= len(pattern)):
            continue
        return None
    for pre in parts(spec.get("pre_tokenizer")):
        if pre["type"] not in _SAFE_PRETOKENIZERS or (pre["type"] == "Split" and pre.get("behavior") == "Removed"):
            return None
    longest = max((len(t) for t in backend.get_vocab(with_added_tokens=True)), default=1)
    return max(longest, 1)
