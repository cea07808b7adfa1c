"""llguidance (llama.cpp's optional backend, also vLLM's): the backend for what xgrammar cannot enforce, such as
allOf, keyword combinations on one string, multipleOf on numbers, unanchored patterns and GBNF token matches.
GuidanceMatcher wraps its LLMatcher in the interface the engine drives for xgrammar's matcher."""
from __future__ import annotations

import json

NAME = "guidance"
# generation writes JSON the way the xgrammar backend does: ", " and ": ", no other whitespace
GENERATE_JSON = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
CHECK_JSON = {"whitespace_flexible": True}


def grammar_text(kind: str, payload, json_options: dict) -> str:
    """llguidance's grammar for a constraint (payload: schema JSON text, Lark text, regex, or the choices)."""
    from llguidance import LLMatcher

    if kind in ("json", "json_object"):
        return LLMatcher.grammar_from_json_schema(payload, overrides=json_options)
    if kind == "grammar":
        return LLMatcher.grammar_from_lark(payload)
    if kind == "regex":
        return LLMatcher.grammar_from_regex(payload)
    return LLMatcher.grammar_from_lark("start: " + " | ".join(json.dumps(c, ensure_ascii=False) for c in payload))


def _validate(grammar: str, tokenizer=None) -> None:
    from llguidance import LLMatcher

    is_error, messages = LLMatcher.validate_grammar_with_warnings(grammar, tokenizer)
    if is_error:
        raise ValueError(f"could not compile: {messages[0].strip()}")


def check_syntax(kind: str, payload) -> None:
    _validate(grammar_text(kind, payload, GENERATE_JSON))


def _new_matcher(tokenizer, grammar: str):
    from llguidance import LLMatcher

    m = LLMatcher(tokenizer, grammar, log_level=0)
    if m.is_error():
        raise ValueError(f"could not compile: {m.get_error()}")
    return m


class GuidanceMatcher:
    """One sequence's state. llguidance's matcher enters a permanent error state on a refused token, so a token
    is validated before it is consumed; `accept_token` then answers False like xgrammar's and changes nothing."""

    def __init__(self, matcher, stop_token_ids):
        self._m = matcher
        self._stop = set(stop_token_ids)
        self._terminated = False

    def accept_token(self, token: int) -> bool:
        if self._terminated:
            return False
        if token in self._stop:  # validate_tokens() answers 0 for a stop token even where the grammar may end
            if not self._m.is_accepting():
                return False
        elif self._m.validate_tokens([token]) != 1:
            return False
        self._m.consume_token(token)
        self._terminated = token in self._stop
        return True

    def fill_next_token_bitmask(self, bitmask, index: int) -> None:
        row = bitmask[index]
        self._m.unsafe_compute_mask_ptr(row.data_ptr(), row.numel() * row.element_size())

    def is_terminated(self) -> bool:
        return self._terminated

    def is_completed(self) -> bool:
        return self._m.is_accepting()

    def rollback(self, num_tokens: int) -> None:
        if num_tokens:
            self._m.rollback(num_tokens)
            self._terminated = False

    def find_jump_forward_string(self) -> str:
        if self._terminated:
            return ""
        return self._m.compute_ff_bytes().decode("utf-8", errors="ignore")


class GuidanceBackend:
    name = NAME

    def __init__(self, tokenizer, vocab_size: int, stop_token_ids: list[int]):
        from llguidance.hf import from_tokenizer

        self.hf_tokenizer = tokenizer
        self.tokenizer = from_tokenizer(tokenizer, n_vocab=vocab_size, eos_token=list(stop_token_ids))
        self.stop_token_ids = list(stop_token_ids)
        self.vocab_size = vocab_size

    check_syntax = staticmethod(check_syntax)

    def token_id(self, text: str) -> int:
        """`<think>` in GBNF: the one token whose text this is (llama.cpp's rule)."""
        ids = self.hf_tokenizer.encode(text, add_special_tokens=False)
        if len(ids) != 1:
            raise ValueError(f"token {text} is not a single token of this tokenizer ({len(ids)} tokens)")
        return ids[0]

    def compile(self, kind: str, payload):
        """A fresh matcher built on the worker thread (building it is llguidance's compile); every request gets a
        deep copy, which is cheap."""
        grammar = grammar_text(kind, payload, GENERATE_JSON)
        _validate(grammar, self.tokenizer)
        return _new_matcher(self.tokenizer, grammar)

    def matcher(self, compiled) -> GuidanceMatcher:
        return GuidanceMatcher(compiled.deep_copy(), self.stop_token_ids)


class _ByteTokenizer:
    """One token per byte (plus EOS): lets `frontierlm grammar check` feed llguidance a text byte by byte."""
    eos_token_id = 256
    bos_token_id = None
    tokens = [bytes([i]) for i in range(256)] + [b"<eos>"]
    special_token_ids = [256]

    def __call__(self, data: bytes) -> list[int]:
        return list(data)


def checker(kind: str, payload):
    import llguidance

    tokenizer = llguidance.LLTokenizer(llguidance.TokenizerWrapper(_ByteTokenizer()))
    grammar = grammar_text(kind, payload, CHECK_JSON)
    try:
        _validate(grammar, tokenizer)
    except ValueError as e:
        raise ValueError(str(e).replace("could not compile", "does not compile")) from None

    template = _new_matcher(tokenizer, grammar)

    def check(text: str) -> tuple[bool, int | None]:
        m = GuidanceMatcher(template.deep_copy(), [256])
        for i, ch in enumerate(text):
            if not all(m.accept_token(b) for b in ch.encode()):
                return False, i
        return (True, None) if m.is_completed() else (False, len(text))

    return check
