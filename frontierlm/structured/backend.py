"""Structured outputs: normalise the request's constraint, pick the backend that enforces it, compile it once
per constraint (LRU-cached, on a worker thread) and hand out per-sequence matchers.

Backends (`structured_outputs_backend`, vLLM's names): "xgrammar", "guidance" (llguidance), or "auto", which
keeps xgrammar wherever it enforces the whole constraint and moves the request to guidance otherwise (JSON
schemas with keywords xgrammar drops, GBNF with token matches, regexes xgrammar does not parse). Both hand out
matchers with the interface the engine drives: `fill_next_token_bitmask(bitmask, row)` before sampling,
`accept_token(id)` after it, `rollback(n)`, `is_terminated()` (the grammar ended and its stop token was taken)
and `find_jump_forward_string()` (text the grammar forces next). The grammar's stop tokens (EOS) are allowed only
where the grammar may end.
"""
from __future__ import annotations

import json
import threading
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import torch

from frontierlm.logger import init_logger
from frontierlm.sampling_params import StructuredOutputsParams
from frontierlm.structured import guidance_backend, xgrammar_backend
from frontierlm.structured.gbnf import parse_gbnf, to_lark, to_xgrammar
from frontierlm.structured.grammars_lib import resolve_grammar
from frontierlm.structured.schema import canonical_key, normalize_schema

logger = init_logger(__name__)

BACKENDS = ("auto", "xgrammar", "guidance")
JSON_OBJECT_SCHEMA = '{"type": "object"}'  # OpenAI's json_object promises an object, not any JSON value


@dataclass
class Plan:
    """What to compile: the constraint kind, the backend chosen, and the text or list that backend takes."""
    kind: str
    backend: str
    payload: object
    reason: str | None = None  # why auto chose guidance
    cache_text: str | None = None  # JSON schemas: equal for schemas that differ only in keyword order

    @property
    def key(self) -> tuple:
        text = self.cache_text or (
            self.payload if isinstance(self.payload, str) else json.dumps(self.payload, ensure_ascii=False))
        return (self.backend, self.kind, text)


def _schema_payload(schema) -> tuple[dict | bool, list[str]]:
    if isinstance(schema, str):
        schema = json.loads(schema)
    norm = normalize_schema(schema)
    return norm.schema, norm.guidance_reasons


def plan_constraint(params: StructuredOutputsParams, mode: str = "auto", token_id_of=None) -> Plan:
    """Normalise and route one constraint; a ValueError (prefixed with the field) when it cannot be enforced."""
    if mode not in BACKENDS:
        raise ValueError(f"structured_outputs_backend must be one of {', '.join(BACKENDS)}, got {mode!r}")
    kind = next(k for k in StructuredOutputsParams._KINDS if getattr(params, k) not in (None, False))
    try:
        if kind == "json":
            schema, reasons = _schema_payload(params.json)
            backend = "guidance" if (mode == "guidance" or (mode == "auto" and reasons)) else "xgrammar"
            if mode == "xgrammar" and reasons:
                raise ValueError(f"the xgrammar backend does not enforce {reasons[0]}; use "
                                 "structured_outputs_backend='auto' or 'guidance'")
            payload = json.dumps(schema, ensure_ascii=False)
            return Plan(kind, backend, payload, reasons[0] if backend == "guidance" and reasons else None,
                        canonical_key(schema))
        if kind == "json_object":
            return Plan(kind, "guidance" if mode == "guidance" else "xgrammar", JSON_OBJECT_SCHEMA)
        if kind == "grammar":
            grammar = parse_gbnf(resolve_grammar(params.grammar))
            tokens = grammar.uses_tokens
            if mode == "xgrammar" and tokens:
                raise ValueError("token matches (<[id]>, <token>) are not supported by the xgrammar backend; use "
                                 "structured_outputs_backend='auto' or 'guidance'")
            if mode == "guidance" or tokens:
                return Plan(kind, "guidance", to_lark(grammar, token_id_of), "token matches" if tokens else None)
            return Plan(kind, "xgrammar", to_xgrammar(grammar))
        if kind == "structural_tag":  # xgrammar's own format: only xgrammar reads it
            xgrammar_backend.check_syntax(kind, params.structural_tag)
            return Plan(kind, "xgrammar", params.structural_tag)
        if kind == "regex":
            if mode == "auto":
                try:
                    xgrammar_backend.check_syntax("regex", params.regex)
                except ValueError:
                    guidance_backend.check_syntax("regex", params.regex)  # raises when neither parses it
                    return Plan(kind, "guidance", params.regex, "a regex xgrammar does not parse")
                return Plan(kind, "xgrammar", params.regex)
            return Plan(kind, mode, params.regex)
        return Plan(kind, "guidance" if mode == "guidance" else "xgrammar", list(params.choice))
    except ValueError as e:
        raise ValueError(f"structured_outputs.{kind}: {e}") from None
    except RecursionError:  # a hostile schema or grammar nested thousands deep
        raise ValueError(f"structured_outputs.{kind}: nested too deeply") from None


