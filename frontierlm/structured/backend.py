"""Compile StructuredOutputsParams with xgrammar (LRU-cached per (kind, text)) and hand out per-sequence matchers.

A matcher fills one row of the step's token bitmask before sampling and accepts each sampled token after it; the
grammar's own stop tokens (EOS) are allowed only where the grammar may end. This is the first slice of the
grammar issue: compile happens on the caller's thread (the engine's), not yet off it.
"""
from __future__ import annotations

import json
import threading
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor

import torch

from frontierlm.sampling_params import StructuredOutputsParams
from frontierlm.structured.grammars_lib import compiler_message, resolve_grammar


class GrammarBackend:
    def __init__(self, tokenizer, vocab_size: int, stop_token_ids: list[int], cache_size: int = 128):
        import xgrammar as xgr

        self._xgr = xgr
        info = xgr.TokenizerInfo.from_huggingface(tokenizer, vocab_size=vocab_size, stop_token_ids=stop_token_ids)
        self.compiler = xgr.GrammarCompiler(info, max_threads=2, cache_enabled=False)
        self.vocab_size = vocab_size
        self.cache: OrderedDict[tuple, object] = OrderedDict()
        self.cache_size = cache_size
        self.cache_hits = 0
        self._lock = threading.Lock()
        # one worker: a slow compile delays other compiles, never the engine's steps
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="grammar-compile")

    @staticmethod
    def key(params: StructuredOutputsParams) -> tuple:
        if params.json is not None:
            text = params.json if isinstance(params.json, str) else json.dumps(params.json, sort_keys=True)
            return ("json", text)
        if params.grammar is not None:
            return ("grammar", params.grammar)
        if params.regex is not None:
            return ("regex", params.regex)
        if params.choice is not None:
            return ("choice", tuple(params.choice))
        return ("json_object", "")

    def compile_async(self, params: StructuredOutputsParams) -> Future:
        """Check the constraint's syntax now (a ValueError for the caller), compile it on the worker thread."""
        kind, text = self.key(params)
        with self._lock:
            cached = (kind, text) in self.cache
        if cached:
            done: Future = Future()
            done.set_result(self.compile(params))
            return done
        if kind == "grammar":
            text = self._resolve(text)
        try:
            if kind == "json":
                self._xgr.Grammar.from_json_schema(text)
            elif kind == "grammar":
                self._xgr.Grammar.from_ebnf(text)
            elif kind == "regex":
                self._xgr.Grammar.from_regex(text)
        except Exception as e:  # xgrammar's parse errors are RuntimeErrors with line and column
            raise ValueError(f"structured_outputs.{kind}: could not compile: {compiler_message(e)}") from None
        return self._executor.submit(self.compile, params)

    @staticmethod
    def _resolve(text: str) -> str:
        try:
            return resolve_grammar(text)
        except ValueError as e:
            raise ValueError(f"structured_outputs.grammar: {e}") from None

    def compile(self, params: StructuredOutputsParams):
        key = self.key(params)
        with self._lock:
            if key in self.cache:
                self.cache.move_to_end(key)
                self.cache_hits += 1
                return self.cache[key]
        kind, text = key
        if kind == "grammar":
            text = self._resolve(text)
        try:
            if kind == "json":
                compiled = self.compiler.compile_json_schema(text, any_whitespace=False)
            elif kind == "grammar":
                compiled = self.compiler.compile_grammar(text)
            elif kind == "regex":
                compiled = self.compiler.compile_regex(text)
            elif kind == "choice":
                alternatives = " | ".join(json.dumps(c) for c in text)  # GBNF string literals use JSON escapes
                compiled = self.compiler.compile_grammar(f"root ::= {alternatives}")
            else:
                compiled = self.compiler.compile_builtin_json_grammar()
        except Exception as e:  # xgrammar raises RuntimeError / ValueError subclasses; quote its message
            raise ValueError(f"structured_outputs.{kind}: could not compile: {compiler_message(e)}") from None
        with self._lock:
            self.cache[key] = compiled
            if len(self.cache) > self.cache_size:
                self.cache.popitem(last=False)
        return compiled

    def matcher(self, compiled):
        return self._xgr.GrammarMatcher(compiled)



def fill_grammar_bitmask(matchers: list, vocab_size: int) -> torch.Tensor | None:
    """[rows, ceil(vocab/32)] bitmask of the tokens each row's grammar allows next (None when no row has one).
    Host work only, so the model runner runs it on a thread while the forward pass computes the logits."""
    import xgrammar as xgr

    if all(m is None for m in matchers):
        return None
    bitmask = xgr.allocate_token_bitmask(len(matchers), vocab_size)
    for i, m in enumerate(matchers):
        if m is not None:
            m.fill_next_token_bitmask(bitmask, i)
    return bitmask


def apply_grammar_bitmask(logits: torch.Tensor, bitmask: torch.Tensor, matchers: list) -> None:
    """Mask, in place, every token a row's grammar does not allow next (rows whose matcher is None untouched).
    Applied before the sampler: masked logits are -inf, so bias and penalties cannot revive them, which makes
    this equivalent to DESIGN.md's slot right after logit bias and bans."""
    import xgrammar as xgr

    rows = [i for i, m in enumerate(matchers) if m is not None]
    xgr.apply_token_bitmask_inplace(logits, bitmask.to(logits.device, non_blocking=True), indices=rows)
