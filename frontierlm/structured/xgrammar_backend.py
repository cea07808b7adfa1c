"""xgrammar: the default structured-output backend. Its GrammarMatcher already has the interface the engine
drives (fill_next_token_bitmask, accept_token, rollback, is_terminated, find_jump_forward_string)."""
from __future__ import annotations

import json

from frontierlm.structured.grammars_lib import compiler_message

NAME = "xgrammar"


def choice_ebnf(choices: list[str]) -> str:
    return "root ::= " + " | ".join(json.dumps(c, ensure_ascii=False) if c else '""' for c in choices)


def check_syntax(kind: str, payload) -> None:
    """Parse without a tokenizer (fast): a ValueError quoting xgrammar when the constraint does not parse."""
    import xgrammar as xgr

    try:
        if kind in ("json", "json_object"):
            xgr.Grammar.from_json_schema(payload, strict_mode=False)
        elif kind == "grammar":
            xgr.Grammar.from_ebnf(payload)
        elif kind == "regex":
            xgr.Grammar.from_regex(payload)
        elif kind == "structural_tag":
            xgr.Grammar.from_structural_tag(payload)
        elif kind == "choice":
            xgr.Grammar.from_ebnf(choice_ebnf(payload))
    except Exception as e:  # xgrammar raises RuntimeError / ValueError subclasses with line and column
        raise ValueError(f"could not compile: {compiler_message(e)}") from None


class XGrammarBackend:
    name = NAME

    def __init__(self, tokenizer, vocab_size: int, stop_token_ids: list[int]):
        import xgrammar as xgr

        self._xgr = xgr
        info = xgr.TokenizerInfo.from_huggingface(tokenizer, vocab_size=vocab_size, stop_token_ids=stop_token_ids)
        # xgrammar matches special tokens (<unk>, <s>, <pad>) by their text, so "<" [a-z]+ ">" could emit <s>,
        # which detokenizes to nothing: blank them (an empty token is never allowed), keep the stop tokens
        special = set(getattr(tokenizer, "all_special_ids", [])) - set(stop_token_ids)
        if special:
            vocab = [""] * vocab_size
            for token, idx in tokenizer.get_vocab().items():
                if idx < vocab_size and idx not in special:
                    vocab[idx] = token
            info = xgr.TokenizerInfo.from_vocab_and_metadata(vocab, info.dump_metadata())
        self.compiler = xgr.GrammarCompiler(info, max_threads=2, cache_enabled=False)

    check_syntax = staticmethod(check_syntax)

    def compile(self, kind: str, payload):
        try:
            if kind in ("json", "json_object"):
                # strict_mode=False: additionalProperties and items default to allowed, as JSON Schema says
                return self.compiler.compile_json_schema(payload, any_whitespace=False, strict_mode=False)
            if kind == "grammar":
                return self.compiler.compile_grammar(payload)
            if kind == "regex":
                return self.compiler.compile_regex(payload)
            if kind == "structural_tag":
                return self.compiler.compile_structural_tag(payload)
            return self.compiler.compile_grammar(choice_ebnf(payload))
        except Exception as e:
            raise ValueError(f"could not compile: {compiler_message(e)}") from None

    def matcher(self, compiled):
        return self._xgr.GrammarMatcher(compiled)


def checker(kind: str, payload):
    """A matcher over an empty vocabulary for `frontierlm grammar check`: texts go in character by character."""
    import xgrammar as xgr

    compiler = xgr.GrammarCompiler(xgr.TokenizerInfo([]), cache_enabled=False)
    try:
        if kind in ("json", "json_object"):
            compiled = compiler.compile_json_schema(payload, any_whitespace=True, strict_mode=False)
        elif kind == "regex":
            compiled = compiler.compile_regex(payload)
        elif kind == "structural_tag":
            compiled = compiler.compile_structural_tag(payload)
        else:
            compiled = compiler.compile_grammar(payload if kind == "grammar" else choice_ebnf(payload))
    except Exception as e:
        raise ValueError(f"does not compile: {compiler_message(e)}") from None

    def check(text: str) -> tuple[bool, int | None]:
        matcher = xgr.GrammarMatcher(compiled, terminate_without_stop_token=True)
        for i, ch in enumerate(text):
            if not matcher.accept_string(ch):
                return False, i
        return (True, None) if matcher.is_completed() else (False, len(text))

    return check