class GrammarBackend:
    def __init__(self, tokenizer, vocab_size: int, stop_token_ids: list[int], cache_size: int = 128,
                 mode: str = "auto"):
        if mode not in BACKENDS:
            raise ValueError(f"structured_outputs_backend must be one of {', '.join(BACKENDS)}, got {mode!r}")
        self.mode = mode
        self._args = (tokenizer, vocab_size, list(stop_token_ids))
        self._backends: dict[str, object] = {}  # built on first use (building llguidance's tokenizer takes ~1s)
        self.vocab_size = vocab_size
        self.cache: OrderedDict[tuple, object] = OrderedDict()
        self.cache_size = cache_size
        self.cache_hits = 0
        self.served = {"xgrammar": 0, "guidance": 0}  # requests per backend since start
        self._lock = threading.Lock()
        # one worker: a slow compile delays other compiles, never the engine's steps
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="grammar-compile")

    def backend(self, name: str):
        with self._lock:
            if name not in self._backends:
                cls = xgrammar_backend.XGrammarBackend if name == "xgrammar" else guidance_backend.GuidanceBackend
                self._backends[name] = cls(*self._args)
            return self._backends[name]

    def _token_id(self, text: str) -> int:
        return self.backend("guidance").token_id(text)

    def plan(self, params: StructuredOutputsParams) -> Plan:
        return plan_constraint(params, self.mode, self._token_id)

    def compile_async(self, params: StructuredOutputsParams) -> Future:
        """Normalise, route and check the constraint now (a ValueError for the caller), compile on the worker."""
        plan = self.plan(params)
        with self._lock:
            cached = plan.key in self.cache
        if not cached:
            try:
                (xgrammar_backend if plan.backend == "xgrammar" else guidance_backend).check_syntax(
                    plan.kind, plan.payload)
            except ValueError as e:
                raise ValueError(f"structured_outputs.{plan.kind}: {e}") from None
        with self._lock:
            self.served[plan.backend] += 1
            first = self.served[plan.backend] == 1
        if first:
            logger.info("structured outputs: first request on the %s backend%s", plan.backend,
                        f" ({plan.reason} is beyond xgrammar)" if plan.reason else "")
        if cached:
            done: Future = Future()
            done.set_result(self.compile(params, plan))
            return done
        return self._executor.submit(self.compile, params, plan)

    def compile(self, params: StructuredOutputsParams, plan: Plan | None = None):
        plan = plan or self.plan(params)
        key = plan.key
        with self._lock:
            if key in self.cache:
                self.cache.move_to_end(key)
                self.cache_hits += 1
                return self.cache[key]
        try:
            compiled = (plan.backend, self.backend(plan.backend).compile(plan.kind, plan.payload))
        except ValueError as e:
            raise ValueError(f"structured_outputs.{plan.kind}: {e}") from None
        with self._lock:
            self.cache[key] = compiled
            if len(self.cache) > self.cache_size:
                self.cache.popitem(last=False)
        return compiled

    def matcher(self, compiled):
        name, obj = compiled
        return self.backend(name).matcher(obj)


def checker(spec: str, as_schema: bool, mode: str = "auto"):
    """`frontierlm grammar check`: a function text -> (accepted, failing position) through the same
    normalisation and backend choice a request gets."""
    params = StructuredOutputsParams(json=spec) if as_schema else StructuredOutputsParams(grammar=spec)

    def no_tokenizer(text):
        raise ValueError(f"token {text} needs a model's tokenizer; texts cannot be checked against it")
    try:
        if not as_schema and parse_gbnf(resolve_grammar(spec)).uses_tokens:
            no_tokenizer("matches (<[id]>, <token>)")
        plan = plan_constraint(params, mode, no_tokenizer)
    except ValueError as e:
        raise ValueError(str(e).replace("structured_outputs.json", "schema").replace(
            "structured_outputs.grammar", "grammar")) from None
    module = xgrammar_backend if plan.backend == "xgrammar" else guidance_backend
    check = module.checker(plan.kind, plan.payload)
    check.backend = plan.backend
    return check


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
    this equivalent to DESIGN.md's slot right after logit bias and bans. Both backends write the same layout
    (bit j of word i allows token 32 i + j)."""
    import xgrammar as xgr

    rows = [i for i, m in enumerate(matchers) if m is not None]
    xgr.apply_token_bitmask_inplace(logits, bitmask.to(logits.device, non_blocking=True), indices=rows)
